"""The coordinator's durable state in SQLite (WAL): run metadata and every peer it has seen.

One connection guarded by a lock; every write is its own transaction, so a coordinator killed at
any moment restarts with everything it acknowledged.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

from coordinator.registry import PeerRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    session_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    joined_unix_s REAL NOT NULL,
    last_seen_unix_s REAL NOT NULL,
    phase TEXT NOT NULL,
    left_unix_s REAL,
    left_reason TEXT NOT NULL DEFAULT '',
    dht_peer_id TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    shard_index INTEGER NOT NULL DEFAULT 0,
    samples_per_s REAL NOT NULL DEFAULT 0,
    local_epoch INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    uptime_s REAL NOT NULL DEFAULT 0,
    samples_total INTEGER NOT NULL DEFAULT 0,
    swarm_size INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'heartbeat',
    dht_last_seen_unix_s REAL,
    banned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS peers_by_dht_id ON peers (dht_peer_id);
-- samples each peer accumulated towards each epoch, from the swarm's progress records
CREATE TABLE IF NOT EXISTS contributions (
    dht_peer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (dht_peer_id, epoch)
);
-- one row per monitor tick: the swarm over time
CREATE TABLE IF NOT EXISTS history (
    t REAL NOT NULL,
    global_epoch INTEGER NOT NULL,
    samples_per_s REAL NOT NULL,
    peers_training INTEGER NOT NULL,
    train_loss REAL
);
"""
# columns added after the first release; ALTERed into older databases at open
_ADDED_COLUMNS = {
    "source": "TEXT NOT NULL DEFAULT 'heartbeat'",
    "dht_last_seen_unix_s": "REAL",
    "banned": "INTEGER NOT NULL DEFAULT 0",
}
_PEER_FIELDS = [f.name for f in dataclasses.fields(PeerRecord)]


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        existing = {row[1] for row in self._db.execute("PRAGMA table_info(peers)")}
        for column, decl in _ADDED_COLUMNS.items():
            if existing and column not in existing:
                self._db.execute(f"ALTER TABLE peers ADD COLUMN {column} {decl}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, items: dict[str, str]) -> None:
        """Set several keys in one transaction (all or nothing)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(items.items())
            )

    # ------------------------------------------------------------------ peers

    def upsert_peer(self, record: PeerRecord) -> None:
        """Insert or update a peer. `banned` is only ever set by `set_banned` (the operator), so a
        heartbeat racing with `crowdtrain ban` cannot undo a ban."""
        row = dataclasses.asdict(record)
        if row["loss"] != row["loss"]:  # NaN is stored as NULL
            row["loss"] = None
        placeholders = ", ".join("?" for _ in _PEER_FIELDS)
        updates = ", ".join(
            f"{name} = excluded.{name}" for name in _PEER_FIELDS if name not in ("session_id", "banned")
        )
        with self._lock:
            self._db.execute(
                f"INSERT INTO peers ({', '.join(_PEER_FIELDS)}) VALUES ({placeholders}) "
                f"ON CONFLICT (session_id) DO UPDATE SET {updates}",
                [row[name] for name in _PEER_FIELDS],
            )

    def get_peer(self, session_id: str) -> PeerRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_PEER_FIELDS)} FROM peers WHERE session_id = ?", (session_id,)
            ).fetchone()
        return self._to_record(row) if row else None

    def list_peers(self) -> list[PeerRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_PEER_FIELDS)} FROM peers ORDER BY joined_unix_s"
            ).fetchall()
        return [self._to_record(r) for r in rows]

    def get_peer_by_dht_id(self, dht_peer_id: str) -> PeerRecord | None:
        """The most recent session that reported this DHT peer id."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_PEER_FIELDS)} FROM peers WHERE dht_peer_id = ? "
                "ORDER BY last_seen_unix_s DESC LIMIT 1",
                (dht_peer_id,),
            ).fetchone()
        return self._to_record(row) if row else None

    def mark_dht_seen(self, dht_peer_id: str, now: float, epoch: int, samples_per_s: float = 0.0) -> bool:
        """Note that `dht_peer_id` is in the swarm's progress records; False if no peer has that id.

        Heartbeating peers get `dht_last_seen_unix_s`; DHT-only peers also get their liveness and
        progress from the record, since they send nothing else.
        """
        with self._lock, self._db:
            self._db.execute("BEGIN")
            hb = self._db.execute(
                "UPDATE peers SET dht_last_seen_unix_s = ? WHERE dht_peer_id = ? AND source = 'heartbeat'",
                (now, dht_peer_id),
            ).rowcount
            dht = self._db.execute(
                "UPDATE peers SET dht_last_seen_unix_s = ?, last_seen_unix_s = ?, local_epoch = ?, samples_per_s = ? "
                "WHERE dht_peer_id = ? AND source = 'dht'",
                (now, now, epoch, samples_per_s, dht_peer_id),
            ).rowcount
        return bool(hb or dht)

    def set_banned(self, who: str, banned: bool) -> int:
        """Ban (or unban) every session whose name, session id or DHT peer id is `who`."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE peers SET banned = ? WHERE name = ? OR session_id = ? OR dht_peer_id = ?",
                (int(banned), who, who, who),
            )
            return cursor.rowcount

    def is_banned(self, name: str, dht_peer_id: str = "") -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM peers WHERE banned = 1 AND (name = ? OR (dht_peer_id != '' AND dht_peer_id = ?)) LIMIT 1",
                (name, dht_peer_id),
            ).fetchone()
        return row is not None

    # ------------------------------------------------------------------ contributions and history

    def add_contributions(self, rows: list[tuple[str, int, int]]) -> None:
        """Record (dht_peer_id, epoch, samples); a later, larger count for the same epoch wins."""
        if not rows:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO contributions (dht_peer_id, epoch, samples) VALUES (?, ?, ?) "
                "ON CONFLICT (dht_peer_id, epoch) DO UPDATE SET samples = MAX(samples, excluded.samples)",
                rows,
            )

    def contribution_totals(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT dht_peer_id, SUM(samples) FROM contributions GROUP BY dht_peer_id"
            )
            return {peer_id: int(total) for peer_id, total in rows}

    def append_history(
        self, t: float, global_epoch: int, samples_per_s: float, peers_training: int, train_loss: float | None
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO history (t, global_epoch, samples_per_s, peers_training, train_loss) VALUES (?, ?, ?, ?, ?)",
                (t, global_epoch, samples_per_s, peers_training, train_loss),
            )

    def history(self, since_unix_s: float = 0.0, max_points: int = 2000) -> list[dict]:
        """History rows since a time, thinned evenly to at most `max_points`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t, global_epoch, samples_per_s, peers_training, train_loss FROM history WHERE t >= ? ORDER BY t",
                (since_unix_s,),
            ).fetchall()
        step = max(1, -(-len(rows) // max_points))
        keys = ("t", "global_epoch", "samples_per_s", "peers_training", "train_loss")
        return [dict(zip(keys, r, strict=True)) for r in rows[::step]]

    def count_peers(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM peers").fetchone()[0]

    @staticmethod
    def _to_record(row) -> PeerRecord:
        values = dict(zip(_PEER_FIELDS, row, strict=True))
        if values["loss"] is None:
            values["loss"] = float("nan")
        values["banned"] = bool(values["banned"])
        return PeerRecord(**values)
