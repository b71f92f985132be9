"""This volunteer's admission to the swarm: its identity, the token its heartbeats renew, and what
it hands hivemind so that the swarm checks everyone else's (below).

    access = SwarmAccess(identity, manifest.run_id, run_key, cache_dir)
    heartbeat = HeartbeatReporter(..., on_token=access.on_token)      # the coordinator renews it
    access.wait_for_token(60, stop)                                    # admitted before dialing anyone
    dht = start_dht(..., identity_path=identity.path, authorizer=access.authorizer())
    access.attach(dht)                                                 # our token, published
    make_optimizer(..., gate=access.gate(dht))                         # averaging only with token holders

The swarm admits only token holders: hivemind's DHT authorizer and the averagers' gate.

Two places refuse a peer without a valid swarm token (peer/admission/tokens.py):

- every DHT request and response (find, store, ping: so progress records, donor lists and
  matchmaking declarations) carries the sender's token and is signed by an Ed25519 session key the
  token's RSA identity key vouches for (peer/admission/sessionkeys.py), checked by `SwarmAuthorizer`,
  a hivemind `TokenAuthorizerBase` (DHT RPCs only, see docs/hivemind.md);
- averaging and state downloads, which hivemind does not authorize, ask `AdmittedPeers`: the peer
  ids whose tokens are published in the DHT under `<run_id>_swarm_tokens` (one record per holder,
  which only the holder can write: peer/admission/dhtrecords.py), each checked with the run's key, cached
  until it expires. peer/swarm/averaging.py consults it in rpc_join_group, rpc_aggregate_part,
  rpc_download_state and before an all-reduce. It also reads the coordinator's signed revocations
  under `<run_id>_swarm_revocations`: a banned peer is refused within a refresh (seconds), not only
  once its last token expires; a token issued after the revocation (the operator lifted the ban)
  admits it again (`gate_decision`).

A peer's own token comes from the coordinator through its heartbeats (`TokenFile`: written by the
peer, read by the DHT process, which hivemind forks and which therefore cannot share memory with
it); the coordinator's own DHT nodes mint theirs (`MintedTokens`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from crowdtrain.peer.admission.dhtrecords import (
    admission_validators,
    owner_subkey,
    revocation_record,
    revocations_key,
    token_record,
    tokens_key,
)
from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.admission.sessionkeys import (
    SessionKey,
    check_delegation,
    sign_delegation,
    verify_session_signature,
)
from crowdtrain.peer.admission.tokens import SwarmToken, gate_decision, parse_and_check
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase

logger = logging.getLogger(__name__)


class AdmissionError(CrowdtrainError):
    """The coordinator did not admit this peer to the swarm; the message says what to do."""


class SwarmAccess:
    def __init__(self, identity: PeerIdentity, run_id: str, run_key_hex: str, cache_dir: Path):

        self.identity = identity
        self.run_id = run_id
        self.run_key_hex = run_key_hex
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

        return SwarmAuthorizer(
            self.run_id, self.run_key_hex, self.identity.hivemind_private_key(), self.token_file
        )

    def attach(self, dht) -> None:
        """The DHT is up: publish our token now and after every renewal."""
        self._dht = dht
        self._publish(self.token_file())

    def gate(self, dht):
        """Which peers our averagers talk to: those whose published token checks."""

        return AdmittedPeers(dht, self.run_id, self.run_key_hex)

    def _publish(self, token_json: str) -> None:

        if self._dht is not None and token_json:
            publish_token(self._dht, self.run_id, token_json)


logger = logging.getLogger(__name__)

REFRESH_BEFORE_EXPIRY_S = 60.0  # a token this close to expiry is re-read (a renewed one is there)


class TokenFile:
    """The peer's current token, in a 0600 file: written when a heartbeat brings a new one, read by
    the DHT process's authorizer (a forked process: no shared memory). The authorizer asks for it on
    every DHT request; the file is read again at most every `reread_s` (renewals come minutes
    before expiry)."""

    def __init__(self, path: Path, reread_s: float = 1.0):
        self.path, self.reread_s = Path(path), reread_s
        self._text, self._read_at = "", -float("inf")

    def write(self, token_json: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token_json)
        os.replace(tmp, self.path)
        self._text, self._read_at = token_json, time.monotonic()

    def __call__(self) -> str:
        now = time.monotonic()
        if now - self._read_at >= self.reread_s:
            try:
                self._text = self.path.read_text()
            except OSError:
                self._text = ""
            self._read_at = now
        return self._text


class MintedTokens:
    """Tokens for one of the coordinator's own DHT nodes: `mint(expires_unix_s)` signs one; a new
    one is minted when less than half of `ttl_s` is left."""

    def __init__(self, mint: Callable[[float], str], ttl_s: float = 3600.0):
        self.mint, self.ttl_s = mint, ttl_s
        self._token, self._expires = "", 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            now = time.time()
            if self._expires - now < self.ttl_s / 2:
                self._expires = now + self.ttl_s
                self._token = self.mint(self._expires)
            return self._token


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer over swarm tokens, signing with an Ed25519 session key
    (peer/admission/sessionkeys.py): a request or response is accepted only with a token the run's
    key signed, unexpired, whose RSA identity key vouches for the session key that signed the
    message; requests stamped within hivemind's minute of our clock, each nonce once. The checks
    and their order are hivemind's `TokenAuthorizerBase`'s; only the per-message signature changed
    (Ed25519 instead of RSA-2048), and every refusal has a reason (`request_verdict`)."""

    MAX_CLOCK_SKEW_S = TokenAuthorizerBase._MAX_CLIENT_SERVICER_TIME_DIFF.total_seconds()
    MAX_VERIFIED = 4096  # (token, session key) pairs remembered as checked

    def __init__(
        self, run_id: str, run_public_key_hex: str, local_private_key, token_source: Callable[[], str]
    ):
        super().__init__(local_private_key)  # the identity key: vouches for the session key, signs records
        self.run_id = run_id
        self.run_public_key_hex = run_public_key_hex
        self.token_source = token_source
        self.session_key = SessionKey()  # made before hivemind forks the DHT process: both hold it
        self._verified: dict[tuple[str, bytes, bytes], float] = {}  # -> token expiry (checked once)

    async def get_token(self) -> AccessToken:
        text = self.token_source()
        token, reason = parse_and_check(text, self.run_id, self.run_public_key_hex, get_dht_time())
        if token is None:
            raise PermissionError(
                f"this peer holds no valid swarm token ({reason}); the coordinator issues one"
            )
        if token.public_key != self.local_public_key.to_bytes():
            raise PermissionError(
                "this peer's swarm token names another identity key than its DHT node's; the "
                "coordinator issues one for the key the peer proved (restart the peer)"
            )
        session = self.session_key.public_bytes
        return AccessToken(
            username=text,
            public_key=session,
            expiration_time=str(token.expires_unix_s),
            signature=sign_delegation(self._local_private_key, token, session),
        )

    def is_token_valid(self, access_token: AccessToken) -> bool:
        ok, reason = self.token_verdict(access_token)
        if not ok:
            logger.debug("refused a DHT peer: %s", reason)
        return ok

    def token_verdict(self, access_token: AccessToken) -> tuple[bool, str]:
        """Whether `access_token` admits its presenter at our clock, and why not: a run-signed
        token, unexpired, whose identity key vouches for the session key it carries."""
        now = get_dht_time()
        cached = (access_token.username, access_token.public_key, access_token.signature)
        expires = self._verified.get(cached)
        if expires is None:
            token, reason = parse_and_check(access_token.username, self.run_id, self.run_public_key_hex, now)
            if token is None:
                return False, reason
            ok, reason = check_delegation(token, access_token.public_key, access_token.signature)
            if not ok:
                return False, reason
            if len(self._verified) >= self.MAX_VERIFIED:
                self._verified = {k: e for k, e in self._verified.items() if e > now}
                if len(self._verified) >= self.MAX_VERIFIED:
                    self._verified.clear()
            self._verified[cached] = expires = token.expires_unix_s
        if now >= expires:
            return False, f"token expired {now - expires:.0f}s ago"
        return True, "a run-signed token whose identity key vouches for this session key"

    async def sign_request(self, request, service_public_key) -> None:
        await self.refresh_token_if_needed()
        auth = request.auth
        auth.client_access_token.CopyFrom(self._local_access_token)
        if service_public_key is not None:
            auth.service_public_key = service_public_key.to_bytes()
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(8)
        assert auth.signature == b""
        auth.signature = self.session_key.sign(request.SerializeToString())

    async def validate_request(self, request) -> bool:
        ok, reason = await self.request_verdict(request)
        if not ok:
            logger.debug("refused a DHT request: %s", reason)
        return ok

    async def request_verdict(self, request) -> tuple[bool, str]:
        """Whether we serve `request`, and why not (a nonce is remembered only when we do)."""
        await self.refresh_token_if_needed()
        auth = request.auth
        ok, reason = self.token_verdict(auth.client_access_token)
        if not ok:
            return False, f"the client's token: {reason}"
        if not _signed_by_session_key(request, auth.client_access_token.public_key):
            return False, "the request's signature does not verify with the client's session key"
        if auth.service_public_key and auth.service_public_key != self.local_public_key.to_bytes():
            return False, "the request was made for a node with another identity key"
        with self._recent_nonces.freeze():
            now = get_dht_time()
            if abs(auth.time - now) > self.MAX_CLOCK_SKEW_S:
                return False, (
                    f"the request is stamped {auth.time - now:+.0f}s from this node's clock (more than "
                    f"{self.MAX_CLOCK_SKEW_S:.0f}s: clocks apart, or a replay)"
                )
            if auth.nonce in self._recent_nonces:
                return False, "the request's nonce was seen before (a replay)"
        self._recent_nonces.store(auth.nonce, None, now + self.MAX_CLOCK_SKEW_S * 3)
        return True, "signed by an admitted peer's session key, fresh"

    async def sign_response(self, response, request) -> None:
        await self.refresh_token_if_needed()
        auth = response.auth
        auth.service_access_token.CopyFrom(self._local_access_token)
        auth.nonce = request.auth.nonce
        assert auth.signature == b""
        auth.signature = self.session_key.sign(response.SerializeToString())

    async def validate_response(self, response, request) -> bool:
        ok, reason = await self.response_verdict(response, request)
        if not ok:
            logger.debug("refused a DHT response: %s", reason)
        return ok

    async def response_verdict(self, response, request) -> tuple[bool, str]:
        await self.refresh_token_if_needed()
        auth = response.auth
        ok, reason = self.token_verdict(auth.service_access_token)
        if not ok:
            return False, f"the service's token: {reason}"
        if not _signed_by_session_key(response, auth.service_access_token.public_key):
            return False, "the response's signature does not verify with the service's session key"
        if auth.nonce != request.auth.nonce:
            return False, "the response answers another request (nonce)"
        return True, "signed by an admitted peer's session key, for our request"

    def record_validators(self) -> list:
        """The DHT record validators of a node with this authorizer: the run's admission records
        (peer/admission/dhtrecords.py), its own token record signed with this node's key."""
        return admission_validators(self.run_id, self.run_public_key_hex, self._local_private_key)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        try:
            expires = float(access_token.expiration_time)
        except ValueError:
            return True
        return (
            expires - get_dht_time() < REFRESH_BEFORE_EXPIRY_S or self.token_source() != access_token.username
        )


def _signed_by_session_key(message, session_public_key: bytes) -> bool:
    """Whether `message.auth.signature` is the session key's signature of `message` without it
    (the signature is put back: the message is left as it came)."""
    auth = message.auth
    signature, auth.signature = auth.signature, b""
    try:
        return verify_session_signature(session_public_key, message.SerializeToString(), signature)
    finally:
        auth.signature = signature


def publish_token(dht, run_id: str, token_json: str, timeout_s: float = 10.0) -> bool:
    """Store our token where the averagers of other peers look for it, under the subkey only our
    key can write (the DHT's validators sign it: its authorizer holds the key the token names);
    whether it was stored."""
    token = SwarmToken.from_json(token_json)
    try:
        return bool(
            dht.store(
                tokens_key(run_id),
                subkey=owner_subkey(token.public_key),
                value=token_json,
                expiration_time=token.expires_unix_s,
                return_future=True,
            ).result(timeout=timeout_s)
        )
    except Exception as e:  # the DHT is restarting or the token was refused: next renewal retries
        logger.warning("could not publish our swarm token in the DHT: %r", e)
        return False


class AdmittedPeers:
    """Which peer ids hold a valid token, for the averagers' RPC gate: `gate(peer_id) -> (ok, reason)`.

    Lives in the averager processes (created before hivemind forks them; the refresh thread starts
    in whichever process first asks). Reads `<run_id>_swarm_tokens` every `refresh_s`, and at once
    (at most every `min_refresh_s`) when asked about a peer it does not know."""

    def __init__(
        self, dht, run_id: str, run_public_key_hex: str, *, refresh_s: float = 5.0, min_refresh_s: float = 1.0
    ):
        self.dht = dht
        self.run_id = run_id
        self.run_public_key_hex = run_public_key_hex
        self.refresh_s, self.min_refresh_s = refresh_s, min_refresh_s
        self._expiry: dict[str, float] = {}
        self._revoked: dict[str, float] = {}  # peer id -> until (signed revocations)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = None
        self._last_refresh = 0.0

    def __call__(self, peer_id: str) -> tuple[bool, str]:
        if self._ensure_thread():  # first question in this process: read the tokens before answering
            try:
                self.refresh()
            except Exception as e:  # the DHT is slow or restarting: the thread tries again
                logger.debug("reading swarm tokens failed: %r", e)
        now = get_dht_time()
        with self._lock:
            expires, revoked_until = self._expiry.get(peer_id), self._revoked.get(peer_id, 0.0)
        admitted, reason = gate_decision(expires, revoked_until, now)
        if not admitted:
            self._wake.set()  # maybe it just got a (new) token: look again soon
        return admitted, reason

    def admitted(self) -> set[str]:
        now = get_dht_time()
        with self._lock:
            return {p for p, e in self._expiry.items() if gate_decision(e, self._revoked.get(p, 0.0), now)[0]}

    def _ensure_thread(self) -> bool:
        """Start the refresh thread in this process; whether it was just started."""
        if self._pid == os.getpid():
            return False
        self._pid = os.getpid()  # a forked copy starts its own thread (threads do not survive fork)
        self._lock, self._wake = threading.Lock(), threading.Event()
        threading.Thread(target=self._loop, name="swarm-tokens", daemon=True).start()
        return True

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.refresh_s)
            try:
                self.refresh()
            except Exception as e:  # the DHT is restarting: keep what we know, try again
                logger.debug("reading swarm tokens failed: %r", e)
            self._wake.clear()
            time.sleep(max(0.0, self.min_refresh_s - (time.monotonic() - self._last_refresh)))

    def refresh(self) -> int:
        """Read the published tokens (and revocations) once; returns how many valid tokens are known."""
        self._last_refresh = time.monotonic()
        now = get_dht_time()
        fresh = self._read(tokens_key(self.run_id), self._token_expiry, now)
        try:
            revoked = self._read(revocations_key(self.run_id), self._revocation_until, now)
        except Exception as e:  # tokens still count; revocations already read stay in force
            logger.debug("reading swarm revocations failed: %r", e)
            revoked = {}
        with self._lock:
            for peer_id, expires in fresh.items():
                self._expiry[peer_id] = max(expires, self._expiry.get(peer_id, 0.0))
            self._expiry = {p: e for p, e in self._expiry.items() if e > now - 3600}
            for peer_id, until in revoked.items():
                self._revoked[peer_id] = max(until, self._revoked.get(peer_id, 0.0))
            self._revoked = {p: u for p, u in self._revoked.items() if u > now}
            return sum(e > now for e in self._expiry.values())

    def _token_expiry(self, subkey, value, now: float) -> tuple[str, float] | None:
        """(holder's peer id, expiry) of a valid, unexpired token record (peer/admission/dhtrecords.py)."""
        token, _ = token_record(subkey, value, self.run_id, self.run_public_key_hex)
        return None if token is None or now >= token.expires_unix_s else (token.peer_id, token.expires_unix_s)

    def _revocation_until(self, subkey, value, now: float) -> tuple[str, float] | None:
        """(banned peer id, until) of a revocation in force, signed by the run's key."""
        revocation, _ = revocation_record(subkey, value, self.run_id, self.run_public_key_hex)
        if revocation is None or now >= revocation.until_unix_s:
            return None
        return revocation.peer_id, revocation.until_unix_s

    def _read(self, key: str, parse, now: float) -> dict[str, float]:
        """peer id -> latest time, for the records under `key` that `parse(subkey, value, now)`
        accepts. Checked again here though every honest node's validators checked them: the
        reader trusts no node's storage."""
        found = self.dht.get(key, latest=True, return_future=True).result(timeout=15)
        latest: dict[str, float] = {}
        if found is not None and isinstance(found.value, dict):
            for subkey, item in list(found.value.items())[:10_000]:
                parsed = parse(subkey, getattr(item, "value", None), now)
                if parsed is not None:
                    peer_id, until = parsed
                    latest[peer_id] = max(until, latest.get(peer_id, 0.0))
        return latest
