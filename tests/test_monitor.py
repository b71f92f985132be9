"""The swarm monitor's pure parts and its bookkeeping in SQLite, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from crowdtrain.coordinator.peers.credit import CreditSettings
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, PeerState, compute_state
from crowdtrain.coordinator.peers.monitor import SwarmMonitor, parse_progress, summarize
from crowdtrain.coordinator.peers.store import Store
from hivemind.p2p import PeerID

HEALTH = HealthSettings(2.0, 10.0, 20.0)


def _peer_id(seed: int) -> PeerID:
    return PeerID.from_base58(
        [
            "12D3KooWJEKEjuYSkMrRuT9ZycC2ruL8HYm9CuBufZ7CvThx3b2y",
            "12D3KooWDMYdLqGfw2JMDdk8scqbnrPbhdTgSX6WYWBCmJes1XcP",
        ][seed]
    )


def _entry(seed: int, epoch: int, samples: int, rate: float = 10.0, client: bool = False) -> dict:
    return dict(
        peer_id=_peer_id(seed).to_bytes(),
        epoch=epoch,
        samples_accumulated=samples,
        samples_per_second=rate,
        time=1.0,
        client_mode=client,
    )


def test_parse_skips_departed_and_malformed_entries():
    records = parse_progress([_entry(0, 3, 40), None, {"peer_id": b"x"}, _entry(1, 2, 0, client=True)])
    assert [(r.dht_peer_id, r.epoch, r.samples_accumulated, r.client_mode) for r in records] == [
        (_peer_id(0).to_base58(), 3, 40, False),
        (_peer_id(1).to_base58(), 2, 0, True),
    ]


def test_summary_uses_full_peers_for_the_epoch_and_everyone_for_throughput():
    records = parse_progress([_entry(0, 3, 40, 10.0), _entry(1, 9, 0, 5.0, client=True)])
    progress = summarize(records, now=50.0)
    assert (progress.global_epoch, progress.samples_per_s, progress.num_peers) == (3, 15.0, 2)


def test_ledger_keeps_the_largest_count_per_epoch_and_survives_reopen(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    store.add_contributions([("a", 1, 16), ("a", 1, 48), ("b", 1, 32)])
    store.add_contributions([("a", 1, 0), ("a", 2, 16)])  # a reset after loading state cannot shrink epoch 1
    assert store.contribution_totals() == {"a": 64, "b": 32}
    store.close()
    reopened = Store(tmp_path / "s.sqlite3")
    assert reopened.contribution_totals() == {"a": 64, "b": 32}
    reopened.close()


class _Found:
    def __init__(self, value):
        self.value = value


class _Future:
    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        return self._value

    def cancel(self):
        pass


class _FakeDHT:
    """Stands in for hivemind.DHT's `get` only; the real DHT read is covered by the swarm tests."""

    def __init__(self):
        self.entries: list[dict] = []

    def add_validators(self, validators):
        pass

    def get(self, key, latest, return_future):
        assert key == "run_progress" and latest and return_future
        return _Future(_Found({i: _Found(e) for i, e in enumerate(self.entries)}) if self.entries else None)


def test_tick_marks_heartbeating_peers_and_adds_dht_only_ones(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    clock = [1000.0]
    dht = _FakeDHT()
    credit = CreditSettings(target_batch_size=64, heartbeat_interval_s=HEALTH.heartbeat_interval_s)
    monitor = SwarmMonitor(dht, "run", store, HEALTH, credit, clock=lambda: clock[0], history_interval_s=5.0)
    hb_id = _peer_id(0).to_base58()
    store.upsert_peer(
        PeerRecord(
            session_id="s1",
            name="alice",
            joined_unix_s=990.0,
            last_seen_unix_s=1000.0,
            phase="training",
            dht_peer_id=hb_id,
            dht_verified=True,  # it proved the id (an unproven claim is not linked: test_hostile_peers)
        )
    )
    dht.entries = [_entry(0, 4, 64, 20.0), _entry(1, 4, 32, 12.0)]
    monitor.tick()
    alice = store.get_peer("s1")
    assert alice.dht_last_seen_unix_s == 1000.0 and alice.source == "heartbeat"
    ghost = store.get_peer(f"dht:{_peer_id(1).to_base58()}")
    assert ghost.source == "dht" and compute_state(1001.0, ghost, HEALTH)[0] is PeerState.ONLINE
    assert monitor.progress.global_epoch == 4 and monitor.progress.samples_per_s == pytest.approx(32.0)
    # a record's own samples are never credited: an epoch is, once the swarm passed it (test_credit)
    assert store.contribution_totals() == {}
    [point] = store.history()
    assert point["global_epoch"] == 4 and point["peers_training"] == 1

    # the ghost stops reporting: it goes DEAD once its record is older than the timeout
    clock[0] = 1012.0
    dht.entries = [_entry(0, 5, 16, 20.0)]
    monitor.tick()
    assert (
        compute_state(clock[0], store.get_peer(f"dht:{_peer_id(1).to_base58()}"), HEALTH)[0] is PeerState.DEAD
    )
    assert len(store.history()) == 2
    store.close()
