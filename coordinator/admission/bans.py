"""Evidence against peers, and the automatic action it may lead to: a ban, or a quarantine.

A peer that refuses a groupmate's contribution while averaging (a non-finite or outlying part, a
bad result, an unadmitted sender) reports it in its next heartbeat (`HeartbeatRequest.rejections`,
at most 32 per heartbeat, each naming the all-reduce group). Since any defence that acts on
strangers' words is a weapon, a report counts only when all of these hold:
- its reporter proved, at Join and in its heartbeats, the one identity its session is bound to,
  holds a current swarm token and has been in the run `min_reporter_age_s` (`reporter_verdict`);
- the offender is not one of the coordinator's own nodes (bootstrap, publisher);
- a member of the group other than the reporter, from another admission root (the offender itself
  or a third groupmate), confirms that reporter and offender averaged in that group
  (`groups.confirmed`): nobody is accused by a peer it never averaged with.
`autoban_decision` (pure) acts once the counted reports come from `min_reporters` distinct
ADMISSION ROOTS (invites, allowlist entries, or in open runs addresses) within a window: one
invite, one allowlist entry or one address is one reporter, however many identities it runs.
In invite and allowlist runs the action is a ban of the DHT identity (`Store.ban_dht_identity`);
in open runs, where anyone can bring many addresses, it is a quarantine (`Quarantine`): the operator
is alerted, the peer is no voter and no state donor for `quarantine_s`, and keeps training.
`crowdtrain ban --unban ID` lifts either and forgets the evidence (`EvidenceBook.clear`). Everything
is shown: `PeerStatus.rejections_against`, the dashboard and `GET /api/v1/rejections`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from crowdtrain.coordinator.peers.groups import GroupBook, confirmed
from crowdtrain.coordinator.peers.store import Store
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
    """CREATE TABLE IF NOT EXISTS quarantine (
        dht_peer_id TEXT PRIMARY KEY, t REAL NOT NULL, until REAL NOT NULL, reason TEXT NOT NULL
    )""",
)
_ADDED_COLUMNS = {"evidence": ("root TEXT NOT NULL DEFAULT ''", "group_id TEXT NOT NULL DEFAULT ''")}


class AutobanConfigError(CrowdtrainError):
    """The automatic-ban thresholds cannot work; the message names the flags."""


@dataclass(frozen=True)
class AutobanSettings:
    min_reporters: int = 2  # distinct admission roots whose confirmed reports are needed
    min_reports: int = 6  # reports in all (each reporter counts once per epoch and kind)
    window_s: float = 600.0  # only reports this recent count
    min_reporter_age_s: float = 300.0  # a reporter's session must be this old: sybils must wait
    quarantine_s: float = 3600.0  # how long an open run's automatic action lasts without new evidence

    def __post_init__(self):
        if self.min_reporters < 1 or self.min_reports < 1 or not self.window_s > 0:
            raise AutobanConfigError(
                f"--autoban-min-reporters {self.min_reporters} and --autoban-min-reports {self.min_reports} "
                f"must be at least 1 and --autoban-window-s {self.window_s} above 0 (2, 6 and 600 by default)"
            )


@dataclass(frozen=True)
class Reporter:
    """Who sends evidence: its proven identity, admission root, session age, and whether it holds a
    current swarm token."""

    dht_id: str
    root: str
    age_s: float
    holds_token: bool


@dataclass(frozen=True)
class Report:
    reporter: str  # the reporter's proven DHT peer id
    offender: str
    kind: str
    t: float
    root: str = ""  # the reporter's admission root
    group_id: str = ""  # hex of the group it was refused in


def reporter_verdict(reporter: Reporter, settings: AutobanSettings) -> tuple[bool, str]:
    """Whether `reporter`'s evidence is kept at all (its identity is proven: the caller checks)."""
    if not reporter.holds_token:
        return False, "it holds no current swarm token"
    if reporter.age_s < settings.min_reporter_age_s:
        return (
            False,
            f"its session is {reporter.age_s:.0f}s old; evidence counts from {settings.min_reporter_age_s:.0f}s",
        )
    return True, "proven, token holder, old enough"


def autoban_decision(
    offender: str, reports: Iterable[Report], now: float, settings: AutobanSettings
) -> tuple[bool, str]:
    """Whether to act against `offender` on `reports` (confirmed ones; against anyone, others are
    ignored), and why. A reporter never counts against itself; reporters of one admission root
    count as one; reports older than the window do not count."""
    recent = [
        r
        for r in reports
        if r.offender == offender and r.reporter != offender and now - r.t <= settings.window_s
    ]
    roots = {r.root or r.reporter for r in recent}
    kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(Counter(r.kind for r in recent).items()))
    window = f"within {settings.window_s:.0f}s"
    if len(roots) < settings.min_reporters:
        return False, (
            f"{len(recent)} report(s) from {len(roots)} distinct admission root(s) {window}; "
            f"action needs {settings.min_reporters}"
        )
    if len(recent) < settings.min_reports:
        return False, f"{len(recent)} report(s) {window}; action needs {settings.min_reports}"
    return True, f"{len(recent)} reports ({kinds}) from {len(roots)} independent peers {window}"


def appeal(dht_id: str) -> str:
    """What an automatically banned peer is told it can do."""
    return (
        f"if this is a mistake, send your peer id {dht_id} to the run's operator, who can lift it with "
        f"`crowdtrain ban --data-dir DIR --peer {dht_id} --unban`"
    )


class EvidenceBook:
    """Reports, group accounts (`groups.GroupBook`), automatic bans and quarantines in the store.
    `mode` is the run's admission mode (open: quarantine instead of ban); `protected()` gives the
    coordinator's own DHT node ids, which no report can touch."""

    def __init__(
        self,
        store: Store,
        settings: AutobanSettings = AutobanSettings(),
        mode: str = "open",
        protected: Callable[[], frozenset[str]] = frozenset,
    ):
        self.store = store
        self.settings = settings
        self.mode = mode
        self.protected = protected
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():  # stores made before these columns
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        self.groups = GroupBook(store)

    def take(self, now: float, record, holds_token: bool, rejections: Sequence[dict], groups: Sequence[dict]):
        """What a heartbeat of the proven session `record` (a `PeerRecord`) carries: its groups
        first (a report in the same heartbeat may be about a group a groupmate confirmed), then
        its reports."""
        reporter = Reporter(
            record.dht_peer_id, record.admission_root, now - record.joined_unix_s, holds_token
        )
        if groups:
            self.intake_groups(now, reporter, groups)
        if rejections:
            self.intake(now, reporter, rejections)

    def intake(self, now: float, reporter: Reporter, rejections: Sequence[dict]) -> list[str]:
        """Keep what `reporter` reported (each a checked `Rejection`), if its evidence counts at all,
        then act on every offender the evidence now condemns; returns those acted against."""
        keep, why = reporter_verdict(reporter, self.settings)
        if not keep:
            logger.debug("evidence from %s not kept: %s", reporter.dht_id, why)
            return []
        protected = self.protected()
        rows = [
            (
                now,
                reporter.dht_id,
                r["offender"],
                r["kind"],
                r["detail"],
                r["epoch"],
                reporter.root,
                r["group_id"].hex(),
            )
            for r in rejections
            if r["offender"] != reporter.dht_id and r["offender"] not in protected
        ]
        if not rows:
            return []
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO evidence (t, reporter, offender, kind, detail, epoch, root, group_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(
                "DELETE FROM evidence WHERE rowid <= (SELECT MAX(rowid) FROM evidence) - ?",
                (MAX_EVIDENCE_ROWS,),
            )
        return self._judge(now, {row[2] for row in rows})

    def intake_groups(self, now: float, reporter: Reporter, groups: Sequence[dict]) -> list[str]:
        """Keep the groups a proven `reporter` averaged in; a report waiting for their confirmation
        may now count, so its offender is judged again."""
        stored = self.groups.intake(now, reporter.dht_id, reporter.root, groups)
        if not stored:
            return []
        marks = ", ".join("?" * len(stored))
        rows = self.store.query(
            f"SELECT DISTINCT offender FROM evidence WHERE group_id IN ({marks}) AND t >= ?",
            (*stored, now - self.settings.window_s),
        )
        return self._judge(now, {row[0] for row in rows})

    def _judge(self, now: float, offenders: set[str]) -> list[str]:
        acted = []
        for offender in sorted(offenders - self.store.banned_dht_ids() - self.protected()):
            if self.mode == "open" and offender in self.quarantined(now):
                continue
            act, reason = autoban_decision(offender, self.counted_against(offender, now), now, self.settings)
            if act:
                self._act(now, offender, reason)
                acted.append(offender)
        return acted

    def counted_against(self, offender: str, now: float) -> list[Report]:
        """The recent reports against `offender` that a groupmate of another root confirms."""
        reports = self.reports_against(offender, now)
        accounts = self.groups.reports(r.group_id for r in reports)
        return [r for r in reports if confirmed(r.group_id, r.reporter, offender, r.root, accounts)[0]]

    def _act(self, now: float, offender: str, reason: str) -> None:
        if self.mode == "open":
            until = now + self.settings.quarantine_s
            why = f"quarantined automatically until {until:.0f}: {reason}"
            with self.store.transaction() as db:
                db.execute(
                    "INSERT OR REPLACE INTO quarantine (dht_peer_id, t, until, reason) VALUES (?, ?, ?, ?)",
                    (offender, now, until, why),
                )
                db.execute(
                    "INSERT INTO automatic_bans (t, offender, reason) VALUES (?, ?, ?)", (now, offender, why)
                )
            logger.warning(
                "OPERATOR ALERT: DHT identity %s %s. It keeps training but is no voter or state donor; "
                "ban it with `crowdtrain ban --peer %s`, or clear it with `--unban`",
                offender, why, offender,
            )  # fmt: skip
            return
        why = f"banned automatically: {reason}; {appeal(offender)}"
        sessions = self.store.ban_dht_identity(offender, why)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO automatic_bans (t, offender, reason) VALUES (?, ?, ?)", (now, offender, why)
            )
        logger.warning("DHT identity %s %s (%d session(s))", offender, why, sessions)

    def quarantined(self, now: float) -> frozenset[str]:
        """Identities an open run quarantined, until their quarantine ends."""
        return frozenset(
            row[0] for row in self.store.query("SELECT dht_peer_id FROM quarantine WHERE until > ?", (now,))
        )

    def reports_against(self, offender: str, now: float) -> list[Report]:
        rows = self.store.query(
            "SELECT reporter, offender, kind, t, root, group_id FROM evidence WHERE offender = ? AND t >= ? "
            "LIMIT 10000",
            (offender, now - self.settings.window_s),
        )
        return [Report(*row) for row in rows]


def unban(store: Store, who: str) -> int:
    """`crowdtrain ban --unban WHO`: lift the ban of WHO (a public peer id, a session id or a DHT
    peer id: `Store.set_banned`), and forget the evidence against its DHT identities and their
    quarantine, so the peer starts clean (its invite still admits it: `invites`). Returns the
    sessions unbanned plus the evidence and quarantine rows forgotten."""
    dht_ids = {who} | {r.dht_peer_id for r in store.peers_unordered() if who in (r.peer_id, r.session_id)}
    changed = store.set_banned(who, False)
    with store.transaction() as db:
        for table, column in (("evidence", "offender"), ("quarantine", "dht_peer_id")):
            try:
                for dht_id in dht_ids - {""}:
                    changed += db.execute(f"DELETE FROM {table} WHERE {column} = ?", (dht_id,)).rowcount
            except sqlite3.OperationalError:  # no such table: no servicer opened this store yet
                pass
    return changed


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
