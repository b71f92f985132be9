"""Shared fixtures: a private trust store, a tiny corpus, a CLI process launcher that always reaps
what it started. The helpers they use, and that tests import, are in tests/helpers.py."""

from __future__ import annotations

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
    """With `pytest -n 2 --dist loadgroup` (scripts/test.sh), the tests that launch a swarm run one
    after another on one worker while the other worker takes everything else: two swarms at once on
    two cores would starve each other's averaging rounds. Without xdist the mark does nothing."""
    for item in items:
        swarm = any(item.get_closest_marker(name) for name in ("swarm", "attack", "compat"))
        module = item.module.__name__.rsplit(".", 1)[-1]
        if swarm or module in FORKS_HIVEMIND_HERE or item.name in MEASURES_LATENCY:
            item.add_marker(pytest.mark.xdist_group("swarm"))


# tests that hold the coordinator to a latency bound (p99 of a good peer's heartbeats under a flood):
# beside a swarm test on the other core they missed it (72 ms against 50), so they run between them
MEASURES_LATENCY = frozenset(
    {
        "test_four_thousand_fuzzed_requests_leave_the_coordinator_serving",
        "test_heartbeats_stay_fast_while_status_readers_hammer_the_api",
    }
)


# test modules that fork hivemind's DHT or averagers from the pytest process itself (no exec): in
# a two-worker run beside a swarm test, a fork of test_robust_averaging's averagers hung twice in
# `wait_until_ready` (600 s each; the fork hazard of issue 26), so they run on the swarm tests' worker
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
    }
)
