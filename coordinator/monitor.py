"""The swarm monitor: reads hivemind's signed progress records from the DHT and keeps the books.

Every `poll_interval_s` it reads `<run_id>_progress` (one RSA-signed entry per training peer),
marks the heartbeating peers it finds as contributing, adds peers that train without heartbeats,
records how many samples each peer accumulated towards each epoch (the contribution ledger), and
every `history_interval_s` appends a point to the swarm's history. All of it goes to SQLite.

The parsing and accounting are pure functions; the thread only schedules them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from crowdtrain.coordinator.registry import HealthSettings, PeerRecord, is_online
from crowdtrain.coordinator.status import SwarmProgress
from crowdtrain.coordinator.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressRecord:
    """One peer's entry in the swarm's progress key (hivemind's LocalTrainingProgress)."""

    dht_peer_id: str
    epoch: int
    samples_accumulated: int
    samples_per_s: float
    time: float
    client_mode: bool


def parse_progress(entries: Iterable[dict | None]) -> list[ProgressRecord]:
    """Pure: turn the DHT values of the progress key into records, skipping malformed ones and the
    `None` a peer writes when it leaves."""
    from hivemind.p2p import PeerID

    # hivemind 1.1.12 internals: the fields of LocalTrainingProgress as ProgressTracker stores them
    records = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        try:
            records.append(
                ProgressRecord(
                    dht_peer_id=PeerID(entry["peer_id"]).to_base58(),
                    epoch=int(entry["epoch"]),
                    samples_accumulated=int(entry["samples_accumulated"]),
                    samples_per_s=float(entry["samples_per_second"]),
                    time=float(entry["time"]),
                    client_mode=bool(entry["client_mode"]),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            logger.debug("skipping malformed progress entry %r: %r", entry, e)
    return records


def contribution_rows(records: Iterable[ProgressRecord]) -> list[tuple[str, int, int]]:
    """Pure: (peer, epoch, samples accumulated so far) for each training peer. Stored with MAX
    semantics, so re-reading the same record is harmless and the last reading before a peer moves
    to the next epoch becomes its contribution to that epoch."""
    return [(r.dht_peer_id, r.epoch, r.samples_accumulated) for r in records if r.samples_accumulated > 0]


def summarize(records: Iterable[ProgressRecord], now: float) -> SwarmProgress:
    """Pure: the global epoch is the highest claimed by a full (non-client) peer, as in hivemind."""
    records = list(records)
    return SwarmProgress(
        global_epoch=max((r.epoch for r in records if not r.client_mode), default=0),
        samples_per_s=sum(r.samples_per_s for r in records),
        num_peers=len(records),
        read_unix_s=now,
    )


class SwarmMonitor:
    def __init__(
        self,
        dht,
        run_id: str,
        store: Store,
        health: HealthSettings,
        *,
        poll_interval_s: float = 2.0,
        history_interval_s: float = 5.0,
        read_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self.dht, self.run_id, self.store, self.health = dht, run_id, store, health
        self.poll_interval_s, self.history_interval_s, self.read_timeout_s = (
            poll_interval_s,
            history_interval_s,
            read_timeout_s,
        )
        self.clock = clock
        self.progress = SwarmProgress()
        self._last_history = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SwarmMonitor:
        from hivemind.dht.schema import SchemaValidator
        from hivemind.optim.progress_tracker import TrainingProgressSchema

        # without the schema validator for this prefix, reading the signed progress key can hang.
        # hivemind 1.1.12 internals: TrainingProgressSchema is not exported by hivemind.optim
        self.dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=self.run_id)])
        self._thread = threading.Thread(target=self._run, name="swarm-monitor", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.read_timeout_s + 5)
            self._thread = None

    def __enter__(self) -> SwarmMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.tick()
            except Exception:  # the monitor must outlive any one bad read
                logger.exception("swarm monitor tick failed; retrying in %.0fs", self.poll_interval_s)

    def read_progress(self) -> list[ProgressRecord]:
        # hivemind 1.1.12 internals: ProgressTracker.training_progress_key is `<prefix>_progress`, and
        # the peers' Optimizer gives its tracker prefix=run_id
        future = self.dht.get(f"{self.run_id}_progress", latest=True, return_future=True)
        try:
            found = future.result(timeout=self.read_timeout_s)
        except TimeoutError:
            future.cancel()
            logger.warning("reading the swarm's progress records timed out after %.0fs", self.read_timeout_s)
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        return parse_progress(item.value for item in found.value.values())

    def tick(self) -> None:
        now = self.clock()
        records = self.read_progress()
        self.progress = summarize(records, now)
        self.store.add_contributions(contribution_rows(records))
        for record in records:
            if self.store.mark_dht_seen(record.dht_peer_id, now, record.epoch, record.samples_per_s):
                continue
            # trains (its progress is in the DHT) but never sent us a heartbeat: still show it
            self.store.upsert_peer(
                PeerRecord(
                    session_id=f"dht:{record.dht_peer_id}",
                    name=f"peer {record.dht_peer_id[-8:]}",
                    joined_unix_s=now,
                    last_seen_unix_s=now,
                    phase="training",
                    dht_peer_id=record.dht_peer_id,
                    samples_per_s=record.samples_per_s,
                    local_epoch=record.epoch,
                    source="dht",
                    dht_last_seen_unix_s=now,
                )
            )
        if now - self._last_history >= self.history_interval_s:
            self._last_history = now
            self._append_history(now)

    def _append_history(self, now: float) -> None:
        online = [
            p
            for p in self.store.peers_unordered()
            if p.source == "heartbeat" and is_online(now, p, self.health)
        ]
        losses = [p.loss for p in online if math.isfinite(p.loss)]
        self.store.append_history(
            now,
            self.progress.global_epoch,
            self.progress.samples_per_s,
            len(online),
            sum(losses) / len(losses) if losses else None,
        )
