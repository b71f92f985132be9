"""Ed25519 session keys: what signs each DHT request and response, vouched for by the identity key.

A swarm token (peer/admission/tokens.py) names the holder's RSA-2048 identity key: that key is the
libp2p peer id, the one the coordinator checked, and it stays so (a volunteer's peer id, credit and
allowlist entry survive restarts). Signing every DHT request and response with it cost 30% of a
DHT process's time (docs/performance.md). So the node makes an Ed25519 key when it starts (never
written anywhere) and signs, once per token with the identity key, a `delegation` naming the run,
the token (by its run signature: the delegation lives exactly as long as the token) and the session
key. Every request and response is then signed with the session key. hivemind's `AccessToken`
carries all of it: `username` the token, `public_key` the 32-byte session key, `signature` the
identity key's delegation.

A verifier checks the token (the run's key), the delegation (the RSA key the token names) once per
(token, session key), then one Ed25519 signature per message. A stolen token (tokens are public in
the DHT) is useless without the identity key: no delegation of another session key verifies.
Pure but for the key objects: no clock, no I/O.
"""

from __future__ import annotations

import base64
import json

from crowdtrain.peer.admission.tokens import SwarmToken
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

DELEGATION_CONTEXT = b"crowdtrain swarm session key v1\n"  # never a token's, a manifest's or a record's
SESSION_KEY_BYTES = 32  # a raw Ed25519 public key; an RSA key in OpenSSH form is ~370 bytes
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
OLD_SCHEME_REASON = (
    "signed the old way (an RSA key in its access token: crowdtrain before Ed25519 session keys); "
    "that peer must update crowdtrain to take part"
)


def delegation_message(token: SwarmToken, session_public_key: bytes) -> bytes:
    """What the identity key signs: this session key speaks for the holder of exactly this token."""
    body = {
        "run_id": token.run_id,
        "peer_id": token.peer_id,
        "token_signature": token.signature,
        "session_key": session_public_key.hex(),
    }
    return DELEGATION_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_delegation(identity_key, token: SwarmToken, session_public_key: bytes) -> bytes:
    """The delegation signed by `identity_key` (hivemind's RSAPrivateKey: base64 RSA-PSS, its format)."""
    return identity_key.sign(delegation_message(token, session_public_key))


def check_delegation(token: SwarmToken, session_public_key: bytes, delegation: bytes) -> tuple[bool, str]:
    """Whether `delegation` is the token's RSA key vouching for `session_public_key`, and why not.
    The token itself (run key, expiry) is the caller's to check."""
    if len(session_public_key) != SESSION_KEY_BYTES:
        return False, OLD_SCHEME_REASON
    try:
        identity = serialization.load_ssh_public_key(token.public_key)
        signature = base64.b64decode(delegation, validate=True)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        return False, f"the token's key or the delegation is malformed ({e})"
    if not isinstance(identity, rsa.RSAPublicKey):
        return False, "the token names a key that is not RSA"
    try:
        identity.verify(signature, delegation_message(token, session_public_key), _PSS, hashes.SHA256())
    except InvalidSignature:
        return False, "the session key is not vouched for by the identity key the token names"
    return True, "the token's identity key vouches for this session key"


class SessionKey:
    """An Ed25519 key for one node's lifetime. Picklable (as its raw bytes) for processes that are
    spawned; hivemind forks its DHT process, which keeps the same key."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey | None = None):
        self._key = private_key or ed25519.Ed25519PrivateKey.generate()
        self.public_bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __getstate__(self) -> dict:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return {"raw": raw}

    def __setstate__(self, state: dict) -> None:
        self.__init__(ed25519.Ed25519PrivateKey.from_private_bytes(state["raw"]))


def verify_session_signature(session_public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is the session key's Ed25519 signature of `data`."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(session_public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
