"""Proof that a peer owns the hivemind peer id it claims, checked without hivemind.

A hivemind peer id is a libp2p peer id: the multihash of the peer's public key serialised as a
libp2p `PublicKey` protobuf (`KeyType key_type = 1; bytes data = 2`; hivemind's keys are RSA,
`data` is the DER SubjectPublicKeyInfo), sha2-256 for keys longer than 42 bytes, the key itself
("identity" multihash) otherwise, in base58. The coordinator derives the id from the public key a
peer sends, and checks the peer's signature of a random per-session challenge
(`crowdtrain.peer.report.dht_claim_message`) with the `cryptography` library: only a peer holding
the private key behind a DHT identity can link that identity's progress records (its contribution
credit) to its session. Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib

from crowdtrain.peer.report import dht_claim_message
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
KEY_RSA, KEY_ED25519 = 0, 1  # libp2p crypto.pb.KeyType
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


def verify_dht_claim(
    dht_peer_id: str, encoded_public_key: bytes, signature: bytes, challenge: bytes
) -> tuple[bool, str]:
    """Whether `encoded_public_key` derives `dht_peer_id` and `signature` signs this session's
    challenge for that id with it; and why not."""
    if not challenge:
        return False, "this session has no DHT challenge (it joined an older coordinator); join again"
    try:
        key_type, key_data = parse_public_key(encoded_public_key)
    except ValueError as e:
        return False, f"dht_public_key is not a libp2p public key: {e}"
    if peer_id_of(encoded_public_key) != dht_peer_id:
        return False, "dht_public_key does not derive the claimed dht_peer_id"
    message = dht_claim_message(challenge, dht_peer_id)
    try:
        if key_type == KEY_RSA:
            key = serialization.load_der_public_key(key_data)
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
                return False, "dht_public_key must be an RSA key of at least 2048 bits"
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
            key.verify(signature, message, pss, hashes.SHA256())
        elif key_type == KEY_ED25519:
            ed25519.Ed25519PublicKey.from_public_bytes(key_data).verify(signature, message)
        else:
            return False, f"dht_public_key has key type {key_type}; only RSA and Ed25519 are accepted"
    except InvalidSignature:
        return False, "dht_signature does not verify with dht_public_key"
    except ValueError as e:
        return False, f"dht_public_key is malformed: {e}"
    return True, "dht_peer_id proven by a signature of this session's challenge"
