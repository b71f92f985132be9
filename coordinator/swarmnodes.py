"""The coordinator's own DHT nodes (the bootstrap node, the publisher's client node) in a swarm
that admits only token holders: each mints its own swarm token with the run's signing key and
publishes it, so peers answer its DHT requests and serve it state (peer/swarmauth.py)."""

from __future__ import annotations

from pathlib import Path

from crowdtrain.peer.admission import SwarmToken, sign_token
from crowdtrain.peer.identity import PeerIdentity

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
