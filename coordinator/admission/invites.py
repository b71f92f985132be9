"""Invite codes for runs that admit by invitation (`--admission invite`).

    crowdtrain invite create --data-dir D [--uses N] [--expires-in-s S] [--note TEXT]   prints a code
    crowdtrain invite list --data-dir D                        id, uses left, expiry, note (never codes)
    crowdtrain invite revoke --data-dir D ID                   refuses the code and ends its sessions

A code is `secrets.token_urlsafe(24)` (192 random bits); the store keeps only its sha256, so a copy
of the database admits no one. A Join in invite mode consumes one use in one SQLite transaction
(`BEGIN IMMEDIATE`), so two joiners racing for a code's last use cannot both get in, even from two
coordinator processes. Each use binds the one identity that spent it (the key the joiner named and
signed at Join): that identity may come back without spending another use, no other identity
can, so one single-use invite admits exactly one swarm identity. Revoking an invite bans the sessions admitted with it: their heartbeats are
refused and their swarm tokens are not renewed, so they leave the swarm within one token lifetime.
The decision whether a code admits (`invite_usable`) is pure; `InviteBook` is its storage.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from dataclasses import dataclass

from crowdtrain.coordinator.peers.store import Store

logger = logging.getLogger(__name__)

CODE_BYTES = 24  # random bytes of a code: 32 URL-safe characters
MAX_NOTE_CHARS = 200

_SCHEMA = (
    # the one identity each use of an invite admitted: it may come back, no other identity may
    """CREATE TABLE IF NOT EXISTS invite_uses (
        invite_id TEXT NOT NULL,
        dht_peer_id TEXT NOT NULL,
        t REAL NOT NULL,
        PRIMARY KEY (invite_id, dht_peer_id)
    )""",
    """CREATE TABLE IF NOT EXISTS invites (
        invite_id TEXT PRIMARY KEY,
        code_sha256 TEXT NOT NULL UNIQUE,
        uses_left INTEGER NOT NULL,
        expires_unix_s REAL,
        note TEXT NOT NULL,
        created_unix_s REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    )""",
)


@dataclass(frozen=True)
class Invite:
    invite_id: str  # public handle, for `list` and `revoke`; never the code
    uses_left: int
    expires_unix_s: float | None  # None: never expires
    note: str
    created_unix_s: float
    revoked: bool = False


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def invite_usable(invite: Invite | None, now: float, returning: bool = False) -> tuple[bool, str]:
    """Whether an invite admits one more joiner at `now`, and why not (the joiner reads the reason).
    A `returning` joiner (the identity this invite admitted, restarted) needs no use left:
    restarting a peer does not use up its single-use code."""
    if invite is None:
        return False, "this invite code is not one of this run's; check it, or ask the run's operator for one"
    if invite.revoked:
        return False, f"invite {invite.invite_id} was revoked by the operator; ask them for a new code"
    if invite.expires_unix_s is not None and now >= invite.expires_unix_s:
        return False, f"invite {invite.invite_id} expired; ask the run's operator for a new code"
    if returning:
        return True, f"invite {invite.invite_id}: an identity it admitted before returns (no use spent)"
    if invite.uses_left <= 0:
        return False, f"invite {invite.invite_id} is used up; ask the run's operator for a new code"
    return True, f"invite {invite.invite_id} ({invite.uses_left} use(s) left before this one)"


def _invite(row) -> Invite:
    invite_id, uses_left, expires, note, created, revoked = row
    return Invite(invite_id, uses_left, expires, note, created, bool(revoked))


_COLUMNS = "invite_id, uses_left, expires_unix_s, note, created_unix_s, revoked"


class InviteBook:
    """The invites in a coordinator's store (its SQLite file, shared with `crowdtrain invite`)."""

    def __init__(self, store: Store):
        self.store = store
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def create(
        self, now: float, uses: int = 1, expires_in_s: float = 0.0, note: str = ""
    ) -> tuple[str, Invite]:
        """(code, invite): the code is shown once, to the operator; only its hash is kept."""
        from crowdtrain.peer.display import clean_display

        if uses < 1:
            raise ValueError(f"an invite needs at least 1 use, got {uses}")
        if not (math.isfinite(expires_in_s) and expires_in_s >= 0):
            raise ValueError(f"expires_in_s must be a finite number >= 0 (0: never), got {expires_in_s}")
        code = secrets.token_urlsafe(CODE_BYTES)
        invite = Invite(
            invite_id=secrets.token_hex(4),
            uses_left=uses,
            expires_unix_s=now + expires_in_s if expires_in_s > 0 else None,
            note=clean_display(note, MAX_NOTE_CHARS),
            created_unix_s=now,
        )
        with self.store.transaction() as db:
            db.execute(
                f"INSERT INTO invites ({_COLUMNS}, code_sha256) VALUES (?, ?, ?, ?, ?, 0, ?)",
                (invite.invite_id, uses, invite.expires_unix_s, invite.note, now, code_sha256(code)),
            )
        logger.info("created invite %s (%d use(s))", invite.invite_id, uses)
        return code, invite

    def list(self) -> list[Invite]:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM invites ORDER BY created_unix_s")
        return [_invite(row) for row in rows]

    def consume(self, code: str, now: float, dht_peer_id: str) -> tuple[Invite | None, str]:
        """(invite, reason) when `code` admits the identity `dht_peer_id` (proven at Join): an
        identity this invite admitted before comes back without spending a use; any other spends one
        and is bound to it. Else (None, why). The check and the spending are one transaction."""
        with self.store.transaction() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM invites WHERE code_sha256 = ?", (code_sha256(code),)
            ).fetchone()
            invite = _invite(row) if row else None
            back = invite is not None and bool(
                db.execute(
                    "SELECT 1 FROM invite_uses WHERE invite_id = ? AND dht_peer_id = ?",
                    (invite.invite_id, dht_peer_id),
                ).fetchone()
            )
            ok, reason = invite_usable(invite, now, back)
            if not ok or back:
                return (invite if ok else None), reason
            db.execute(
                "UPDATE invites SET uses_left = uses_left - 1 WHERE invite_id = ?", (invite.invite_id,)
            )
            db.execute(
                "INSERT INTO invite_uses (invite_id, dht_peer_id, t) VALUES (?, ?, ?)",
                (invite.invite_id, dht_peer_id, now),
            )
        return invite, reason

    def identities(self, invite_id: str) -> list[str]:
        """The identities `invite_id` admitted, one per use spent."""
        rows = self.store.query(
            "SELECT dht_peer_id FROM invite_uses WHERE invite_id = ? ORDER BY t", (invite_id,)
        )
        return [row[0] for row in rows]

    def revoke(self, invite_id: str) -> int | None:
        """Revoke an invite and ban the sessions it admitted; the number of sessions ended, or None
        when there is no such invite."""
        reason = f"invite {invite_id} was revoked by the operator"
        with self.store.transaction() as db:
            found = db.execute("UPDATE invites SET revoked = 1 WHERE invite_id = ?", (invite_id,)).rowcount
            if not found:
                return None
            ended = db.execute(
                "UPDATE peers SET banned = 1, ban_reason = ? WHERE invite_id = ? AND banned = 0",
                (reason, invite_id),
            ).rowcount
        self.store.reload_bans()  # this process's view too (another process's flush re-reads them)
        logger.info("revoked invite %s; ended %d session(s)", invite_id, ended)
        return ended
