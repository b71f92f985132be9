"""The peer's cache: under platformdirs' cache directory (XDG_CACHE_HOME honoured), capped by
--max-cache-gb, other runs evicted least recently used first, never the current run nor one another
peer process holds. The decision is pure (`evict`, an injected clock); the shell runs on a tmp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from crowdtrain.peer.data import cache
from crowdtrain.peer.data.cache import CachedRun, claim_run_cache, evict, evict_other_runs, release_run_cache

GB = 10**9
DAY = 86400.0
NOW = 1_800_000_000.0


def test_nothing_is_evicted_within_the_cap_or_without_one():
    runs = [CachedRun("ct_a", 5 * GB, NOW - 30 * DAY, False), CachedRun("ct_b", 5 * GB, NOW, True)]
    assert evict(NOW, runs, 20 * GB) == ([], "the cache holds 10.0 GB, within the 20.0 GB cap")
    assert evict(NOW, runs, 0) == ([], "no cache cap set; the cache holds 10.0 GB")


def test_least_recently_used_first_until_it_fits():
    runs = [
        CachedRun("ct_new", 6 * GB, NOW - 1 * DAY, False),
        CachedRun("ct_oldest", 6 * GB, NOW - 9 * DAY, False),
        CachedRun("ct_old", 6 * GB, NOW - 3 * DAY, False),
        CachedRun("ct_now", 6 * GB, NOW, True),
    ]
    doomed, reason = evict(NOW, runs, 13 * GB)
    assert doomed == ["ct_oldest", "ct_old"]
    assert reason == (
        "the cache holds 24.0 GB, over the 13.0 GB cap: removing the least recently used run(s) "
        "ct_oldest (6.0 GB, unused 9.0 days), ct_old (6.0 GB, unused 3.0 days)"
    )


def test_runs_in_use_or_just_used_are_never_evicted_even_over_the_cap():
    runs = [
        CachedRun("ct_current", 30 * GB, NOW - 5 * DAY, True),  # this run (or another peer's lock)
        CachedRun("ct_starting", 3 * GB, NOW - 60.0, False),  # a peer starting right now
        CachedRun("ct_stale", 2 * GB, NOW - 2 * DAY, False),
    ]
    doomed, reason = evict(NOW, runs, 20 * GB)
    assert doomed == ["ct_stale"]
    assert reason.endswith(
        "; 33.0 GB stays, all of it this run's, in use by another peer, or used within the last 10 "
        "minutes: raise --max-cache-gb or free the disk"
    )
    later = NOW + cache.RECENT_S  # the injected clock moves on: the starting run may go now
    assert evict(later, runs, 20 * GB)[0] == ["ct_stale", "ct_starting"]


def _run_dir(root: Path, run_id: str, n_bytes: int, last_used: float) -> Path:
    path = root / run_id
    path.mkdir(parents=True)
    (path / "shard-00000.jsonl").write_bytes(b"x" * n_bytes)
    (path / cache.MARKER).touch()
    os.utime(path / cache.MARKER, (last_used, last_used))
    return path


def test_the_shell_evicts_other_runs_but_not_locked_ones_nor_other_files(tmp_path: Path):
    root = tmp_path / "cache"
    old = _run_dir(root, "ct_old", 4000, NOW - 9 * DAY)
    locked = _run_dir(root, "ct_locked", 4000, NOW - 20 * DAY)
    legacy = root / "ct_tiny_0123abcd"  # made before markers: its own mtime counts
    legacy.mkdir()
    (legacy / "shard-00001.jsonl").write_bytes(b"y" * 4000)
    os.utime(legacy, (NOW - 5 * DAY, NOW - 5 * DAY))
    (root / "places").mkdir()
    (root / "places" / "abc.json").write_bytes(b"z" * 4000)  # not a run: never a candidate
    # another peer process holds ct_locked (a shared lock, as claim_run_cache takes)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, sys
                fd = os.open({str(locked / cache.LOCK)!r}, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                print("held", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        current = claim_run_cache(str(root), "ct_current", 0.0)  # no cap: nothing goes
        assert {p.name for p in root.iterdir()} == {
            "ct_old",
            "ct_locked",
            "ct_tiny_0123abcd",
            "places",
            "ct_current",
        }
        (current / "shard-00002.jsonl").write_bytes(b"w" * 4000)
        removed = evict_other_runs(root, "ct_current", 9000, NOW)
        assert removed == ["ct_old", "ct_tiny_0123abcd"]  # LRU first; ct_locked is older but held
        assert locked.exists() and (root / "places" / "abc.json").exists() and current.exists()
        assert not old.exists() and not legacy.exists()
    finally:
        holder.communicate("")
        release_run_cache(root / "ct_current")
    assert evict_other_runs(root, "ct_current", 5000, NOW) == ["ct_locked"]  # released: it may go


def test_a_peer_claiming_a_run_an_evictor_just_deleted_gets_it_back(tmp_path: Path):
    root = tmp_path / "cache"
    _run_dir(root, "ct_gone", 10, NOW - 9 * DAY)
    assert evict_other_runs(root, "ct_other", 1, NOW) == ["ct_gone"]
    path = claim_run_cache(str(root), "ct_gone", 20.0)
    try:
        assert path == root / "ct_gone" and (path / cache.LOCK).exists() and (path / cache.MARKER).exists()
    finally:
        release_run_cache(path)


@pytest.mark.parametrize("xdg", [True, False])
def test_the_default_cache_dir_is_platformdirs_and_honours_xdg_cache_home(tmp_path: Path, xdg: bool):
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["HOME"] = str(tmp_path / "home")
    if xdg:
        env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    code = (
        "from crowdtrain.peer.settings.commands import PeerConfig; import dataclasses; "
        "f = {x.name: x for x in dataclasses.fields(PeerConfig)}; "
        "print(f['cache_dir'].default); print(f['max_cache_gb'].default)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cache_dir, cap = out.stdout.split()
    if sys.platform.startswith("linux"):
        expected = tmp_path / "xdg" / "crowdtrain" if xdg else tmp_path / "home" / ".cache" / "crowdtrain"
        assert cache_dir == str(expected)
    assert float(cap) == 20.0
