"""Shared fixtures: a private trust store, a tiny corpus, a CLI process launcher that always reaps
what it started. The helpers they use, and that tests import, are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import Launcher, descendants_alive


@pytest.fixture(autouse=True)
def private_trust_store(tmp_path_factory, monkeypatch):
    """Keys trusted on first use (peer/checkpoints/trust.py) go to a fresh directory per test, never ~/.config;
    CLI children inherit it."""
    monkeypatch.setenv("CROWDTRAIN_CONFIG_DIR", str(tmp_path_factory.mktemp("crowdtrain-config")))


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A few hundred small, varied Python-like documents: enough for 4 shards and a held-out split."""
    root = tmp_path / "corpus"
    for i in range(240):
        sub = root / f"pkg{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        body = "\n".join(
            f"def function_{i}_{j}(value_{j}, other={j}):\n    return value_{j} * {i} + other  # note {i * j}\n"
            for j in range(1 + i % 9)
        )
        (sub / f"mod_{i:03d}.py").write_text(f'"""Module {i}."""\n\n{body}\n')
    return root


@pytest.fixture
def launcher(tmp_path: Path):
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()
        groups = [c.proc.pid for c in launcher.children]
        leftovers = descendants_alive(groups)
        assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib honours http_proxy; our servers are on 127.0.0.1
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield


def pytest_collection_modifyitems(config, items):
    """scripts/test.sh runs the suite in two phases (CROWDTRAIN_TEST_PHASE): `forks`, one process, the
    test modules that fork hivemind from pytest's own process; `rest`, two xdist workers, where the
    tests that launch a swarm (and those held to a latency bound) run one after another on one
    worker while the other takes everything else: two swarms at once on two cores would starve each
    other's averaging rounds. Unset: every test, and the xdist mark does nothing without xdist."""
    phase = os.environ.get("CROWDTRAIN_TEST_PHASE", "")
    kept, dropped = [], []
    for item in items:
        forks = item.module.__name__.rsplit(".", 1)[-1] in FORKS_HIVEMIND_HERE
        if phase and forks != (phase == "forks"):
            dropped.append(item)
            continue
        kept.append(item)
        swarm = any(item.get_closest_marker(name) for name in ("swarm", "attack", "compat"))
        if swarm or item.name in MEASURES_LATENCY:
            item.add_marker(pytest.mark.xdist_group("swarm"))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# tests that hold the coordinator to a latency bound (p99 of a good peer's heartbeats under a flood):
# beside a swarm test on the other core they missed it (72 ms against 50), so they run between them
MEASURES_LATENCY = frozenset(
    {
        "test_four_thousand_fuzzed_requests_leave_the_coordinator_serving",
        "test_heartbeats_stay_fast_while_status_readers_hammer_the_api",
    }
)


# test modules that fork hivemind's DHT or averagers (or other children) from pytest's own process,
# without exec. In an xdist worker those forks went wrong: averager forks hung in wait_until_ready
# (600 s each), forked children segfaulted in the garbage collector and in hivemind's matchmaking
# (the fork hazard of issue 26: a fork beside other threads). So they run in a plain pytest process.
FORKS_HIVEMIND_HERE = frozenset(
    {
        "test_credit",
        "test_dht_records",
        "test_diloco",
        "test_events",
        "test_fast_auth",
        "test_monitor",
        "test_robust_averaging",
        "test_sparse_codec",
        "test_state_trust",
        "test_swarm_auth",
        "test_terminal",
        "test_bandwidth",
    }
)
