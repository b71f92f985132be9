"""The coordinator's durable state in SQLite (WAL): run metadata and every peer it has seen.

One connection guarded by a lock; every write is its own transaction, so a coordinator killed at
any moment restarts with everything it acknowledged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import sqlite3
import threading
import typing
from pathlib import Path

from crowdtrain.coordinator.peers.health import PeerRecord

logger = logging.getLogger(__name__)

# the most samples one ledger row holds: progress records are hostile input (hivemind accepts
# counts up to 2^64-1); far below int64's end even summed over 2^20 rows
MAX_LEDGER_SAMPLES = 2**40
MAX_TOTAL_SAMPLES = 2**62  # totals shown anywhere (GetStatus' int64 included) stop here

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (session_id TEXT PRIMARY KEY);
-- samples each peer accumulated towards each epoch, from the swarm's progress records
CREATE TABLE IF NOT EXISTS contributions (
    dht_peer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (dht_peer_id, epoch)
);
-- DHT identities the operator banned (`crowdtrain ban`): a proof of one of them is refused
CREATE TABLE IF NOT EXISTS banned_dht_ids (dht_peer_id TEXT PRIMARY KEY);
-- states the publisher refused to publish, and why
CREATE TABLE IF NOT EXISTS rejections (t REAL NOT NULL, step INTEGER NOT NULL, reason TEXT NOT NULL);
-- one row per monitor tick: the swarm over time
CREATE TABLE IF NOT EXISTS history (
    t REAL NOT NULL,
    global_epoch INTEGER NOT NULL,
    samples_per_s REAL NOT NULL,
    peers_training INTEGER NOT NULL,
    train_loss REAL
);
"""
# The peers table has one column per PeerRecord field (its report's fields included), added at open
# when missing: a new field needs no migration. NaN and None are stored as NULL; a NULL read back
# becomes the field's default (NaN for the loss), or stays None where the field allows it.
_PEER_FIELDS = dataclasses.fields(PeerRecord)
_PEER_TYPES = typing.get_type_hints(PeerRecord)
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}
_NAMES = [f.name for f in _PEER_FIELDS]
_BAN_FIELDS = ("banned", "ban_reason")  # changed only by bans (`_ban`, `set_banned`), never by heartbeats
_UPSERT = (
    f"INSERT INTO peers ({', '.join(_NAMES)}) VALUES ({', '.join('?' for _ in _NAMES)}) "
    "ON CONFLICT (session_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _NAMES if name not in ("session_id", *_BAN_FIELDS))
)


def _sql_type(name: str) -> str:
    kinds = typing.get_args(_PEER_TYPES[name]) or (_PEER_TYPES[name],)  # `float | None` -> float
    return _SQL_TYPES[kinds[0]]


def _row(record: PeerRecord) -> list:
    return [getattr(record, name) for name in _NAMES]  # SQLite stores NaN as NULL


def _to_record(row) -> PeerRecord:
    values = {}
    for field, value in zip(_PEER_FIELDS, row, strict=True):
        if value is None and field.default is not dataclasses.MISSING:
            value = field.default
        elif _PEER_TYPES[field.name] is bool:
            value = bool(value)
        values[field.name] = value
    return PeerRecord(**values)


class Store:
    """SQLite is the record; peers are also kept in memory so heartbeats never wait on the disk.

    Joins, leaves and bans are written through at once. Heartbeat fields (last seen, throughput,
    loss, ...) are written behind in one transaction every `flush_interval_s` (0: at once), so a
    kill -9 loses at most that much of them, never a peer. `crowdtrain ban` writes from another
    process; bans are picked up from the database at every flush.
    """

    def __init__(self, path: Path, flush_interval_s: float = 0.5):
        self.path = Path(path)
        self._lock = threading.Lock()  # guards the in-memory peers; never held while touching the disk
        self._db_lock = threading.Lock()  # guards the SQLite connection
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")  # `crowdtrain ban` may hold the write lock briefly
        self._db.executescript(_SCHEMA)
        existing = {row[1] for row in self._db.execute("PRAGMA table_info(peers)")}
        for name in _NAMES:
            if name not in existing:
                self._db.execute(f"ALTER TABLE peers ADD COLUMN {name} {_sql_type(name)}")
        self._db.execute("CREATE INDEX IF NOT EXISTS peers_by_dht_id ON peers (dht_peer_id)")
        rows = self._db.execute(f"SELECT {', '.join(_NAMES)} FROM peers").fetchall()
        self._peers: dict[str, PeerRecord] = {}
        self._by_dht: dict[str, set[str]] = {}  # dht_peer_id -> session ids
        for record in map(_to_record, rows):
            if not record.peer_id:  # a database from before public ids: give each session one
                record = dataclasses.replace(record, peer_id=secrets.token_hex(6))
                self._db.execute(
                    "UPDATE peers SET peer_id = ? WHERE session_id = ?", (record.peer_id, record.session_id)
                )
            self._remember(record)
        self._banned_dht: frozenset[str] = frozenset(
            row[0] for row in self._db.execute("SELECT dht_peer_id FROM banned_dht_ids")
        )
        self._dirty: set[str] = set()
        self._data_version = None
        self.flush_interval_s = flush_interval_s
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_interval_s > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="store-flush", daemon=True)
            self._flusher.start()

    def close(self) -> None:
        """Flush pending writes and close; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush()
        with self._db_lock:
            self._db.close()

    def _flush_loop(self) -> None:
        while not self._closed.wait(self.flush_interval_s):
            try:
                self.flush()
            except sqlite3.Error as e:  # a locked or full disk must not kill the flusher
                logger.warning("could not write peer updates to %s: %s; will retry", self.path, e)

    def flush(self) -> None:
        """Write heartbeat updates behind, and pick up bans made by `crowdtrain ban`."""
        with self._db_lock:
            with self._lock:
                dirty = [self._peers[sid] for sid in self._dirty]
                self._dirty.clear()
            if dirty:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany(_UPSERT, [_row(r) for r in dirty])
            # another process (`crowdtrain ban`) committed: re-read the bans
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._data_version = version
        self.reload_bans()

    def reload_bans(self) -> None:
        """Re-read which sessions and DHT identities are banned (and why) from the database."""
        with self._db_lock:  # held while applying: a ban written meanwhile is applied after this
            rows = self._db.execute("SELECT session_id, ban_reason FROM peers WHERE banned = 1").fetchall()
            self._banned_dht = frozenset(
                row[0] for row in self._db.execute("SELECT dht_peer_id FROM banned_dht_ids")
            )
            banned = {sid: reason or "" for sid, reason in rows}
            with self._lock:
                for sid, record in self._peers.items():
                    if (record.banned, record.ban_reason) != (sid in banned, banned.get(sid, "")):
                        self._peers[sid] = dataclasses.replace(
                            record, banned=sid in banned, ban_reason=banned.get(sid, "")
                        )

    # ------------------------------------------------------------------ meta

    @contextlib.contextmanager
    def transaction(self):
        """The connection in one write transaction, atomic across processes (`invites`, `evidence`)."""
        with self._db_lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        with self._db_lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, items: dict[str, str]) -> None:
        """Set several keys in one transaction (all or nothing)."""
        with self._db_lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(items.items())
            )

    # ------------------------------------------------------------------ peers

    def upsert_peer(self, record: PeerRecord, durable: bool = True) -> None:
        """Insert or update a peer; `durable=False` defers the write to the next flush.

        `banned` and `ban_reason` are only ever changed by bans (`set_banned`, `ban_dht_identity`,
        a revoked invite), so a heartbeat racing with `crowdtrain ban` cannot undo a ban.
        """
        with self._lock:
            previous = self._peers.get(record.session_id)
            if previous is not None and (previous.banned, previous.ban_reason) != (
                record.banned,
                record.ban_reason,
            ):
                record = dataclasses.replace(record, banned=previous.banned, ban_reason=previous.ban_reason)
            self._remember(record)
            if not (durable or self.flush_interval_s <= 0):
                self._dirty.add(record.session_id)
                return
        with self._db_lock:
            with self._lock:  # write the newest state, whichever writer got here first
                latest = self._peers[record.session_id]
                self._dirty.discard(record.session_id)
            self._db.execute(_UPSERT, _row(latest))

    def get_peer(self, session_id: str) -> PeerRecord | None:
        with self._lock:
            return self._peers.get(session_id)

    def list_peers(self) -> list[PeerRecord]:
        with self._lock:
            peers = list(self._peers.values())
        return sorted(peers, key=lambda p: p.joined_unix_s)

    def peers_unordered(self) -> list[PeerRecord]:
        with self._lock:
            return list(self._peers.values())

    def count_peers(self) -> int:
        with self._lock:
            return len(self._peers)

    def mark_dht_seen(self, dht_peer_id: str, now: float, epoch: int, samples_per_s: float = 0.0) -> bool:
        """Note that `dht_peer_id` is in the swarm's progress records; False if no peer has proven
        that id (an unproven claim is not linked to the record, nor to its credit).

        Heartbeating peers get `dht_last_seen_unix_s`; DHT-only peers also get their liveness and
        progress from the record, since they send nothing else.
        """
        with self._lock:
            sessions = [
                sid
                for sid in self._by_dht.get(dht_peer_id, ())
                if self._peers[sid].dht_verified or self._peers[sid].source == "dht"
            ]
            for sid in sessions:
                record = self._peers[sid]
                if record.source == "dht":
                    record = dataclasses.replace(
                        record, last_seen_unix_s=now, local_epoch=epoch, samples_per_s=samples_per_s
                    )
                self._peers[sid] = dataclasses.replace(record, dht_last_seen_unix_s=now)
                self._dirty.add(sid)
            return bool(sessions)

    def set_banned(self, who: str, banned: bool, reason: str = "") -> int:
        """Ban (or unban) by identity, never by display name: every session whose public peer id or
        session id is `who`, or whose proven DHT peer id is `who`; their proven DHT identities are
        banned too (`banned_dht_ids`), so a new session proving one of them is refused. Returns the
        number of sessions changed (plus one when unbanning `who` lifts a ban on a DHT identity that
        no session proved, e.g. an automatic ban of a peer that never joined)."""
        with self._lock:
            matched = [
                r
                for r in self._peers.values()
                if who in (r.peer_id, r.session_id) or (r.dht_verified and r.dht_peer_id == who)
            ]
            bare = not banned and who in self._banned_dht and not matched
        dht_ids = {r.dht_peer_id for r in matched if r.dht_verified and r.dht_peer_id} | (
            {who} if bare else set()
        )
        self._write_bans([r.session_id for r in matched], sorted(dht_ids), banned, reason)
        return len(matched) + int(bare)

    def ban_dht_identity(self, dht_peer_id: str, reason: str) -> int:
        """Ban a DHT identity, whether or not any session proved it, and every session that proved
        it, saying `reason` (automatic bans on evidence); returns the number of sessions banned."""
        with self._lock:
            sessions = [sid for sid in self._by_dht.get(dht_peer_id, ()) if self._peers[sid].dht_verified]
        self._write_bans(sessions, [dht_peer_id], True, reason)
        return len(sessions)

    def _write_bans(self, sessions: list[str], dht_ids: list[str], banned: bool, reason: str) -> None:
        reason = reason if banned else ""
        with self._db_lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE peers SET banned = ?, ban_reason = ? WHERE session_id = ?",
                [(int(banned), reason, s) for s in sessions],
            )
            sql = (
                "INSERT OR IGNORE INTO banned_dht_ids VALUES (?)"
                if banned
                else ("DELETE FROM banned_dht_ids WHERE dht_peer_id = ?")
            )
            self._db.executemany(sql, [(d,) for d in dht_ids])
        with self._lock:
            for sid in sessions:
                self._peers[sid] = dataclasses.replace(self._peers[sid], banned=banned, ban_reason=reason)
            self._banned_dht = (
                (self._banned_dht | set(dht_ids)) if banned else (self._banned_dht - set(dht_ids))
            )

    def banned_dht_ids(self) -> frozenset[str]:
        """Banned DHT identities: by the operator or automatically (re-read at every flush when
        another process bans)."""
        return self._banned_dht

    def delete_peers(self, session_ids: list[str]) -> None:
        """Forget sessions for good (pruned sybils and abandoned joins)."""
        with self._lock:
            for sid in session_ids:
                record = self._peers.pop(sid, None)
                self._dirty.discard(sid)
                if record is not None and record.dht_peer_id:
                    self._by_dht.get(record.dht_peer_id, set()).discard(sid)
        with self._db_lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM peers WHERE session_id = ?", [(s,) for s in session_ids])

    def _remember(self, record: PeerRecord) -> None:
        """Put a record in memory and keep the DHT-id index current; call with the lock held."""
        previous = self._peers.get(record.session_id)
        if previous is not None and previous.dht_peer_id != record.dht_peer_id:
            self._by_dht.get(previous.dht_peer_id, set()).discard(record.session_id)
        self._peers[record.session_id] = record
        if record.dht_peer_id:
            self._by_dht.setdefault(record.dht_peer_id, set()).add(record.session_id)

    # ------------------------------------------------------------------ contributions and history

    def add_contributions(self, rows: list[tuple[str, int, int]]) -> None:
        """Record (dht_peer_id, epoch, samples); a later, larger count for the same epoch wins.
        Samples are clamped to 0..MAX_LEDGER_SAMPLES, so no SUM over the ledger can overflow."""
        rows = [(peer, epoch, min(max(0, samples), MAX_LEDGER_SAMPLES)) for peer, epoch, samples in rows]
        if not rows:
            return
        with self._db_lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO contributions (dht_peer_id, epoch, samples) VALUES (?, ?, ?) "
                "ON CONFLICT (dht_peer_id, epoch) DO UPDATE SET samples = MAX(samples, excluded.samples)",
                rows,
            )

    def contribution_totals(self) -> dict[str, int]:
        with self._db_lock:
            # TOTAL() sums in floating point: rows written before the clamp cannot overflow it
            rows = self._db.execute(
                "SELECT dht_peer_id, TOTAL(MAX(0, MIN(samples, ?))) FROM contributions GROUP BY dht_peer_id",
                (MAX_LEDGER_SAMPLES,),
            ).fetchall()
        return {peer_id: min(int(total), MAX_TOTAL_SAMPLES) for peer_id, total in rows}

    def add_rejection(self, t: float, step: int, reason: str) -> None:
        with self._db_lock:
            self._db.execute("INSERT INTO rejections (t, step, reason) VALUES (?, ?, ?)", (t, step, reason))

    def rejections(self, limit: int = 100) -> list[dict]:
        """Most recent first."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT t, step, reason FROM rejections ORDER BY t DESC LIMIT ?", (limit,)
            ).fetchall()
        return [{"t": t, "step": step, "reason": reason} for t, step, reason in rows]

    def append_history(
        self, t: float, global_epoch: int, samples_per_s: float, peers_training: int, train_loss: float | None
    ) -> None:
        with self._db_lock:
            self._db.execute(
                "INSERT INTO history (t, global_epoch, samples_per_s, peers_training, train_loss) VALUES (?, ?, ?, ?, ?)",
                (t, global_epoch, samples_per_s, peers_training, train_loss),
            )

    def history(self, max_points: int = 2000) -> list[dict]:
        """At most `max_points` rows spread evenly by rowid (first and last included), by time; reads only those."""
        with self._db_lock:
            rows = self._db.execute(
                "WITH RECURSIVE b(lo, hi, n) AS MATERIALIZED (SELECT lo, hi, min(max(2, :m), hi - lo + 1) FROM (SELECT (SELECT min(rowid) FROM history) AS lo, (SELECT max(rowid) FROM history) AS hi)), k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k, b WHERE i + 1 < n) "
                "SELECT t, global_epoch, samples_per_s, peers_training, train_loss FROM history WHERE rowid IN (SELECT lo + i * (hi - lo) / max(1, n - 1) FROM k, b) ORDER BY t",
                {"m": max_points},
            ).fetchall()
        keys = ("t", "global_epoch", "samples_per_s", "peers_training", "train_loss")
        return [dict(zip(keys, r, strict=True)) for r in rows[:max_points]]
