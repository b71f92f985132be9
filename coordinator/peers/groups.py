"""Who averaged with whom: the all-reduce groups peers report, and what a groupmate confirms.

Every heartbeat of a proven peer may carry the groups it averaged in since the last one
(`HeartbeatRequest.groups`: hivemind's group id, the epoch, the members' peer ids). One peer's word
about its own group proves nothing, so the coordinator counts a group fact only when a member of
ANOTHER admission root (another invite, allowlist entry or, in open runs, address) reported the
same group with the same members in it (`confirmed`). That one rule decides whether evidence
against a peer counts (the accuser and the accused averaged together: `evidence`), and whether a
peer is a confirmed trainer or is credited for an epoch (`credit`). Pure rules over rows; the
`GroupBook` stores rows in the coordinator's SQLite, bounded in rows and age.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crowdtrain.coordinator.peers.store import Store

MAX_GROUP_ROWS = 200_000  # the oldest group reports are forgotten beyond this
KEEP_GROUPS_S = 7 * 86400.0  # and any older than this

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS averaging_groups (
        t REAL NOT NULL,
        group_id TEXT NOT NULL,
        reporter TEXT NOT NULL,
        root TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        members TEXT NOT NULL,
        UNIQUE (group_id, reporter)
    )""",
    "CREATE INDEX IF NOT EXISTS averaging_groups_by_id ON averaging_groups (group_id)",
    "CREATE INDEX IF NOT EXISTS averaging_groups_by_t ON averaging_groups (t)",
)


@dataclass(frozen=True)
class GroupReport:
    """One peer's account of one all-reduce group."""

    group_id: str  # hex
    reporter: str  # its proven DHT peer id
    root: str  # its admission root (`admission.Gate.admission_root`)
    epoch: int
    members: frozenset[str]
    t: float


def confirmed(group_id: str, a: str, b: str, a_root: str, reports: Iterable[GroupReport]) -> tuple[bool, str]:
    """Whether peers `a` and `b` were both in group `group_id` by the account of a member other than
    `a`, admitted through another root than `a_root` (`b` itself may confirm). `a`'s own account
    never counts: a peer cannot vouch for its own presence next to anyone."""
    if not group_id:
        return False, "no group named"
    for r in reports:
        if r.group_id != group_id or r.reporter == a or r.root == a_root:
            continue
        if r.reporter in r.members and {a, b} <= r.members:
            return True, f"group {group_id[:8]} confirmed by {r.reporter[:12]}"
    return (
        False,
        f"no member of another admission root confirms {a[:12]} and {b[:12]} in group {group_id[:8]}",
    )


class GroupBook:
    """Group reports in the coordinator's store."""

    def __init__(self, store: Store):
        self.store = store
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def intake(self, now: float, reporter: str, root: str, groups: Sequence[dict]) -> list[str]:
        """Store the groups (checked `AveragingGroup`s) a proven `reporter` averaged in, keeping only
        those that list the reporter itself; returns the group ids (hex) stored."""
        rows = [
            (now, g["group_id"].hex(), reporter, root, g["epoch"], " ".join(sorted(set(g["members"]))))
            for g in groups
            if g["group_id"] and reporter in g["members"]
        ]
        if not rows:
            return []
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO averaging_groups (t, group_id, reporter, root, epoch, members) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("DELETE FROM averaging_groups WHERE t < ?", (now - KEEP_GROUPS_S,))
            db.execute(
                "DELETE FROM averaging_groups WHERE rowid <= (SELECT MAX(rowid) FROM averaging_groups) - ?",
                (MAX_GROUP_ROWS,),
            )
        return [row[1] for row in rows]

    def reports(self, group_ids: Iterable[str]) -> list[GroupReport]:
        ids = sorted(set(group_ids))[:1000]
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return self._select(f"group_id IN ({marks})", tuple(ids))

    def since(self, t: float, limit: int = 20_000) -> list[GroupReport]:
        """Group reports newer than `t` (the newest `limit`)."""
        return self._select("t >= ? ORDER BY t DESC LIMIT ?", (t, limit))

    def _select(self, where: str, params: tuple) -> list[GroupReport]:
        try:
            rows = self.store.query(
                f"SELECT group_id, reporter, root, epoch, members, t FROM averaging_groups WHERE {where}",
                params,
            )
        except sqlite3.OperationalError:  # no table yet (a store no servicer opened)
            return []
        return [GroupReport(g, rep, root, e, frozenset(m.split()), t) for g, rep, root, e, m, t in rows]
