"""This peer's hivemind (libp2p) identity, made before the swarm is joined.

The key is created here, not by hivemind when its DHT starts, because the swarm admits nobody
without a swarm token (peer/admission/tokens.py) and the coordinator issues one only to a peer that proved
it holds the key of the identity the token names: the peer id is known, and proven through the
heartbeats, before the DHT node dials anyone. One RSA-2048 key serves as the libp2p identity
(hivemind's `identity_path` file: a libp2p `PrivateKey` protobuf), as the key the coordinator binds
the token to, and as the key that vouches, once per token, for the Ed25519 session key with which
the DHT authorizer signs every request and response (peer/admission/access.py, sessionkeys.py).

A volunteer's key persists: `crowdtrain peer` uses identity.key in crowdtrain's config directory
(the key `crowdtrain identity` prints the id of), or the file `--identity PATH` names, created once
(mode 0600), so its peer id, its `/peer/<id>` page, its credit and its allowlist entry survive
restarts. The peer holds the key while it runs (`PeerIdentity.held`: an exclusive lock on
`<key>.lock` beside it): a second peer on the same machine started with the same key is refused
(hivemind refuses an identity another peer uses), and told to pass `--identity OTHER_FILE`.
Tools that join as simulated peers use a fresh key per process (`PeerIdentity.fresh`, in a private
0700 directory removed at exit).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import tempfile
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.run.report import dht_claim_message, join_message

logger = logging.getLogger(__name__)


class IdentityError(CrowdtrainError):
    """The identity key file cannot be read or written; the message says which and why."""


def _new_key_file(path: Path) -> None:
    """Write a new RSA-2048 key to `path` (mode 0600, created exclusively) in hivemind's format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.proto import crypto_pb2

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def lock_path(key_path: Path) -> Path:
    """The lock file beside a key: `identity.key` -> `identity.key.lock`."""
    return key_path.with_name(key_path.name + ".lock")


def _lock(key_path: Path) -> int:
    """An exclusive lock on the key's lock file (created 0600 when missing), as an open descriptor;
    refused at once when another process (or another holder here) has it."""
    path = lock_path(key_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise IdentityError(f"cannot open the identity key's lock file {path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IdentityError(
            f"the identity key {key_path} is in use by another crowdtrain peer on this machine (it holds "
            f"{path}); two peers cannot share one identity: start this one with --identity OTHER_FILE "
            "(a new file is created there)"
        ) from None
    return fd


class PeerIdentity:
    """The identity key at `path` (created when missing) and what is derived from it."""

    def __init__(self, path: Path, *, _tempdir=None):
        self.path, self._tempdir = Path(path), _tempdir
        self._lock_fd: int | None = None  # held(): the lock on `<path>.lock`, until release()
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _new_key_file(self.path)
            except OSError as e:
                raise IdentityError(f"cannot create the identity key {self.path}: {e}") from e
            logger.info("created a new hivemind identity key at %s", self.path)
        self._load()

    @classmethod
    def fresh(cls, cache_dir: Path) -> PeerIdentity:
        """A new key for this process only, in a private directory under `cache_dir`."""
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tempdir = tempfile.TemporaryDirectory(
            prefix="dht-identity-", dir=cache_dir, ignore_cleanup_errors=True
        )
        return cls(Path(tempdir.name) / "identity.key", _tempdir=tempdir)

    @classmethod
    def held(cls, path: Path) -> PeerIdentity:
        """The key at `path` (created when missing), held by this process until `release()` or its
        exit: a second holder, here or in another process, gets an IdentityError saying to use
        another --identity. The lock is taken before the key is made, so two peers starting at once
        never race to create it."""
        fd = _lock(Path(path))
        try:
            identity = cls(path)
        except BaseException:
            os.close(fd)
            raise
        identity._lock_fd = fd
        return identity

    def release(self) -> None:
        """Let another process hold this key; idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def persistent(self) -> bool:
        return self._tempdir is None

    def _load(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from hivemind.p2p import PeerID
        from hivemind.proto import crypto_pb2

        try:
            raw = self.path.read_bytes()
            stored = crypto_pb2.PrivateKey.FromString(raw)
            key = serialization.load_der_private_key(stored.data, password=None)
        except (OSError, ValueError) as e:
            raise IdentityError(
                f"{self.path} is not a hivemind identity key ({type(e).__name__}: {e}); "
                "move it away and a new one is created"
            ) from e
        if stored.key_type != crypto_pb2.KeyType.RSA or not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(f"{self.path} holds a {stored.key_type} key; crowdtrain identities are RSA")
        self._key = key
        self.peer_id = PeerID.from_identity(raw).to_base58()
        public = key.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key_protobuf = crypto_pb2.PublicKey(
            key_type=stored.key_type, data=der
        ).SerializeToString()
        # hivemind's RSAPublicKey.to_bytes(): what the DHT authorizer presents and tokens name
        self.rsa_public_openssh = public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )

    def prove(self, challenge: bytes) -> tuple[bytes, bytes]:
        """(libp2p PublicKey protobuf, signature of the claim to this peer id) for the coordinator's
        per-session `challenge`, as `crowdtrain.coordinator.admission.signatures.verify_dht_claim` checks them."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        message = dht_claim_message(challenge, self.peer_id)
        return self.public_key_protobuf, self._key.sign(message, pss, hashes.SHA256())

    def join_fields(self, now_unix_s: float) -> dict:
        """The JoinRequest fields that name this identity and prove it is ours (`join_message`)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        signature = self._key.sign(join_message(int(now_unix_s), self.peer_id), pss, hashes.SHA256())
        return dict(
            dht_public_key=self.public_key_protobuf, join_signature=signature, join_unix_s=int(now_unix_s)
        )

    def signed_join(self, request):
        """A copy of the JoinRequest `request` naming this identity, signed by it now."""
        import time

        signed = type(request)()
        signed.CopyFrom(request)
        for name, value in self.join_fields(time.time()).items():
            setattr(signed, name, value)
        return signed

    def hivemind_private_key(self):
        """The same key as a hivemind `RSAPrivateKey` (for the DHT authorizer's session-key
        delegations and the DHT records only this identity may write)."""
        from cryptography.hazmat.primitives import serialization
        from hivemind.utils.crypto import RSAPrivateKey

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__(
            {
                "_private_key": self._key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            }
        )
        return key


@functools.cache
def throwaway_identity() -> PeerIdentity:
    """One fresh identity for this process, for tools that join as simulated peers (benchmarks,
    the fuzzer): every Join names and signs an identity."""
    return PeerIdentity.fresh(Path(tempfile.gettempdir()) / "crowdtrain-throwaway-identities")
