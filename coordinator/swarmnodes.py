"""The coordinator's own DHT nodes (the bootstrap node, the publisher's client node) in a swarm
that admits only token holders: each mints its own swarm token with the run's signing key and
publishes it, so peers answer its DHT requests and serve it state (peer/swarmauth.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from crowdtrain.peer.admission import Revocation, SwarmToken, sign_revocation, sign_token
from crowdtrain.peer.identity import PeerIdentity

logger = logging.getLogger(__name__)

COORDINATOR_TOKEN_TTL_S = 3600.0  # the coordinator's nodes re-mint their own tokens at half-life


class CoordinatorNodeAccess:
    """Identity, authorizer and token publishing of one coordinator DHT node."""

    def __init__(self, run_id: str, signing_key, identity_path: Path):
        from crowdtrain.coordinator.signing import public_key_hex
        from crowdtrain.peer.swarmauth import MintedTokens

        self.run_id, self.identity = run_id, PeerIdentity(identity_path)
        self.run_key_hex = public_key_hex(signing_key)

        def mint(expires_unix_s: float) -> str:
            token = SwarmToken(
                run_id, self.identity.peer_id, self.identity.rsa_public_openssh, expires_unix_s
            )
            return sign_token(signing_key, token).to_json()

        self.tokens = MintedTokens(mint, COORDINATOR_TOKEN_TTL_S)

    def authorizer(self):
        from crowdtrain.peer.swarmauth import SwarmAuthorizer

        return SwarmAuthorizer(
            self.run_id, self.run_key_hex, self.identity.hivemind_private_key(), self.tokens
        )

    def publish(self, dht) -> bool:
        """Publish this node's token (peers' averagers then answer its state downloads)."""
        from crowdtrain.peer.swarmauth import publish_token

        return publish_token(dht, self.run_id, self.tokens())


class RevocationPublisher:
    """Publishes, through the coordinator's DHT node, a revocation signed with the run's key for
    every banned DHT identity (`banned()`), valid `ttl_s` (the swarm tokens' lifetime: any token
    issued before the ban has expired by then) and republished at half-life while the ban lasts.
    The averagers' gate reads them (peer/swarmauth.py), so a ban reaches the swarm within a refresh.
    start() / shutdown() (idempotent) / context manager."""

    MAX_REVOCATIONS = 10_000  # what a reader reads at most

    def __init__(
        self,
        dht,
        run_id: str,
        signing_key,
        banned: Callable[[], frozenset[str]],
        ttl_s: float,
        interval_s: float = 2.0,
    ):
        self.dht, self.run_id, self.signing_key, self.banned = dht, run_id, signing_key, banned
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self._until: dict[str, float] = {}  # what we published, by peer id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self, now: float | None = None) -> int:
        """Publish what is new or due; how many revocations were stored."""
        from crowdtrain.peer.swarmauth import revocations_key
        from hivemind.utils import get_dht_time

        now = get_dht_time() if now is None else now
        stored = 0
        for peer_id in sorted(self.banned())[: self.MAX_REVOCATIONS]:
            if self._until.get(peer_id, 0.0) - now > self.ttl_s / 2:
                continue
            until = now + self.ttl_s
            revocation = sign_revocation(self.signing_key, Revocation(self.run_id, peer_id, until))
            try:
                ok = self.dht.store(
                    revocations_key(self.run_id),
                    subkey=peer_id,
                    value=revocation.to_json(),
                    expiration_time=until,
                    return_future=True,
                ).result(timeout=10)
            except Exception as e:  # the DHT is busy or restarting: the next round retries
                logger.warning("could not publish the revocation of %s: %r", peer_id, e)
                continue
            if ok:
                self._until[peer_id] = until
                stored += 1
                logger.info("published the revocation of banned peer %s (valid %.0fs)", peer_id, self.ttl_s)
        return stored

    def start(self) -> RevocationPublisher:
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish_once()
            except Exception:  # a bad round must not end the bans' publishing
                logger.exception("publishing revocations failed; retrying in %.0fs", self.interval_s)

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def __enter__(self) -> RevocationPublisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
