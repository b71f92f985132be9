"""What may be published: finite tensors of the manifest's shapes (the one check of a downloaded
state, `peer.run.tensors.check_tensors`, which the publisher runs where the state's stream is read),
no eval-loss regression (`vetting.check_candidate`)."""

from __future__ import annotations

import math

import torch
from crowdtrain.coordinator.publishing.vetting import check_candidate
from crowdtrain.peer.run.tensors import ExpectedTensor, check_tensors

MODEL = (ExpectedTensor("a", (2, 3), "torch.float32", 4), ExpectedTensor("b", (4,), "torch.float32", 4))


def _tensors(**overrides) -> list:
    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    tensors.update(overrides)
    return list(tensors.values())


def test_a_healthy_state_passes():
    assert check_tensors(_tensors(), MODEL) is None
    assert check_candidate(5.0, 5.2, 0.5) is None
    assert check_candidate(5.4, 5.0, 0.5) is None  # within the margin
    assert check_candidate(9.0, None, 0.5) is None  # nothing published yet


def test_nan_or_inf_anywhere_is_refused():
    bad = torch.ones(4)
    bad[2] = math.nan
    assert "b contains NaN" in check_tensors(_tensors(b=bad), MODEL)
    assert "contains NaN or infinite" in check_tensors(_tensors(a=torch.full((2, 3), math.inf)), MODEL)
    assert "eval loss is nan" in check_candidate(math.nan, None, 0.5)


def test_shape_or_name_mismatch_is_refused():
    assert "shape (3, 2)" in check_tensors(_tensors(a=torch.zeros(3, 2)), MODEL)
    assert "missing ['b']" in check_tensors([torch.zeros(2, 3)], MODEL)


def test_eval_loss_regression_beyond_the_margin_is_refused():
    reason = check_candidate(5.6, 5.0, 0.5)
    assert "worse than the last published 5.0000 by 0.6000 nats (allowed 0.5000)" in reason
