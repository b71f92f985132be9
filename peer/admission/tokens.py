"""Swarm access tokens: who may take part in the swarm itself, not only talk to the coordinator.

The coordinator admits a peer (its operator's choice of `open`, `invite` or `allowlist`), checks
that the peer holds the private key of its hivemind identity (the DHT proof of peer/swarm/wiring.py's
`DhtIdentity`), then signs a short-lived `SwarmToken` with the run's Ed25519 key (the key the
manifest names and every peer already trusts). The token names the run, the holder's libp2p peer
id and the same RSA key in hivemind's `RSAPublicKey.to_bytes()` form (OpenSSH), and an expiry.
Honest peers refuse DHT requests (peer/admission/access.py, hivemind's authorizer) and averaging or
state requests (peer/swarm/averaging.py) from any identity without a valid token; the coordinator stops
renewing the tokens of banned or revoked peers (they leave within one token lifetime), and
publishes a signed `Revocation` for each banned identity, which the averagers' gate reads within
seconds. Pure: no hivemind, no clock (callers pass `now`), no I/O.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass

from crowdtrain.peer.checks import verify_hex

TOKEN_CONTEXT = b"crowdtrain swarm token v1\n"  # a token signature is never a manifest's or a checkpoint's
MAX_TOKEN_BYTES = 4096  # a token is ~700 bytes (an RSA-2048 key in OpenSSH form, a signature)
ADMISSION_MODES = ("open", "invite", "allowlist")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,64}$")  # base58 libp2p peer id
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class SwarmToken:
    run_id: str
    peer_id: str  # base58 libp2p peer id of the holder
    public_key: bytes  # the holder's RSA key as hivemind's RSAPublicKey.to_bytes() (OpenSSH)
    expires_unix_s: float
    signature: str = ""  # hex Ed25519 signature of `payload()` by the run's key

    def payload(self) -> bytes:
        """The signed bytes: a fixed context, then the fields as canonical JSON."""
        body = {
            "run_id": self.run_id,
            "peer_id": self.peer_id,
            "public_key": base64.b64encode(self.public_key).decode(),
            "expires_unix_s": round(float(self.expires_unix_s), 3),
        }
        return TOKEN_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        body = json.loads(self.payload()[len(TOKEN_CONTEXT) :])
        return json.dumps({**body, "signature": self.signature}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SwarmToken:
        """Parse a token (ValueError when it is not one); its signature is checked by `verify`."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="strict")
        if len(text) > MAX_TOKEN_BYTES:
            raise ValueError(f"a swarm token is at most {MAX_TOKEN_BYTES} bytes, got {len(text)}")
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {
            "run_id",
            "peer_id",
            "public_key",
            "expires_unix_s",
            "signature",
        }:
            raise ValueError(
                "a swarm token has exactly run_id, peer_id, public_key, expires_unix_s, signature"
            )
        fields = (data["run_id"], data["peer_id"], data["public_key"], data["signature"])
        if not all(isinstance(v, str) for v in fields):
            raise ValueError("swarm token fields have the wrong types")
        expires = data["expires_unix_s"]
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
            raise ValueError("swarm token expiry is not a number")
        if not _RUN_ID.match(data["run_id"]) or not _PEER_ID.match(data["peer_id"]):
            raise ValueError("swarm token names a malformed run id or peer id")
        return cls(
            run_id=data["run_id"],
            peer_id=data["peer_id"],
            public_key=base64.b64decode(data["public_key"], validate=True),
            expires_unix_s=float(expires),
            signature=data["signature"],
        )


def sign_token(private_key, token: SwarmToken) -> SwarmToken:
    """`token` signed by `private_key` (a cryptography Ed25519PrivateKey: the run's signing key)."""
    return SwarmToken(
        token.run_id,
        token.peer_id,
        token.public_key,
        token.expires_unix_s,
        private_key.sign(token.payload()).hex(),
    )


def check_token(
    token: SwarmToken, run_id: str, run_public_key_hex: str, now: float, peer_id: str | None = None
) -> tuple[bool, str]:
    """Whether `token` admits its holder (or, given, `peer_id`) to run `run_id` at `now`, and why not."""
    if token.run_id != run_id:
        return False, f"token is for run {token.run_id!r}, not {run_id!r}"
    if peer_id is not None and token.peer_id != peer_id:
        return False, f"token belongs to peer {token.peer_id}, presented by {peer_id}"
    if now >= token.expires_unix_s:
        return False, f"token expired {now - token.expires_unix_s:.0f}s ago"
    if not run_public_key_hex or not verify_hex(run_public_key_hex, token.payload(), token.signature):
        return False, "token is not signed by the run's key"
    return True, "signed by the run's key, not expired"


def parse_and_check(
    text: str | bytes, run_id: str, run_public_key_hex: str, now: float, peer_id: str | None = None
) -> tuple[SwarmToken | None, str]:
    """(token, reason) when `text` is a valid token for `run_id` (and `peer_id`), else (None, why)."""
    try:
        token = SwarmToken.from_json(text)
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        return None, f"not a swarm token: {e}"
    ok, reason = check_token(token, run_id, run_public_key_hex, now, peer_id)
    return (token if ok else None), reason


REVOCATION_CONTEXT = b"crowdtrain swarm revocation v1\n"  # never a token's, a manifest's or a checkpoint's
MAX_REVOCATION_BYTES = 512


@dataclass(frozen=True)
class Revocation:
    """The run's key saying: `peer_id` is out (banned) until `until_unix_s`, whatever token it holds.

    Tokens cannot be recalled, so without this a ban reaches the swarm only when the banned peer's
    last token expires (`--swarm-token-ttl-s`). The coordinator publishes one per banned identity
    and the averagers' gate reads them with the tokens (peer/admission/access.py)."""

    run_id: str
    peer_id: str
    until_unix_s: float
    signature: str = ""

    def payload(self) -> bytes:
        body = {
            "run_id": self.run_id,
            "peer_id": self.peer_id,
            "until_unix_s": round(float(self.until_unix_s), 3),
        }
        return REVOCATION_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        body = json.loads(self.payload()[len(REVOCATION_CONTEXT) :])
        return json.dumps({**body, "signature": self.signature}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Revocation:
        """Parse a revocation (ValueError when it is not one); `check_revocation` checks the signature."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="strict")
        if len(text) > MAX_REVOCATION_BYTES:
            raise ValueError(f"a revocation is at most {MAX_REVOCATION_BYTES} bytes, got {len(text)}")
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"run_id", "peer_id", "until_unix_s", "signature"}:
            raise ValueError("a revocation has exactly run_id, peer_id, until_unix_s, signature")
        if not all(isinstance(data[k], str) for k in ("run_id", "peer_id", "signature")):
            raise ValueError("revocation fields have the wrong types")
        until = data["until_unix_s"]
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not math.isfinite(until):
            raise ValueError("revocation expiry is not a number")
        if not _RUN_ID.match(data["run_id"]) or not _PEER_ID.match(data["peer_id"]):
            raise ValueError("revocation names a malformed run id or peer id")
        return cls(data["run_id"], data["peer_id"], float(until), data["signature"])


def sign_revocation(private_key, revocation: Revocation) -> Revocation:
    return Revocation(
        revocation.run_id,
        revocation.peer_id,
        revocation.until_unix_s,
        private_key.sign(revocation.payload()).hex(),
    )


def parse_revocation(
    text: str | bytes, run_id: str, run_public_key_hex: str, now: float, peer_id: str | None = None
) -> tuple[Revocation | None, str]:
    """(revocation, reason) when `text` is a revocation in force for `run_id` (and `peer_id`, the
    DHT subkey it was stored under), signed by the run's key; else (None, why)."""
    try:
        revocation = Revocation.from_json(text)
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        return None, f"not a revocation: {e}"
    if revocation.run_id != run_id:
        return None, f"revocation is for run {revocation.run_id!r}, not {run_id!r}"
    if peer_id is not None and revocation.peer_id != peer_id:
        return None, f"revocation names {revocation.peer_id}, stored under {peer_id}"
    if now >= revocation.until_unix_s:
        return None, "revocation lapsed"
    if not run_public_key_hex or not verify_hex(
        run_public_key_hex, revocation.payload(), revocation.signature
    ):
        return None, "revocation is not signed by the run's key"
    return revocation, "signed by the run's key, in force"


def needs_renewal(token: SwarmToken | None, now: float, ttl_s: float) -> bool:
    """Whether a peer holding `token` should get a new one now: none yet, or less than half its
    lifetime left (a peer renews through its heartbeats, every few seconds)."""
    return token is None or token.expires_unix_s - now < ttl_s / 2


def gate_decision(
    token_expires_unix_s: float | None, revoked_until_unix_s: float, now: float
) -> tuple[bool, str]:
    """Whether the averagers' gate admits a peer whose latest valid published token expires at
    `token_expires_unix_s` (None: none) and whose latest revocation lasts until
    `revoked_until_unix_s` (0: none), and why not.

    A revocation signed at T lasts until T + the tokens' lifetime (coordinator/admission/swarmnodes.py), so it
    voids exactly the tokens issued before T: they all expire by its end. A token expiring after
    the revocation's end was issued after it (the operator lifted the ban and the coordinator
    admitted the peer again): it admits the peer at once, not only when the revocation lapses."""
    revoked = now < revoked_until_unix_s and (
        token_expires_unix_s is None or token_expires_unix_s <= revoked_until_unix_s
    )
    if revoked:
        return False, "revoked by the run's coordinator (banned)"
    if token_expires_unix_s is None:
        return False, "no valid swarm token published for this peer"
    if now >= token_expires_unix_s:
        return False, (
            f"its swarm token expired {now - token_expires_unix_s:.0f}s ago (banned, revoked or not renewed)"
        )
    return True, "holds a valid swarm token"
