"""Evidence of rejected contributions, and the admission gate's answer (no hivemind, no torch).

`EvidenceSink` carries evidence from hivemind's averager processes (forked) to the parent, which
sends it to the coordinator with its heartbeats; `admit` asks the gate (peer/swarmauth.py builds
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
    kind: str  # non_finite | weight | outlier | sign_flip | bad_average
    detail: str
    unix_s: float


class EvidenceSink:
    """Evidence from hivemind's averager processes to the parent: create it before the optimizer
    (the averagers fork), `report` from anywhere, `drain` in the parent. Bounded: when the parent
    does not drain, new records are dropped (counted in `dropped` of the reporting process)
    instead of blocking an averager."""

    def __init__(self, max_pending: int = 1000):
        self._queue = mp.get_context("fork").Queue(maxsize=max_pending)
        self.dropped = 0

    def report(self, offender: str, kind: str, detail: str) -> None:
        self._queue.cancel_join_thread()  # an averager exiting never waits for the parent to read
        try:
            self._queue.put_nowait(EvidenceRecord(offender, kind, detail[:200], time.time()))
        except queue.Full:
            self.dropped += 1

    def drain(self, max_records: int = 100) -> list[EvidenceRecord]:
        records = []
        while len(records) < max_records:
            try:
                records.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return records


def admit(gate: Gate | None, peer_id_base58: str) -> tuple[bool, str]:
    """The gate's answer, refusing when the gate itself fails."""
    if gate is None:
        return True, "no gate: everyone is admitted"
    try:
        admitted, reason = gate(peer_id_base58)
    except Exception as e:  # a gate that cannot decide must not let a stranger in
        return False, f"the admission gate failed ({type(e).__name__}: {e})"
    return bool(admitted), reason
