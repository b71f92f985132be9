"""This volunteer's admission to the swarm: its identity, the token its heartbeats renew, and what
it hands hivemind so that the swarm checks everyone else's (see peer/swarmauth.py).

    access = SwarmAccess(identity, manifest.run_id, run_key, cache_dir)
    heartbeat = HeartbeatReporter(..., on_token=access.on_token)      # the coordinator renews it
    access.wait_for_token(60, stop)                                    # admitted before dialing anyone
    dht = start_dht(..., identity_path=identity.path, authorizer=access.authorizer())
    access.attach(dht)                                                 # our token, published
    make_optimizer(..., gate=access.gate(dht))                         # averaging only with token holders
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from crowdtrain.peer.admission import parse_and_check
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.identity import PeerIdentity

logger = logging.getLogger(__name__)


class AdmissionError(CrowdtrainError):
    """The coordinator did not admit this peer to the swarm; the message says what to do."""


class SwarmAccess:
    def __init__(self, identity: PeerIdentity, run_id: str, run_key_hex: str, cache_dir: Path):
        from crowdtrain.peer.swarmauth import TokenFile

        self.identity, self.run_id, self.run_key_hex = identity, run_id, run_key_hex
        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # a token may come before any shard
        self.token_file = TokenFile(Path(cache_dir) / f"swarm-token-{identity.peer_id}.json")
        self._admitted = threading.Event()
        self._dht = None
        self.expires_unix_s = 0.0

    def on_token(self, token_json: str) -> None:
        """A token arrived in a heartbeat (heartbeat thread): check it, keep it, publish it."""
        token, reason = parse_and_check(
            token_json, self.run_id, self.run_key_hex, time.time(), peer_id=self.identity.peer_id
        )
        if token is None:
            logger.warning("the coordinator sent a swarm token that does not check (%s); ignored", reason)
            return
        self.token_file.write(token_json)
        first = not self._admitted.is_set()
        self._admitted.set()
        self.expires_unix_s = token.expires_unix_s
        if first:
            emit(
                logger,
                "admitted",
                "admitted to the swarm as %s (token valid for %.0fs, renewed by heartbeats)",
                self.identity.peer_id,
                token.expires_unix_s - time.time(),
                dht_peer_id=self.identity.peer_id,
                expires_unix_s=token.expires_unix_s,
            )
        if self._dht is not None:
            threading.Thread(
                target=self._publish, args=(token_json,), name="publish-token", daemon=True
            ).start()

    def wait_for_token(self, timeout_s: float, stop: threading.Event) -> None:
        """Block until the coordinator admitted us (or `stop`); AdmissionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._admitted.wait(0.2):
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise AdmissionError(
                    f"the coordinator did not admit this peer to the swarm within {timeout_s:.0f}s (no swarm "
                    "token in its heartbeat answers): it may be banned, or its invite or allowlist entry "
                    "revoked; ask the run's operator (`crowdtrain status` shows why), or raise --token-wait-s"
                )

    def authorizer(self):
        """hivemind's DHT authorizer for our node: our token on every request, theirs checked."""
        from crowdtrain.peer.swarmauth import SwarmAuthorizer

        return SwarmAuthorizer(
            self.run_id, self.run_key_hex, self.identity.hivemind_private_key(), self.token_file
        )

    def attach(self, dht) -> None:
        """The DHT is up: publish our token now and after every renewal."""
        self._dht = dht
        self._publish(self.token_file())

    def gate(self, dht):
        """Which peers our averagers talk to: those whose published token checks."""
        from crowdtrain.peer.swarmauth import AdmittedPeers

        return AdmittedPeers(dht, self.run_id, self.run_key_hex)

    def _publish(self, token_json: str) -> None:
        from crowdtrain.peer.swarmauth import publish_token

        if self._dht is not None and token_json:
            publish_token(self._dht, self.run_id, token_json)
