"""Evidence of rejected contributions, and the admission gate's answer (no hivemind, no torch).

`EvidenceSink` carries evidence from hivemind's averager processes (forked) to the parent, which
sends it to the coordinator with its heartbeats: each refused contribution (`EvidenceRecord`, with
the all-reduce group it was refused in) and each group this peer averaged in (`GroupRecord`: the
coordinator counts a report only when a groupmate other than the reporter confirms the group); `admit` asks the gate (peer/admission/access.py builds
the real one) and refuses when the gate itself fails.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

Gate = Callable[[str], tuple[bool, str]]


@dataclass(frozen=True)
class EvidenceRecord:
    """One rejected contribution: who sent it (DHT peer id, base58), what was wrong, when."""

    offender: str
    kind: str  # non_finite | weight | outlier | sign_flip | bad_average | persistent_disagreement
    detail: str
    unix_s: float
    group_id: bytes = b""  # the all-reduce group it was refused in


@dataclass(frozen=True)
class GroupRecord:
    """An all-reduce group this peer averaged in, with every member's DHT peer id (base58)."""

    group_id: bytes
    members: tuple[str, ...]
    unix_s: float


class EvidenceSink:
    """Evidence from hivemind's averager processes to the parent: create it before the optimizer
    (the averagers fork), `report` from anywhere, `drain` in the parent. Bounded: when the parent
    does not drain, new records are dropped (counted in `dropped` of the reporting process)
    instead of blocking an averager."""

    def __init__(self, max_pending: int = 1000):
        self._queue = mp.get_context("fork").Queue(maxsize=max_pending)
        self.dropped = 0

    def report(self, offender: str, kind: str, detail: str, group_id: bytes = b"") -> None:
        self._put(EvidenceRecord(offender, kind, detail[:200], time.time(), bytes(group_id)[:64]))

    def group(self, group_id: bytes, members: list[str]) -> None:
        """Record that this peer averaged in `group_id` with `members` (itself included)."""
        self._put(GroupRecord(bytes(group_id)[:64], tuple(members[:64]), time.time()))

    def _put(self, record: EvidenceRecord | GroupRecord) -> None:
        self._queue.cancel_join_thread()  # an averager exiting never waits for the parent to read
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def drain(self, max_records: int = 100) -> list[EvidenceRecord | GroupRecord]:
        records = []
        while len(records) < max_records:
            try:
                records.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return records


def heartbeat_messages(sink: EvidenceSink | None, epoch: int, max_records: int = 48) -> list:
    """What `sink` holds as the heartbeat's messages: `Rejection`s and `AveragingGroup`s."""
    from crowdtrain.protos import coordinator_pb2 as pb

    messages = []
    for r in sink.drain(max_records) if sink is not None else []:
        if isinstance(r, GroupRecord):
            messages.append(pb.AveragingGroup(group_id=r.group_id, epoch=epoch, members=list(r.members)))
        else:
            messages.append(
                pb.Rejection(
                    offender=r.offender, kind=r.kind, detail=r.detail, epoch=epoch, group_id=r.group_id
                )
            )
    return messages


def admit(gate: Gate | None, peer_id_base58: str) -> tuple[bool, str]:
    """The gate's answer, refusing when the gate itself fails."""
    if gate is None:
        return True, "no gate: everyone is admitted"
    try:
        admitted, reason = gate(peer_id_base58)
    except Exception as e:  # a gate that cannot decide must not let a stranger in
        return False, f"the admission gate failed ({type(e).__name__}: {e})"
    return bool(admitted), reason
