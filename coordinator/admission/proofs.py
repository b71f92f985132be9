"""A session's proof of its DHT identity: checked once, failures counted, banned identities told why.

A session is bound at Join to the identity it named and signed (`identity.verify_join`); its
heartbeats then prove that identity once more, against the session's own random challenge, before
anything it says about the swarm counts (`verify_dht_claim`). Each failed proof costs the
coordinator a signature check, so a session ends after `max_failed_proofs`. A banned identity is
refused with the reason and the way to appeal (`evidence.appeal`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from crowdtrain.coordinator.admission.bans import appeal
from crowdtrain.coordinator.admission.signatures import verify_dht_claim
from crowdtrain.coordinator.errors import BannedError, InvalidRequestError, UnauthenticatedError
from crowdtrain.coordinator.peers.health import PeerRecord
from crowdtrain.coordinator.peers.store import Store

logger = logging.getLogger(__name__)


def banned_message(store: Store, dht_id: str) -> str:
    """Why `dht_id` is refused, with what the volunteer can do about it."""
    rows = store.query(
        "SELECT reason FROM automatic_bans WHERE offender = ? ORDER BY t DESC LIMIT 1", (dht_id,)
    ) if _has_table(store, "automatic_bans") else []  # fmt: skip
    why = rows[0][0] if rows else "banned by the run's operator"
    if appeal(dht_id) not in why:
        why = f"{why}; {appeal(dht_id)}"
    return f"this peer's identity {dht_id} is banned ({why}); stop it"


def _has_table(store: Store, name: str) -> bool:
    return bool(store.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


class IdentityProofs:
    """Verifies heartbeats' DHT proofs for the servicer and counts the failed ones per session."""

    def __init__(self, store: Store, max_failed_proofs: int = 3):
        self.store, self.max_failed = store, max_failed_proofs
        self._failed: dict[str, int] = {}  # session id -> failed proofs
        self._lock = threading.Lock()

    def prove(self, record: PeerRecord, public_key: bytes, signature: bytes) -> PeerRecord:
        """The record with its identity proven; `InvalidRequestError` saying why the proof fails
        (`UnauthenticatedError` once the session ran out of tries), `BannedError` for a banned one."""
        ok, reason = verify_dht_claim(
            record.dht_peer_id, public_key, signature, bytes.fromhex(record.dht_challenge)
        )
        if not ok:
            self._failed_once(record)
            raise InvalidRequestError(f"dht_public_key/dht_signature: {reason}")
        with self._lock:
            self._failed.pop(record.session_id, None)
        if record.dht_peer_id in self.store.banned_dht_ids():
            raise BannedError(banned_message(self.store, record.dht_peer_id))
        logger.info("peer %r (id %s) proved DHT identity %s", record.name, record.peer_id, record.dht_peer_id)
        return dataclasses.replace(record, dht_verified=True, proven_key_hex=public_key.hex())

    def _failed_once(self, record: PeerRecord) -> None:
        with self._lock:
            failed = self._failed.get(record.session_id, 0) + 1
            self._failed[record.session_id] = failed
            if failed >= self.max_failed:
                self._failed.pop(record.session_id, None)
        if failed >= self.max_failed:
            self.store.delete_peers([record.session_id])
            raise UnauthenticatedError(f"{failed} failed identity proofs: this session ended; join again")

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._failed.pop(session_id, None)
