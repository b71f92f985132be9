"""Do the states that different peers serve agree? Pure: no network, no clock.

A peer can serve any bytes it likes from `rpc_download_state` (hivemind does not check them), and
the donor with the highest self-declared priority is asked first. So the publisher asks several
peers and publishes only a state that a strict majority of the peers at that epoch agree on:
bit-identical, or within `rel_tol` relative L2 distance (peers that missed part of an all-reduce
drift apart a little; a forged or corrupted state is far away, or not finite at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FetchedState:
    peer: str  # base58 peer id of the donor
    epoch: int
    tensors: Sequence  # torch tensors, the model's parameters in order


@dataclass(frozen=True)
class FetchFailed:
    """Why a peer gave no state: `refused` when it sent one we do not load (statewire's
    `StateRefused`: evidence against it, recorded), else it left, timed out or failed to answer."""

    reason: str
    refused: bool = False


@dataclass(frozen=True)
class Verdict:
    decision: str  # "publish" | "disagree" | "wait"
    reason: str
    chosen: FetchedState | None = None
    dissenters: tuple[str, ...] = ()  # outvoted peers ("publish"), or every peer at the epoch ("disagree")
    agreeing: tuple[str, ...] = ()  # the peers whose state is chosen ("publish")
    epoch: int = -1  # the epoch judged ("publish", "disagree")


def relative_distance(a: Sequence, b: Sequence) -> float:
    """||a - b|| / max(||a||, ||b||) over all tensors together; inf if shapes differ or not finite."""
    import torch

    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    if not all(bool(torch.isfinite(t).all()) for t in (*a, *b)):
        return math.inf
    if all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        return 0.0
    diff = norm_a = norm_b = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().double(), y.detach().double()
        diff += float((x - y).pow(2).sum())
        norm_a += float(x.pow(2).sum())
        norm_b += float(y.pow(2).sum())
    scale = math.sqrt(max(norm_a, norm_b))
    distance = math.sqrt(diff) / scale if scale > 0 else math.inf
    return distance if math.isfinite(distance) else math.inf


def short(peer: str) -> str:
    return peer[-8:]


def judge(states: Sequence[FetchedState], donors_listed: int, rel_tol: float, asked: int = 0) -> Verdict:
    """Pick the state to publish, or say why none.

    `donors_listed` is how many peers (voters) serve state. With one donor in the whole swarm its
    state is published alone (there is no second opinion to be had); otherwise at least two peers
    at the same epoch must agree, and they must be a strict majority at that epoch and, when
    `asked` is given, of the `asked` peers (one that did not answer, or sent a refused state,
    counts against: silence cannot turn a minority into a majority).
    """
    if not states:
        return Verdict("wait", "no peer served its state")
    if len(states) == 1:
        if donors_listed <= 1 and asked <= 1:
            return Verdict(
                "publish",
                "the only state donor in the swarm",
                states[0],
                (),
                (states[0].peer,),
                states[0].epoch,
            )
        return Verdict("wait", f"only peer {short(states[0].peer)} served its state; need a second opinion")

    best: list[FetchedState] = []
    for anchor in states:  # the largest group that agrees with one of its members
        group = [anchor] + [
            s
            for s in states
            if s is not anchor
            and s.epoch == anchor.epoch
            and relative_distance(anchor.tensors, s.tensors) <= rel_tol
        ]
        if (len(group), anchor.epoch) > (len(best), best[0].epoch if best else -1):
            best = group
    epoch = best[0].epoch
    same_epoch = [s for s in states if s.epoch == epoch]
    dissent = [s for s in same_epoch if all(s is not b for b in best)]
    agreeing = ", ".join(short(s.peer) for s in best)
    if len(best) >= 2 and len(best) > len(dissent) and 2 * len(best) > asked:
        spread = max(relative_distance(best[0].tensors, s.tensors) for s in best[1:])
        agreeing += f"; distance {spread:.2e}"
        reason = f"{len(best)} peers agree ({agreeing})"
        if dissent:
            reason += "; outvoted: " + describe(dissent, best[0])
        return Verdict(
            "publish", reason, best[0], tuple(s.peer for s in dissent), tuple(s.peer for s in best), epoch
        )
    if len(same_epoch) >= 2:  # peers at one epoch, and no majority among them
        return Verdict(
            "disagree",
            f"peers disagree on the state of epoch {epoch}: " + describe(same_epoch[1:], same_epoch[0]),
            None,
            tuple(s.peer for s in same_epoch),
            epoch=epoch,
        )
    if len(best) >= 2 and len(best) > len(dissent):
        return Verdict("wait", f"{len(best)} of the {asked} voters asked agree: not a majority of them yet")
    epochs = ", ".join(f"{short(s.peer)}@{s.epoch}" for s in states)
    return Verdict("wait", f"donors are at different epochs ({epochs}); nothing to compare yet")


def describe(others: Sequence[FetchedState], reference: FetchedState) -> str:
    parts = []
    for s in others:
        d = relative_distance(reference.tensors, s.tensors)
        shown = "not comparable (shapes or non-finite values)" if math.isinf(d) else f"{d:.2%} away"
        parts.append(f"peer {short(s.peer)} is {shown} from peer {short(reference.peer)}")
    return "; ".join(parts)
