"""Checkpoint directories on disk: atomic finalisation, listing and verification. No torch.

A published checkpoint is `<root>/step-<epoch:08d>/` holding HF-format files and `crowdtrain.json`,
which lists the sha256 and size of every other file. A checkpoint exists only once its directory
has been renamed into place, after every file was written and fsynced; leftovers of an interrupted
write (`.tmp-*`) are removed at start-up and never listed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator import signing
from peer.data import sha256_file

logger = logging.getLogger(__name__)

META_NAME = "crowdtrain.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
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


def new_staging_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".tmp-{step_dirname(step)}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    return path


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(
    staging: Path, root: Path, meta_without_files: CheckpointMeta, signing_key=None
) -> CheckpointMeta:
    """Hash every file in `staging`, sign and write crowdtrain.json, fsync, rename into place atomically."""
    entries = []
    for path in sorted(staging.iterdir()):
        if path.name == META_NAME or not path.is_file():
            continue
        _fsync_path(path)
        entries.append(FileEntry(path.name, sha256_file(path), path.stat().st_size))
    meta = CheckpointMeta(**{**meta_without_files.__dict__, "files": tuple(entries)})
    if signing_key is not None:
        meta = dataclasses.replace(meta, public_key=signing.public_key_hex(signing_key), signature="")
        meta = dataclasses.replace(meta, signature=signing.sign_hex(signing_key, meta.signing_payload()))
    (staging / META_NAME).write_text(meta.to_json())
    _fsync_path(staging / META_NAME)
    _fsync_path(staging)
    final = root / step_dirname(meta.step)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists")
    os.rename(staging, final)
    _fsync_path(root)
    return meta


def retention_victims(steps: list[int], keep_last: int, keep_every: int, in_use: set[int]) -> list[int]:
    """Pure: which published steps to delete. Keeps the newest `keep_last` (never fewer than one,
    so the latest always survives), every step divisible by `keep_every` (0: none), and any step
    in `in_use` (being downloaded right now)."""
    ordered = sorted(steps)
    keep = set(ordered[-max(1, keep_last) :])
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep and s not in in_use]


def remove_checkpoint(root: Path, step: int) -> None:
    """Take a checkpoint out of the listing atomically (rename), then delete its files."""
    path = root / step_dirname(step)
    doomed = root / f".tmp-deleting-{step_dirname(step)}-{time.monotonic_ns()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_staging(root: Path) -> int:
    """Remove leftovers of interrupted writes; returns how many were removed."""
    removed = 0
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


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
    if not signing.verify_hex(meta.public_key, meta.signing_payload(), meta.signature):
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


class DownloadTracker:
    """Counts the checkpoint downloads in flight per step, so retention never deletes one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}

    def begin(self, step: int) -> None:
        with self._lock:
            self._active[step] = self._active.get(step, 0) + 1

    def end(self, step: int) -> None:
        with self._lock:
            self._active[step] -= 1
            if not self._active[step]:
                del self._active[step]

    def in_use(self) -> set[int]:
        with self._lock:
            return set(self._active)
