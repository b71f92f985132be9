"""The coordinator's checkpoint archive: atomic writing, retention, which files may be served,
downloads in flight. No torch.

The format of one checkpoint (`crowdtrain.json`, listing, verification) is `crowdtrain.peer.checkpoints.format`,
which every reader uses. A checkpoint exists only once its directory
has been renamed into place, after every file was written and fsynced; leftovers of an interrupted
write (`.tmp-*`) are removed at start-up and never listed. `published` is the listing every
request reads: cached, re-read only when a checkpoint is added, removed or replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from crowdtrain.coordinator import signing
from crowdtrain.coordinator.errors import NotFoundError
from crowdtrain.peer import checks as names
from crowdtrain.peer.checkpoints.format import (
    META_NAME,
    CheckpointError,
    CheckpointMeta,
    FileEntry,
    list_checkpoints,
    step_dirname,
)
from crowdtrain.peer.checks import sha256_file

logger = logging.getLogger(__name__)


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
    """Hash every file in `staging`, sign and write crowdtrain.json, fsync, rename into place atomically.

    Only regular files whose names downloaders accept (`names.CHECKPOINT_FILE`) are listed; anything
    else is removed from `staging` with a warning, so the published directory is exactly its listing.
    """
    entries = []
    for path in sorted(staging.iterdir()):
        if path.name == META_NAME:
            continue
        ok, reason = names.check_component(path.name, names.CHECKPOINT_FILE)
        if not ok or path.is_symlink() or not path.is_file():
            logger.warning("not publishing %s: %s", path.name, reason or "not a regular file")
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
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


_CACHED_ROOTS = 16  # checkpoint roots whose listing `published` keeps (a coordinator has one)
_listings: OrderedDict[str, tuple[object, list[CheckpointMeta]]] = OrderedDict()
_listings_lock = threading.Lock()


def listing_signature(root: Path) -> object:
    """What changes whenever `list_checkpoints(root)` could: the root directory (mtime, inode) and
    each step-* entry's name, inode and crowdtrain.json (mtime, size, inode); None without a root.
    One scandir and a stat per checkpoint: no file is opened."""
    try:
        st = os.stat(root)
        entries = []
        with os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith("step-"):
                    try:
                        m = os.stat(os.path.join(entry.path, META_NAME), follow_symlinks=False)
                        meta = (m.st_mtime_ns, m.st_size, m.st_ino)
                    except OSError:
                        meta = None
                    entries.append((entry.name, entry.inode(), meta))
    except OSError:  # no root yet, or not a directory
        return None
    return st.st_mtime_ns, st.st_ino, tuple(sorted(entries))


def published(root: Path) -> list[CheckpointMeta]:
    """`list_checkpoints(root)` (oldest first), read from disk again only when `listing_signature`
    changed: a stranger asking for the listing a thousand times a second costs a scandir each, not
    a read and parse of every crowdtrain.json. Thread-safe; a change made before the call started
    is always seen (the signature is taken before reading)."""
    key, signature = str(root), listing_signature(root)
    with _listings_lock:
        cached = _listings.get(key)
        if cached is not None and cached[0] == signature:
            _listings.move_to_end(key)
            return list(cached[1])
    metas = list_checkpoints(root)
    with _listings_lock:
        _listings[key] = (signature, metas)
        _listings.move_to_end(key)
        while len(_listings) > _CACHED_ROOTS:
            _listings.popitem(last=False)
    return list(metas)


def lookup_file(root: Path, step: int | None, name: str) -> tuple[CheckpointMeta, Path]:
    """The published checkpoint at `step` (None: the latest) and the path of its file `name`, for
    every transport that serves checkpoints (gRPC and HTTP).

    Only the files its signed `crowdtrain.json` lists, and `crowdtrain.json` itself, are served, so no
    name can reach outside the checkpoint's directory. Raises `NotFoundError` saying what exists.
    The file may still vanish (retention) before the caller opens it.
    """
    metas = published(root)
    if not metas:
        raise NotFoundError("no checkpoint has been published yet; try again after the first one")
    meta = metas[-1] if step is None else next((m for m in metas if m.step == step), None)
    if meta is None:
        available = ", ".join(str(m.step) for m in metas)
        raise NotFoundError(f"no checkpoint at step {step} (have {available})")
    served = {f.name for f in meta.files} | {META_NAME}
    if name not in served or Path(name).name != name:
        files = ", ".join(sorted(served))
        raise NotFoundError(f"checkpoint {meta.step} has no file {name[:100]!r} (it has {files})")
    return meta, root / step_dirname(meta.step) / name


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
