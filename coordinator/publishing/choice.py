"""One round of choosing the swarm's state to publish: whom to ask, what to refuse, when to ask again.

Only voters are asked (`voters`: proven, admitted, long-standing DHT identities, one vote each),
and only those the swarm's signed progress records name (`voters.candidate_donors`). Each state
that comes back must be newer than the latest checkpoint, no further ahead than the other voters'
records allow (`voters.epoch_bound`) and fit the model tensor by tensor (checked once, where its
stream is read: `statefetch`, `FetchFailed.refused`); a refusal is logged with its evidence and
recorded. The rest is judged by `agreement.judge` (a strict majority of the voters asked at one epoch).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from crowdtrain.coordinator.publishing.agreement import FetchedState, FetchFailed, Verdict, judge
from crowdtrain.coordinator.publishing.voters import candidate_donors, epoch_bound, voter_epochs
from crowdtrain.peer.events import emit

logger = logging.getLogger(__name__)


def admissible(
    states: Sequence[FetchedState], epochs: dict[str, int], last: int
) -> tuple[list[FetchedState], dict[str, str]]:
    """Pure: the states worth judging, and why each other one was refused (by peer). Their tensors
    fit the model already (checked where the stream is read); here the epoch each claims must be
    within the voters' records. A state at or before the latest checkpoint `last` is stale, not refused."""
    kept, refused = [], {}
    for state in states:
        ok, why = epoch_bound(state.peer, state.epoch, epochs)
        if not ok:
            refused[state.peer] = why
        elif state.epoch > last:
            kept.append(state)
        else:
            logger.info(
                "publisher: peer %s serves epoch %d <= %d, the latest checkpoint",
                state.peer,
                state.epoch,
                last,
            )
    return kept, refused


def choose_state(
    fetcher,
    voters: frozenset[str],
    voters_why: str,
    last: int,
    settings,
    stop: threading.Event,
    on_reject: Callable[[int, str], None],
) -> FetchedState | None:
    """A state newer than `last` that a majority of the voters asked agree on, else None.

    Downloads from up to `max_donors_asked` voters at once (highest epoch first), of whom a strict
    majority must agree. Honest peers can still disagree for a moment (hivemind bumps a peer's
    epoch before its optimizer step lands, and applies a background state average later), so on no
    majority it asks again after `agreement_retry_s`, at most `agreement_attempts` times. A final
    disagreement, any outvoted peer and every refused donor are recorded (a donor that left or
    timed out is not refused: `FetchFailed.refused`).
    """
    s = settings
    claims = fetcher.progress_claims()
    epochs = voter_epochs(claims, voters)
    donors = candidate_donors(claims, voters, salt=str(last))
    if not donors:
        reason = f"no eligible voter serves state ({voters_why}; {len(claims)} signed progress record(s))"
        report(Verdict("wait", reason), 0)
        return None
    # a strict majority of the voters asked must agree; ask as many as we may (one, if the operator
    # chose to trust one), so that two colluding voters cannot be the whole of a small sample
    asked = 1 if s.agreement_peers <= 1 else min(max(s.max_donors_asked, s.agreement_peers), len(donors))
    states: list[FetchedState] = []
    refusals: dict[str, str] = {}
    verdict = judge(states, len(donors), s.agreement_rel_tol)
    for attempt in range(s.agreement_attempts):
        if attempt and stop.wait(s.agreement_retry_s):
            return None
        fetched, failed = fetcher.fetch_all(donors[:asked])
        states, refused = admissible(fetched, epochs, last)
        refusals |= refused | stream_refusals(failed)
        verdict = judge(states, len(donors) if asked > 1 else 1, s.agreement_rel_tol, asked=asked)
        if verdict.decision == "publish":
            break
    for peer, why in refusals.items():
        record_refusal(peer, why, epochs, on_reject)
    if verdict.decision == "disagree" or verdict.dissenters:
        on_reject(verdict.chosen.epoch if verdict.chosen else states[0].epoch, verdict.reason)
    report(verdict, len(donors))
    return verdict.chosen if verdict.decision == "publish" else None


def stream_refusals(failed: dict[str, FetchFailed]) -> dict[str, str]:
    """Pure: why each donor whose stream was refused (not one that left or timed out) was refused."""
    return {peer: failure.reason for peer, failure in failed.items() if failure.refused}


def record_refusal(
    peer: str, why: str, epochs: dict[str, int], on_reject: Callable[[int, str], None]
) -> None:
    """Log (with the evidence: the voters' epochs) and record a donor's refused state."""
    epoch = epochs.get(peer, 0)
    reason = f"refused the state of peer {peer}: {why}"
    emit(
        logger,
        "checkpoint_refused",
        "publisher: %s (voters' epochs in their signed progress records: %s)",
        reason,
        {p[-8:]: e for p, e in epochs.items()},
        level=logging.WARNING,
        epoch=epoch,
        reason=reason,
    )
    on_reject(epoch, reason)


def report(verdict: Verdict, donors_listed: int) -> None:
    """Log the final verdict of a round of asking: chosen, disagreement, or why we wait."""
    if verdict.decision == "disagree":
        emit(
            logger,
            "state_disagreement",
            "publisher: not publishing yet (%d voters listed): %s",
            donors_listed,
            verdict.reason,
            level=logging.WARNING,
            epoch=verdict.epoch,
            peers=list(verdict.dissenters),
            reason=verdict.reason,
        )
    elif verdict.decision == "wait":
        emit(
            logger,
            "publish_waiting",
            "publisher: not publishing yet (%d voters listed): %s",
            donors_listed,
            verdict.reason,
            donors_listed=donors_listed,
            reason=verdict.reason,
        )
    else:
        emit(
            logger,
            "state_chosen",
            "publisher: state of epoch %d chosen: %s",
            verdict.epoch,
            verdict.reason,
            epoch=verdict.epoch,
            agreeing=list(verdict.agreeing),
            outvoted=list(verdict.dissenters),
            reason=verdict.reason,
        )
