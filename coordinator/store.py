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
    swarm_size INTEGER NOT NULL DEFAULT 0
);
"""
_PEER_FIELDS = [f.name for f in dataclasses.fields(PeerRecord)]


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
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
        row = dataclasses.asdict(record)
        if row["loss"] != row["loss"]:  # NaN is stored as NULL
            row["loss"] = None
        placeholders = ", ".join("?" for _ in _PEER_FIELDS)
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO peers ({', '.join(_PEER_FIELDS)}) VALUES ({placeholders})",
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

    def count_peers(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM peers").fetchone()[0]

    @staticmethod
    def _to_record(row) -> PeerRecord:
        values = dict(zip(_PEER_FIELDS, row, strict=True))
        if values["loss"] is None:
            values["loss"] = float("nan")
        return PeerRecord(**values)
