"""One published checkpoint: its format (`crowdtrain.json`), listing, and verification. No torch.

A published checkpoint is `<root>/step-<epoch:08d>/` holding HF-format files and `crowdtrain.json`,
which lists the sha256 and size of every other file and is signed with the coordinator's Ed25519
key. Everyone who reads a checkpoint (pull, resuming peers, the coordinator) uses this module;
writing and retention live in `crowdtrain.coordinator.publishing.archive`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer import checks as names
from crowdtrain.peer.checks import sha256_file, verify_hex
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)


META_NAME = "crowdtrain.json"
MAX_META_BYTES = 1 << 20  # crowdtrain.json is a few KB; a bigger one is refused unread
MAX_FILE_BYTES = 1 << 40  # no single checkpoint file is larger (1 TiB)


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
        """Parse and check every field: names are allowed checkpoint file names, numbers are
        integers in range, hashes are sha256 hex. Raises CheckpointError saying what is wrong."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise CheckpointError(f"{META_NAME} is not a JSON object")
            if raw.pop("format_version", None) != FORMAT_VERSION:
                raise CheckpointError(f"{META_NAME} has an unsupported format; upgrade crowdtrain")
            files = tuple(_file_entry(n, v) for n, v in sorted(dict(raw.pop("files")).items()))
            meta = cls(files=files, **raw)
            _check_fields(meta)
        except (names.NetworkValueError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{META_NAME} is malformed: {e}") from e
        return meta


def _file_entry(name: object, value: dict) -> FileEntry:
    names.safe_component(name, names.CHECKPOINT_FILE, "a checkpoint file name")
    if name == META_NAME:
        raise names.NetworkValueError(f"{META_NAME} cannot list itself")
    return FileEntry(
        name,
        names.check_sha256(value["sha256"], f"the sha256 of {name}"),
        names.check_int(value["size_bytes"], f"the size of {name}", maximum=MAX_FILE_BYTES),
    )


def _check_fields(meta: CheckpointMeta) -> None:
    """The scalar fields of a parsed crowdtrain.json, by type and range (NetworkValueError)."""
    if meta.run_id:  # empty only in test fixtures that never leave the process
        names.check_run_id(meta.run_id)
    names.check_int(meta.step, "step")
    names.check_int(meta.samples_seen, "samples_seen")
    if meta.previous_step is not None:
        names.check_int(meta.previous_step, "previous_step", maximum=meta.step)
    for field in ("eval_loss", "created_unix_s"):
        if isinstance(getattr(meta, field), bool) or not isinstance(getattr(meta, field), (int, float)):
            raise names.NetworkValueError(f"{field} must be a number")
    for field in ("manifest_sha256", "public_key", "signature"):
        if not isinstance(getattr(meta, field), str) or len(getattr(meta, field)) > 256:
            raise names.NetworkValueError(f"{field} must be a short string")


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def read_meta(directory: Path) -> CheckpointMeta:
    """crowdtrain.json of `directory`: a regular file (never a symlink) of at most MAX_META_BYTES."""
    path = directory / META_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {META_NAME}: not a crowdtrain checkpoint") from None
    except OSError as e:  # ELOOP: a symlink
        raise CheckpointError(f"{path} is not a regular file ({e.strerror}); refusing it") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CheckpointError(f"{path} is not a regular file; refusing it")
        data = f.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_META_BYTES} bytes; refusing it")
    try:
        return CheckpointMeta.from_json(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text") from e


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
    directory: Path,
    expected: CheckpointMeta | None = None,
    public_key: str | None = None,
    *,
    digests: Mapping[str, str] | None = None,
) -> CheckpointMeta:
    """Check the signature, then that `directory` holds exactly the files crowdtrain.json lists
    (regular files, no symlinks, nothing else) with their sizes and sha256 (and `expected`'s list).

    `public_key` (hex) pins the signer; without it the signature only proves crowdtrain.json is
    intact and was made by whoever holds the key recorded in it.

    `digests` ({file name: sha256 hex}) are digests the caller computed itself from the bytes it
    wrote to those files (`download.HashedFile`: pull hashes while downloading), never digests
    anyone else claims: a file named there is not read again, its digest is compared instead.
    Everything else is still checked on disk. A file changed on disk after the caller hashed it is
    not seen (`crowdtrain verify`, which passes no digests, reads every file).
    """
    if directory.is_symlink() or not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (or is a symlink); refusing it")
    meta = read_meta(directory)
    verify_signature(meta, public_key)
    if expected is not None and (meta.step, meta.files) != (expected.step, expected.files):
        raise CheckpointError(
            f"{directory / META_NAME} does not match the coordinator's listing of step {expected.step}"
        )
    _refuse_unlisted(directory, meta)
    digests = digests or {}
    for entry in meta.files:
        path = directory / entry.name
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a symlink?); refusing it")
        if st.st_size != entry.size_bytes:
            raise CheckpointError(f"{path} has {st.st_size} bytes, expected {entry.size_bytes}")
        digest = digests.get(entry.name) or sha256_file(path)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{path} is corrupted: sha256 {digest[:12]}..., expected {entry.sha256[:12]}..."
            )
    return meta


def _refuse_unlisted(directory: Path, meta: CheckpointMeta) -> None:
    listed = {f.name for f in meta.files} | {META_NAME}
    extra = sorted(p.name for p in directory.iterdir() if p.name not in listed)
    if extra:
        shown = ", ".join(repr(n[:80]) for n in extra[:5])
        raise CheckpointError(
            f"{directory} holds files crowdtrain.json does not list ({shown}); a verified checkpoint "
            "holds nothing else - remove them or pull again into an empty directory"
        )
