"""One published checkpoint: its format (`crowdtrain.json`), listing, and verification. No torch.

A published checkpoint is `<root>/step-<epoch:08d>/` holding HF-format files and `crowdtrain.json`,
which lists the sha256 and size of every other file and is signed with the coordinator's Ed25519
key. Everyone who reads a checkpoint (pull, resuming peers, the coordinator) uses this module;
writing and retention live in `crowdtrain.coordinator.archive`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.data import sha256_file
from crowdtrain.peer.errors import CrowdtrainError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

logger = logging.getLogger(__name__)


META_NAME = "crowdtrain.json"


FORMAT_VERSION = 1


class CheckpointError(CrowdtrainError):
    """A checkpoint is missing, incomplete or does not match its recorded hashes."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class CheckpointMeta:
    run_id: str
    step: int  # the swarm epoch the state was taken at
    samples_seen: int  # epochs x target batch size: a lower bound of the samples the model learnt from
    eval_loss: float  # nats per token on the run's held-out split
    created_unix_s: float
    manifest_sha256: str
    previous_step: int | None
    files: tuple[FileEntry, ...]
    public_key: str = ""  # the coordinator's Ed25519 public key (hex) that signed this checkpoint
    signature: str = ""  # Ed25519 signature (hex) of signing_payload()

    def _as_dict(self) -> dict:
        d = dict(
            self.__dict__,
            files={f.name: {"sha256": f.sha256, "size_bytes": f.size_bytes} for f in self.files},
        )
        return dict(format_version=FORMAT_VERSION, **d)

    def to_json(self) -> str:
        return json.dumps(self._as_dict(), indent=2, sort_keys=True)

    def signing_payload(self) -> bytes:
        """Canonical bytes the signature covers: every field but the signature itself."""
        d = self._as_dict()
        d.pop("signature")
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        raw = json.loads(text)
        if raw.pop("format_version", None) != FORMAT_VERSION:
            raise CheckpointError(f"{META_NAME} has an unsupported format; upgrade crowdtrain")
        files = tuple(FileEntry(n, v["sha256"], v["size_bytes"]) for n, v in sorted(raw.pop("files").items()))
        return cls(files=files, **raw)


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def read_meta(directory: Path) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_json((directory / META_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {META_NAME}: not a crowdtrain checkpoint") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / META_NAME} is malformed: {e}") from e


def list_checkpoints(root: Path) -> list[CheckpointMeta]:
    """Published checkpoints, oldest first."""
    metas = []
    if root.is_dir():
        for path in sorted(root.glob("step-*")):
            try:
                metas.append(read_meta(path))
            except CheckpointError as e:
                logger.warning("ignoring %s: %s", path, e)
    return metas


def verify_signature(meta: CheckpointMeta, public_key: str | None) -> None:
    """Check crowdtrain.json's signature; with `public_key`, also that the run's key made it."""
    if not meta.signature:
        raise CheckpointError(f"step {meta.step} is not signed; refusing it")
    if public_key is not None and meta.public_key != public_key:
        raise CheckpointError(
            f"step {meta.step} was signed by key {meta.public_key[:16]}..., not the run's key {public_key[:16]}..."
        )
    if not verify_hex(meta.public_key, meta.signing_payload(), meta.signature):
        raise CheckpointError(f"step {meta.step}: the signature of {META_NAME} does not match its contents")


def verify_dir(
    directory: Path, expected: CheckpointMeta | None = None, public_key: str | None = None
) -> CheckpointMeta:
    """Check the signature, then every file against crowdtrain.json (and `expected`'s list, if given).

    `public_key` (hex) pins the signer; without it the signature only proves crowdtrain.json is
    intact and was made by whoever holds the key recorded in it.
    """
    meta = read_meta(directory)
    verify_signature(meta, public_key)
    if expected is not None and (meta.step, meta.files) != (expected.step, expected.files):
        raise CheckpointError(
            f"{directory / META_NAME} does not match the coordinator's listing of step {expected.step}"
        )
    for entry in meta.files:
        path = directory / entry.name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise CheckpointError(f"{path} has {size} bytes, expected {entry.size_bytes}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{path} is corrupted: sha256 {digest[:12]}..., expected {entry.sha256[:12]}..."
            )
    return meta


def verify_hex(public_hex: str, payload: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is `public_hex`'s signature of `payload`; False on any mismatch."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature_hex), payload
        )
    except (InvalidSignature, ValueError):
        return False
    return True
