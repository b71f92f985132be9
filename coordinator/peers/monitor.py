"""The swarm monitor: reads hivemind's signed progress records from the DHT and keeps the books.

Every `poll_interval_s`, and at least once per heartbeat interval, it reads `<run_id>_progress`
(one RSA-signed entry per training peer), marks the heartbeating peers it finds as contributing,
adds peers that train without heartbeats, moves the contribution ledger on (`credit`: per epoch
the swarm passed, the run's target batch size shared among the proven identities that took part),
and every `history_interval_s` appends a point to the swarm's history. All of it goes to SQLite.

The records are hostile input like any request: a record out of range is skipped with a log line,
two records claiming one peer id in one read are both skipped (hivemind signs each record with a
per-process key, but the peer id inside is the writer's claim), and none of a record's numbers is
credited (its samples and samples/s are shown, never counted: `credit`). The parsing and the
accounting are pure functions; the thread only schedules them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from crowdtrain.coordinator.limits import MAX_EPOCH, MAX_SAMPLES_PER_S
from crowdtrain.coordinator.peers.credit import (
    CreditSettings,
    Sighting,
    Tally,
    advance,
    epoch_rows,
    live_identity_roots,
)
from crowdtrain.coordinator.peers.groups import GroupBook
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, is_online
from crowdtrain.coordinator.peers.status import SwarmProgress
from crowdtrain.coordinator.peers.store import Store

logger = logging.getLogger(__name__)

SWARM_EPOCH_KEY = "credit_swarm_epoch"  # in the store's meta


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
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            logger.info("skipping a malformed progress record: %r", e)
    return vet_records(records)


def record_problem(r: ProgressRecord) -> str:
    """Why a progress record is implausible on its own, or "" when it is not."""
    if not 0 <= r.epoch < MAX_EPOCH:
        return f"epoch {r.epoch} outside 0..{MAX_EPOCH - 1}"
    if r.samples_accumulated < 0:
        return f"negative samples_accumulated {r.samples_accumulated}"
    if not (0 <= r.samples_per_s < math.inf and math.isfinite(r.time)):
        return f"samples_per_s {r.samples_per_s!r} or time {r.time!r} not a finite non-negative number"
    return ""


def vet_records(records: list[ProgressRecord]) -> list[ProgressRecord]:
    """Pure: the records that are plausible on their own, each peer id once (a second record with
    the same id is a forgery or a restart in flight: both are skipped), throughput capped."""
    counts = Counter(r.dht_peer_id for r in records)
    kept = []
    for r in records:
        problem = record_problem(r) or (
            f"{counts[r.dht_peer_id]} records claim this peer id" if counts[r.dht_peer_id] > 1 else ""
        )
        if problem:
            logger.info("skipping the progress record of %s: %s", r.dht_peer_id[-12:], problem)
            continue
        kept.append(dataclasses.replace(r, samples_per_s=min(r.samples_per_s, MAX_SAMPLES_PER_S)))
    return kept


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
        credit: CreditSettings,
        *,
        poll_interval_s: float = 2.0,
        history_interval_s: float = 5.0,
        read_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self.dht = dht
        self.run_id = run_id
        self.store = store
        self.health = health
        # at least once per heartbeat interval: a swarm with short intervals (tests, demo) is seen as fast
        self.poll_interval_s = min(poll_interval_s, health.heartbeat_interval_s)
        self.history_interval_s, self.read_timeout_s = history_interval_s, read_timeout_s
        self.clock = clock
        self.progress = SwarmProgress()
        self._last_history = 0.0
        self.credit, self.groups = credit, GroupBook(store)
        # the credit's swarm epoch survives restarts: a restart must not let a laggard root set it anew
        saved = store.get_meta(SWARM_EPOCH_KEY)
        self.tally = Tally(int(saved) if saved else None)
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

    def credit_epochs(self, now: float, records: list[ProgressRecord]) -> None:
        """Move the credit on by this read (`credit.advance`) and write the ledger rows of the epochs
        it settled (`credit.epoch_rows`)."""
        roots = live_identity_roots(now, self.store.peers_unordered(), self.health)
        sightings = [Sighting(r.dht_peer_id, r.epoch, r.samples_accumulated > 0) for r in records]
        previous = self.tally.swarm_epoch
        self.tally, settled, why = advance(self.tally, sightings, roots, now, self.credit)
        if self.tally.swarm_epoch != previous:
            logger.debug("swarm epoch for credit: %s", why)
            self.store.set_meta({SWARM_EPOCH_KEY: str(self.tally.swarm_epoch)})
        if not settled:
            return
        # an epoch's groups are reported after it began (averaging ends it): these are all of them
        reports = self.groups.since(min(o.first_seen_unix_s for o in settled) - self.credit.settle_s)
        banned = self.store.banned_dht_ids()
        for epoch in settled:
            rows, why = epoch_rows(epoch, reports, self.credit, banned)
            self.store.add_contributions(rows)
            logger.debug("credited %s", why)

    def tick(self) -> None:
        now = self.clock()
        records = self.read_progress()
        self.credit_epochs(now, records)
        # the epoch every view shows is the credit's: no record of an unproven writer moves it
        self.progress = dataclasses.replace(summarize(records, now), global_epoch=self.tally.swarm_epoch or 0)
        for record in records:
            if self.store.mark_dht_seen(record.dht_peer_id, now, record.epoch, record.samples_per_s):
                continue
            # trains (its progress is in the DHT) but never sent us a heartbeat: still show it
            self.store.upsert_peer(
                PeerRecord(
                    session_id=f"dht:{record.dht_peer_id}",
                    peer_id=record.dht_peer_id[-12:],
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
