"""The coordinator's Ed25519 signing key: checkpoints are signed, downloaders verify.

The key lives in DATA_DIR/signing.key (PEM, mode 0600), is created with the run, and its public
half (64 hex characters) is in the run manifest, at /api/v1/run and in every checkpoint listing.
Uses `cryptography` (already a dependency of hivemind).
"""

from __future__ import annotations

import os
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class SigningKeyError(CrowdtrainError):
    """DATA_DIR/signing.key is not a usable key; the message says how to recover."""


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, or a new one saved there (a run created before checkpoints were signed)."""
    path = Path(path)
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:  # not PEM, damaged, or encrypted with a password
            raise SigningKeyError(_unusable(path, str(e).split(".")[0])) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(_unusable(path, "not an Ed25519 private key"))
        return key
    key = Ed25519PrivateKey.generate()
    save_key(path, key)
    return key


def _unusable(path: Path, why: str) -> str:
    return (
        f"{path} is not a usable signing key ({why}); restore the run's signing.key from a backup "
        "(its public half is in the run manifest: a new key would fail every download's verification)"
    )


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write the private key atomically, readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_hex(key: Ed25519PrivateKey, payload: bytes) -> str:
    return key.sign(payload).hex()
