"""What may be published: finite tensors of the manifest's shapes (the one check of a downloaded
state, `peer.run.tensors.check_tensors`, which the publisher runs where the state's stream is read),
no eval-loss regression (`vetting.check_candidate`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from crowdtrain.coordinator.publishing.vetting import check_candidate, model_card
from crowdtrain.peer.run.tensors import ExpectedTensor, check_tensors

from tests.helpers import make_run

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


def test_model_card_states_what_a_downloader_needs(tmp_path: Path, small_corpus: Path):
    manifest, _ = make_run(tmp_path, small_corpus)
    from crowdtrain.coordinator.peers.shardbook import Cursor, coverage_of

    read = coverage_of([Cursor(1, 10, 100), Cursor(0, 40, 80), Cursor()]).describe()
    assert read == "150 of 180 training sequences (83.3%) in the 2 of 3 shards read so far"
    card = model_card(
        manifest, step=12, eval_loss=4.5, contributing_peers=3, created="2026-11-27 12:00 UTC", data_read=read
    )
    for needle in (
        manifest.run_id,
        "step 12",
        "llama",
        f"{12 * manifest.swarm.target_batch_size:,} sequences",
        "4.5000 nats/token",
        f"perplexity {math.exp(4.5):.2f}",
        "| 3 |",
        manifest.data.source,
        "license: apache-2.0",
        "Intended use and limitations",
        manifest.sha256(),
        f"Read so far by the swarm: {read}.",
    ):
        assert needle in card, needle
