"""The publisher's majority rule over the states different peers serve (pure)."""

from __future__ import annotations

import math

import torch
from crowdtrain.coordinator.publishing.agreement import FetchedState, judge, relative_distance

TOL = 0.01


def weights(seed: int, scale: float = 1.0, noise: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    g.manual_seed(seed)
    return [scale * t + noise * torch.randn(t.shape, generator=g) for t in base]


def state(peer: str, epoch: int = 5, **kw) -> FetchedState:
    return FetchedState(peer=peer * 8, epoch=epoch, tensors=weights(ord(peer[0]), **kw))


def test_relative_distance():
    a = weights(1)
    assert relative_distance(a, [t.clone() for t in a]) == 0.0
    assert 0 < relative_distance(a, weights(2, noise=1e-4)) < 1e-3
    assert relative_distance(a, weights(1, scale=3.0)) == relative_distance(weights(1, scale=3.0), a)
    assert math.isclose(relative_distance(a, weights(1, scale=3.0)), 2 / 3, rel_tol=1e-6)
    assert relative_distance(a, a[:1]) == math.inf
    assert relative_distance(a, [torch.zeros(16, 9), a[1]]) == math.inf
    poisoned = [a[0].clone(), a[1].clone()]
    poisoned[1][0] = float("nan")
    assert relative_distance(a, poisoned) == math.inf


def test_a_lone_donor_is_trusted_only_when_it_is_the_whole_swarm():
    assert judge([state("a")], donors_listed=1, rel_tol=TOL).decision == "publish"
    verdict = judge([state("a")], donors_listed=3, rel_tol=TOL)
    assert verdict.decision == "wait" and "second opinion" in verdict.reason
    assert judge([], donors_listed=2, rel_tol=TOL).decision == "wait"


def test_peers_within_tolerance_agree():
    verdict = judge([state("a", noise=1e-4), state("b", noise=1e-4)], donors_listed=2, rel_tol=TOL)
    assert verdict.decision == "publish" and verdict.chosen.peer == "a" * 8
    assert verdict.dissenters == ()


def test_a_forger_against_one_honest_peer_blocks_publishing_and_names_both():
    verdict = judge([state("f", scale=3.0), state("h")], donors_listed=2, rel_tol=TOL)
    assert verdict.decision == "disagree" and verdict.chosen is None
    assert set(verdict.dissenters) == {"f" * 8, "h" * 8}
    assert "66.67% away" in verdict.reason


def test_the_majority_wins_and_the_forger_is_named():
    states = [state("f", scale=3.0), state("h"), state("i", noise=1e-5)]
    verdict = judge(states, donors_listed=3, rel_tol=TOL)
    assert verdict.decision == "publish" and verdict.chosen.peer in ("h" * 8, "i" * 8)
    assert verdict.dissenters == ("f" * 8,)
    assert "outvoted: peer ffffffff" in verdict.reason


def test_a_forger_claiming_a_later_epoch_gains_nothing():
    states = [state("f", epoch=99, scale=3.0), state("h"), state("i")]
    verdict = judge(states, donors_listed=3, rel_tol=TOL)
    assert verdict.decision == "publish" and verdict.chosen.epoch == 5
    assert judge(states[:2], donors_listed=3, rel_tol=TOL).decision == "wait"


def test_two_colluding_forgers_against_two_honest_peers_is_no_majority():
    honest = [state("h", epoch=5), state("i", epoch=5)]
    forged = [state("f", epoch=5, scale=3.0), state("g", epoch=5, scale=3.0)]
    verdict = judge(forged + honest, donors_listed=4, rel_tol=TOL)
    assert verdict.decision == "disagree", verdict  # 2 against 2 is no majority


def test_non_finite_states_never_agree_even_with_each_other():
    a, b = state("a"), state("b")
    for s in (a, b):
        s.tensors[0][0, 0] = float("inf")
    assert judge([a, b], donors_listed=2, rel_tol=TOL).decision == "disagree"
