"""Proof that a peer owns the hivemind peer id it claims, checked without hivemind.

A hivemind peer id is a libp2p peer id: the multihash of the peer's public key serialised as a
libp2p `PublicKey` protobuf (`KeyType key_type = 1; bytes data = 2`; hivemind's keys are RSA,
`data` is the DER SubjectPublicKeyInfo), sha2-256 for keys longer than 42 bytes, the key itself
("identity" multihash) otherwise, in base58. The coordinator derives the id from the public key a
peer sends, and checks the peer's signature of a random per-session challenge
(`crowdtrain.peer.run.report.dht_claim_message`) with the `cryptography` library: only a peer holding
the private key behind a DHT identity can link that identity's progress records (its contribution
credit) to its session. A joiner names its key at Join and signs the join with it (`verify_join`),
so a session is bound to one identity from its first request. Only keys shaped like hivemind's
(RSA, e = 65537, 2048-4096 bits) are accepted: cheap Ed25519 identities and slow-to-verify
exponents are refused before any signature check. Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib

from crowdtrain.peer.run.report import dht_claim_message, join_message
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
KEY_RSA = 0  # libp2p crypto.pb.KeyType (1 is Ed25519: refused, an identity must be as dear as hivemind's)
_IDENTITY_MULTIHASH_MAX = 42  # libp2p: keys up to 42 bytes are inlined, longer ones hashed


def base58(data: bytes) -> str:
    """Bitcoin-alphabet base58, as libp2p writes peer ids."""
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def parse_public_key(encoded: bytes) -> tuple[int, bytes]:
    """(key type, key data) of a libp2p `PublicKey` protobuf; ValueError if it is not exactly one."""
    fields: dict[int, int | bytes] = {}
    i = 0
    while i < len(encoded):
        tag, i = _read_varint(encoded, i)
        number, wire = tag >> 3, tag & 7
        if number == 1 and wire == 0:
            fields[1], i = _read_varint(encoded, i)
        elif number == 2 and wire == 2:
            length, i = _read_varint(encoded, i)
            if i + length > len(encoded):
                raise ValueError("truncated key data")
            fields[2], i = encoded[i : i + length], i + length
        else:
            raise ValueError(f"unexpected field {number} (wire type {wire}) in a libp2p public key")
    if set(fields) != {1, 2}:
        raise ValueError("a libp2p public key needs key_type and data")
    return int(fields[1]), bytes(fields[2])


def peer_id_of(encoded_public_key: bytes) -> str:
    """The base58 libp2p peer id of a serialised libp2p `PublicKey` (what hivemind's PeerID shows)."""
    if len(encoded_public_key) <= _IDENTITY_MULTIHASH_MAX:
        multihash = bytes([0x00, len(encoded_public_key)]) + encoded_public_key
    else:
        multihash = bytes([0x12, 0x20]) + hashlib.sha256(encoded_public_key).digest()
    return base58(multihash)


RSA_BITS = (2048, 4096)  # what hivemind identities use (2048); larger keys only cost the verifier
RSA_EXPONENT = 65537  # every RSA library's default; a huge exponent makes each verification ~60x dearer


def load_identity_key(encoded_public_key: bytes) -> tuple[rsa.RSAPublicKey | None, str]:
    """(the RSA public key a libp2p `PublicKey` protobuf holds, "") when it is shaped like a hivemind
    identity (RSA, e = 65537, 2048-4096 bits), else (None, why). Checked before any signature is
    verified, so a key chosen to make verification slow costs the coordinator nothing."""
    try:
        key_type, key_data = parse_public_key(encoded_public_key)
    except ValueError as e:
        return None, f"not a libp2p public key: {e}"
    if key_type != KEY_RSA:
        return None, f"key type {key_type} is not RSA: crowdtrain identities are hivemind's RSA keys"
    try:
        key = serialization.load_der_public_key(key_data)
    except ValueError as e:
        return None, f"malformed RSA key: {e}"
    if not isinstance(key, rsa.RSAPublicKey):
        return None, "the key data is not an RSA public key"
    if not RSA_BITS[0] <= key.key_size <= RSA_BITS[1] or key.public_numbers().e != RSA_EXPONENT:
        return (
            None,
            f"an identity must be an RSA key of {RSA_BITS[0]}-{RSA_BITS[1]} bits with e = {RSA_EXPONENT}",
        )
    return key, ""


def _verify_pss(key: rsa.RSAPublicKey, signature: bytes, message: bytes) -> bool:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    try:
        key.verify(signature, message, pss, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def verify_join(
    encoded_public_key: bytes, signature: bytes, join_unix_s: int, now: float, max_skew_s: float
) -> tuple[str, str]:
    """(peer id, "") when the joiner holds the identity key it names: the key is shaped like one
    (`load_identity_key`) and `signature` signs `join_message(join_unix_s, peer id)` from within
    `max_skew_s` of `now`; else ("", why)."""
    if not encoded_public_key:
        return "", (
            "this coordinator needs the joiner's identity key (dht_public_key) and its signature: "
            "upgrade crowdtrain, or run `crowdtrain peer`, which sends them"
        )
    key, why = load_identity_key(encoded_public_key)
    if key is None:
        return "", f"dht_public_key: {why}"
    if abs(now - join_unix_s) > max_skew_s:
        return "", (
            f"the join was signed at {join_unix_s}, {now - join_unix_s:+.0f}s from the coordinator's clock "
            f"(more than {max_skew_s:.0f}s): set this machine's clock (e.g. enable NTP) and join again"
        )
    peer_id = peer_id_of(encoded_public_key)
    if not _verify_pss(key, signature, join_message(join_unix_s, peer_id)):
        return "", "join_signature does not verify with dht_public_key; join again with `crowdtrain peer`"
    return peer_id, ""


def verify_dht_claim(
    dht_peer_id: str, encoded_public_key: bytes, signature: bytes, challenge: bytes
) -> tuple[bool, str]:
    """Whether `encoded_public_key` derives `dht_peer_id` and `signature` signs this session's
    challenge for that id with it; and why not."""
    if not challenge:
        return False, "this session has no DHT challenge (it joined an older coordinator); join again"
    if peer_id_of(encoded_public_key) != dht_peer_id:
        return False, "dht_public_key does not derive the claimed dht_peer_id"
    key, why = load_identity_key(encoded_public_key)
    if key is None:
        return False, f"dht_public_key: {why}"
    if not _verify_pss(key, signature, dht_claim_message(challenge, dht_peer_id)):
        return False, "dht_signature does not verify with dht_public_key"
    return True, "dht_peer_id proven by a signature of this session's challenge"
