"""The coordinator's own DHT nodes (the bootstrap node, the publisher's client node) in a swarm
that admits only token holders: each mints its own swarm token with the run's signing key and
publishes it, so peers answer its DHT requests and serve it state (peer/admission/access.py). The
bootstrap node keeps only the run's records, and so many (coordinator/admission/dhtstorage.py), and asks
no router for a port mapping; it publishes the run's revocations (`RevocationPublisher`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.admission.tokens import Revocation, SwarmToken, sign_revocation, sign_token

logger = logging.getLogger(__name__)

COORDINATOR_TOKEN_TTL_S = 3600.0  # the coordinator's nodes re-mint their own tokens at half-life


class CoordinatorNodeAccess:
    """Identity, authorizer and token publishing of one coordinator DHT node."""

    def __init__(self, run_id: str, signing_key, identity_path: Path):
        from crowdtrain.coordinator.signing import public_key_hex
        from crowdtrain.peer.admission.access import MintedTokens

        self.run_id, self.identity = run_id, PeerIdentity(identity_path)
        self.run_key_hex = public_key_hex(signing_key)

        def mint(expires_unix_s: float) -> str:
            token = SwarmToken(
                run_id, self.identity.peer_id, self.identity.rsa_public_openssh, expires_unix_s
            )
            return sign_token(signing_key, token).to_json()

        self.tokens = MintedTokens(mint, COORDINATOR_TOKEN_TTL_S)

    def authorizer(self):
        from crowdtrain.peer.admission.access import SwarmAuthorizer

        return SwarmAuthorizer(
            self.run_id, self.run_key_hex, self.identity.hivemind_private_key(), self.tokens
        )

    def start_bootstrap_node(self, *, listen_host: str, port: int, announce_host: str, limits=None):
        """The run's bootstrap DHT node (no initial peers), with this node's identity and token,
        storing only the run's records within `limits` (a DhtStorageLimits; default: its defaults)
        and without UPnP (`nat_port_map`): the operator opens the port of a server."""
        from crowdtrain.coordinator.admission.dhtstorage import (
            DhtStorageLimits,
            RunKeysValidator,
            cap_storage,
        )
        from crowdtrain.peer.swarm.wiring import start_dht

        limits = limits or DhtStorageLimits()
        dht = start_dht(
            [],
            listen_host=listen_host,
            port=port,
            announce_host=announce_host,
            identity_path=str(self.identity.path),
            authorizer=self.authorizer(),
            extra_validators=[RunKeysValidator(self.run_id)],
            nat_port_map=False,
        )
        try:
            cap_storage(dht, limits)
        except BaseException:
            dht.shutdown()
            raise
        return dht

    def publish(self, dht) -> bool:
        """Publish this node's token (peers' averagers then answer its state downloads)."""
        from crowdtrain.peer.admission.access import publish_token

        return publish_token(dht, self.run_id, self.tokens())


class RevocationPublisher:
    """Publishes, through the coordinator's DHT node, a revocation signed with the run's key for
    every banned DHT identity (`banned()`), valid `ttl_s` and republished at half-life while the ban
    lasts. `ttl_s` must be at least the swarm tokens' lifetime: a revocation voids the tokens that
    expire before its end, i.e. those issued before it, and a token issued after it (the ban was
    lifted) admits the peer again (peer/admission/tokens.py `gate_decision`). The averagers' gate reads
    them (peer/admission/access.py), so a ban reaches the swarm within a refresh; only the run's key can
    write them (peer/admission/dhtrecords.py). start() / shutdown() (idempotent) / context manager."""

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
        self.dht = dht
        self.run_id = run_id
        self.signing_key = signing_key
        self.banned = banned
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self._until: dict[str, float] = {}  # what we published, by peer id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self, now: float | None = None) -> int:
        """Publish what is new or due; how many revocations were stored."""
        from crowdtrain.peer.admission.dhtrecords import revocations_key
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
