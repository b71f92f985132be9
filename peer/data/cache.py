"""The peer's cache: one directory per run under `--cache-dir`, capped at `--max-cache-gb`. No torch.

    cache_dir = claim_run_cache(config.cache_dir, manifest.run_id, config.max_cache_gb)

At peer start, `claim_run_cache` makes CACHE_ROOT/<run_id>, holds a shared lock on its
`.in-use.lock` for as long as this process lives (every peer of that run on this machine holds
one), touches its `.last-used` marker, and then removes other runs' directories, least recently
used first, until the whole cache fits the cap. A run directory is removed only while this process
holds its lock exclusively, so never while another peer uses it, and never the current run's.

What is removed is decided by `evict`, a pure function of the clock, the runs (id, bytes, last
use, in use) and the cap, which also says why in words; the shell around it only measures, locks
and deletes. Only run directories are candidates: ones with a `.last-used` marker, or named like
a run (`ct_PRESET_HEX8`, made before markers existed: their own mtime is their last use);
`places/`, identity keys and anything else in the cache root are never touched.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.data.shards import run_cache_dir

logger = logging.getLogger(__name__)

MARKER = ".last-used"  # touched at each start of a peer of this run: its mtime is the run's last use
LOCK = ".in-use.lock"  # shared-locked by every peer process using the run directory
LEGACY_RUN_DIR = re.compile(r"ct_[A-Za-z0-9]+_[0-9a-f]{8}")  # a run dir from before the marker
RECENT_S = 600.0  # a run used this recently is kept even when unlocked (a peer starting right now)

_held: dict[Path, int] = {}  # run directory -> the descriptor of its shared lock, held by this process


@dataclass(frozen=True)
class CachedRun:
    run_id: str
    size_bytes: int
    last_used_unix_s: float
    in_use: bool  # the current run, or locked by another peer process


def evict(now_unix_s: float, runs: list[CachedRun], cap_bytes: int) -> tuple[list[str], str]:
    """(run ids to delete, why) for the cache to fit `cap_bytes` (0: no cap): runs not in use and
    not used within RECENT_S, least recently used first, until the total fits."""
    total = sum(r.size_bytes for r in runs)
    if cap_bytes <= 0:
        return [], f"no cache cap set; the cache holds {_gb(total)}"
    if total <= cap_bytes:
        return [], f"the cache holds {_gb(total)}, within the {_gb(cap_bytes)} cap"
    deletable = sorted(
        (r for r in runs if not r.in_use and now_unix_s - r.last_used_unix_s >= RECENT_S),
        key=lambda r: (r.last_used_unix_s, r.run_id),
    )
    chosen, left = [], total
    for run in deletable:
        if left <= cap_bytes:
            break
        chosen.append(run)
        left -= run.size_bytes
    gone = ", ".join(
        f"{r.run_id} ({_gb(r.size_bytes)}, unused {_days(now_unix_s - r.last_used_unix_s)})" for r in chosen
    )
    reason = f"the cache holds {_gb(total)}, over the {_gb(cap_bytes)} cap"
    if chosen:
        reason += f": removing the least recently used run(s) {gone}"
    if left > cap_bytes:
        reason += (
            f"; {_gb(left)} stays, all of it this run's, in use by another peer, or used within the "
            f"last {RECENT_S / 60:.0f} minutes: raise --max-cache-gb or free the disk"
        )
    return [r.run_id for r in chosen], reason


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def claim_run_cache(cache_root: str, run_id: str, max_cache_gb: float, now=time.time) -> Path:
    """This run's cache directory, in use by this process from now on (see the module docstring),
    after other runs' directories were evicted to fit `max_cache_gb` (0: no cap)."""
    path = run_cache_dir(cache_root, run_id)
    if path not in _held:
        path.mkdir(parents=True, exist_ok=True)
        _held[path] = _lock(path, fcntl.LOCK_SH)
    (path / MARKER).touch()
    evict_other_runs(path.parent, run_id, int(max_cache_gb * 1e9), now())
    return path


def release_run_cache(path: Path) -> None:
    """Drop this process's lock on a run directory (process exit drops it too)."""
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def evict_other_runs(root: Path, current: str, cap_bytes: int, now_unix_s: float) -> list[str]:
    """Measure and lock the run directories under `root`, delete what `evict` chooses; returns
    the run ids removed. A run whose lock another process holds is in use (never deleted)."""
    locks: dict[str, int] = {}
    runs = []
    try:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            last_used = _last_used(entry)
            if last_used is None:
                continue
            in_use = entry.name == current
            if not in_use:
                try:
                    locks[entry.name] = _lock(Path(entry.path), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    in_use = True
                except OSError as e:
                    logger.warning("cannot lock the cached run %s (%s); leaving it", entry.path, e)
                    continue
            runs.append(CachedRun(entry.name, _size_bytes(Path(entry.path)), last_used, in_use))
        doomed, reason = evict(now_unix_s, runs, cap_bytes)
        (logger.info if doomed else logger.debug)("%s (%s)", reason, root)
        for run_id in doomed:
            shutil.rmtree(root / run_id, ignore_errors=True)  # under its exclusive lock
        return doomed
    finally:
        for fd in locks.values():
            os.close(fd)


def _last_used(entry: os.DirEntry) -> float | None:
    """The run's last use (its marker's mtime), None if not a run dir. A legacy run dir is given a
    marker dated its own mtime first (locking it adds a file, which changes that mtime)."""
    if not entry.is_dir(follow_symlinks=False):
        return None
    marker = os.path.join(entry.path, MARKER)
    try:
        return os.stat(marker, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        if not LEGACY_RUN_DIR.fullmatch(entry.name):
            return None
    mtime = entry.stat(follow_symlinks=False).st_mtime
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    os.utime(marker, (mtime, mtime), follow_symlinks=False)
    return mtime


def _size_bytes(path: Path) -> int:
    """Bytes of the regular files under `path`, symlinks not followed."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _lock(run_dir: Path, how: int) -> int:
    """`how` (flock flags) on the run directory's lock file, as an open descriptor. A shared lock
    waits out an evictor holding it exclusively, then checks that the file it locked still is the
    lock file (the evictor may have deleted the directory meanwhile: then it is made again)."""
    for _ in range(10):
        path = run_dir / LOCK
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, how)
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"the lock file {run_dir / LOCK} kept changing under this process")
