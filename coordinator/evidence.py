"""Evidence against peers, and automatic bans on it.

A peer that refuses a groupmate's contribution while averaging (a non-finite or outlying part, a
bad result, an unadmitted sender) reports it in its next heartbeat (`HeartbeatRequest.rejections`,
at most 32 per heartbeat, each field within `limits`). Only reports from a session that proved its
DHT identity are kept, and a report names its reporter by that identity, so a reporter running
many sessions is one reporter. `autoban_decision` (pure) bans an offender once enough DISTINCT
reporters accused it within a window: one malicious reporter cannot frame an honest peer however
often it reports. A ban bans the DHT identity (`Store.ban_dht_identity`): its heartbeats and proofs
are refused and its swarm token is not renewed. Everything is shown: `PeerStatus.rejections_against`,
the dashboard and `GET /api/v1/rejections`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crowdtrain.coordinator.store import Store
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

MAX_EVIDENCE_ROWS = 100_000  # the oldest reports are forgotten beyond this
MAX_LISTED = 200  # rows of each kind in /api/v1/rejections

_SCHEMA = (
    # one row per (reporter, offender, epoch, kind): a report repeated within an epoch counts once
    """CREATE TABLE IF NOT EXISTS evidence (
        t REAL NOT NULL,
        reporter TEXT NOT NULL,
        offender TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        UNIQUE (reporter, offender, epoch, kind)
    )""",
    "CREATE INDEX IF NOT EXISTS evidence_by_offender ON evidence (offender, t)",
    "CREATE TABLE IF NOT EXISTS automatic_bans (t REAL NOT NULL, offender TEXT NOT NULL, reason TEXT NOT NULL)",
)


class AutobanConfigError(CrowdtrainError):
    """The automatic-ban thresholds cannot work; the message names the flags."""


@dataclass(frozen=True)
class AutobanSettings:
    min_reporters: int = 2  # distinct proven DHT identities that must have reported the offender
    min_reports: int = 6  # reports in all (each reporter counts once per epoch and kind)
    window_s: float = 600.0  # only reports this recent count

    def __post_init__(self):
        if self.min_reporters < 1 or self.min_reports < 1 or not self.window_s > 0:
            raise AutobanConfigError(
                f"--autoban-min-reporters {self.min_reporters} and --autoban-min-reports {self.min_reports} "
                f"must be at least 1 and --autoban-window-s {self.window_s} above 0 (2, 3 and 600 by default)"
            )


@dataclass(frozen=True)
class Report:
    reporter: str  # the reporter's proven DHT peer id
    offender: str
    kind: str
    t: float


def autoban_decision(
    offender: str, reports: Iterable[Report], now: float, settings: AutobanSettings
) -> tuple[bool, str]:
    """Whether to ban `offender` on `reports` (against anyone; others are ignored), and why. A
    reporter never counts against itself, and reports older than the window do not count."""
    recent = [
        r
        for r in reports
        if r.offender == offender and r.reporter != offender and now - r.t <= settings.window_s
    ]
    reporters = {r.reporter for r in recent}
    kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(Counter(r.kind for r in recent).items()))
    window = f"within {settings.window_s:.0f}s"
    if len(reporters) < settings.min_reporters:
        return False, (
            f"{len(recent)} report(s) from {len(reporters)} distinct peer(s) {window}; "
            f"a ban needs {settings.min_reporters} distinct reporters"
        )
    if len(recent) < settings.min_reports:
        return False, f"{len(recent)} report(s) {window}; a ban needs {settings.min_reports}"
    return True, (
        f"banned automatically: {len(recent)} reports ({kinds}) from {len(reporters)} distinct peers {window}"
    )


class EvidenceBook:
    """Reports and automatic bans in the coordinator's store."""

    def __init__(self, store: Store, settings: AutobanSettings = AutobanSettings()):
        self.store, self.settings = store, settings
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def intake(self, now: float, reporter: str, rejections: Sequence[dict]) -> list[str]:
        """Store what a proven `reporter` reported (each a checked `Rejection`: offender, kind,
        detail, epoch), then ban every offender the evidence now condemns; returns those banned."""
        rows = [
            (now, reporter, r["offender"], r["kind"], r["detail"], r["epoch"])
            for r in rejections
            if r["offender"] != reporter  # nobody reports itself into anything
        ]
        if not rows:
            return []
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO evidence (t, reporter, offender, kind, detail, epoch) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(
                "DELETE FROM evidence WHERE rowid <= (SELECT MAX(rowid) FROM evidence) - ?",
                (MAX_EVIDENCE_ROWS,),
            )
        banned = []
        for offender in sorted({row[2] for row in rows} - self.store.banned_dht_ids()):
            ban, reason = autoban_decision(offender, self.reports_against(offender, now), now, self.settings)
            if ban:
                self._ban(now, offender, reason)
                banned.append(offender)
        return banned

    def _ban(self, now: float, offender: str, reason: str) -> None:
        sessions = self.store.ban_dht_identity(offender, reason)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO automatic_bans (t, offender, reason) VALUES (?, ?, ?)", (now, offender, reason)
            )
        logger.warning("DHT identity %s %s (%d session(s))", offender, reason, sessions)

    def reports_against(self, offender: str, now: float) -> list[Report]:
        rows = self.store.query(
            "SELECT reporter, offender, kind, t FROM evidence WHERE offender = ? AND t >= ? LIMIT 10000",
            (offender, now - self.settings.window_s),
        )
        return [Report(*row) for row in rows]


def counts_against(store: Store) -> dict[str, int]:
    """Reports kept against each offender, for status ({} before any evidence table exists)."""
    try:
        return dict(store.query("SELECT offender, COUNT(*) FROM evidence GROUP BY offender"))
    except sqlite3.OperationalError:  # no such table: no servicer has opened this store yet
        return {}


def recent(store: Store, limit: int = MAX_LISTED) -> dict[str, list[dict]]:
    """The newest reports and automatic bans, newest first (for /api/v1/rejections)."""
    try:
        evidence = store.query(
            "SELECT t, reporter, offender, kind, detail, epoch FROM evidence "
            "ORDER BY t DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        bans = store.query(
            "SELECT t, offender, reason FROM automatic_bans ORDER BY t DESC, rowid DESC LIMIT ?", (limit,)
        )
    except sqlite3.OperationalError:
        evidence, bans = [], []
    keys = ("t", "reporter", "offender", "kind", "detail", "epoch")
    return {
        "peer_evidence": [dict(zip(keys, row, strict=True)) for row in evidence],
        "automatic_bans": [dict(zip(("t", "offender", "reason"), row, strict=True)) for row in bans],
    }
