"""hivemind's "two DHTs" problem: peers that started apart must find each other through the
coordinator's bootstrap node and become one swarm.

Peer A trains while the coordinator crashes; peer B starts during the outage and joins when the
coordinator is back (same identity and address, empty memory). Neither knows the other: A's
routing table lost the bootstrap node, B's holds only the fresh one. A re-pings the bootstrap node
when its heartbeats get through again, so B must find A, load its state and train with it (B's
epoch numbers jump to A's: the state that survives is the one the swarm trained longer).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from scripts.harness import events_named, index_after

pytestmark = pytest.mark.swarm


def test_peers_that_started_apart_merge_into_one_swarm(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    args = ("--heartbeat-interval-s", "1", "--heartbeat-timeout-s", "6", "--checkpoint-interval-s", "0")
    coordinator = launcher.start_coordinator(data_dir, *args)
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    a = launcher.start_peer("peer-a", endpoints["grpc"], tmp_path / "cache-a")

    def next_epoch(peer, timeout_s: float, start: int) -> tuple[dict, int]:
        """`peer`'s next epoch event from index `start`, and the index after it."""
        epoch = launcher.wait_for_event(peer, "epoch", timeout_s, start)
        return epoch, index_after(peer, epoch)

    start = 0
    while True:  # A trains alone for a few epochs
        epoch, start = next_epoch(a, 300, start)
        if epoch["epoch"] >= 3:
            break

    os.killpg(coordinator.proc.pid, signal.SIGKILL)
    coordinator.proc.wait()
    (data_dir / "endpoints.json").unlink()
    b = launcher.start_peer("peer-b", endpoints["grpc"], tmp_path / "cache-b", "--join-timeout-s", "300")
    launcher.wait_for_event(b, "coordinator_unreachable", timeout_s=120)
    a_epoch_during_outage = launcher.wait_for_event(a, "epoch", 120, len(a.events))["epoch"]

    restarted = launcher.start_coordinator(data_dir, *args, name="coordinator-restarted")
    again = launcher.wait_for_endpoints(data_dir, restarted)
    assert again["grpc"] == endpoints["grpc"] and again["dht"] == endpoints["dht"]
    # B may first see nobody (A has not found the fresh bootstrap node yet) and train alone: two
    # swarms. A re-pings the bootstrap node when its heartbeats get through; then B sees A's epoch
    # ahead of its own, loads A's state and the two train as one.
    start = 0
    while True:
        epoch, start = next_epoch(b, 240, start)
        if epoch["epoch"] >= a_epoch_during_outage and epoch["swarm_peers"] >= 2:
            break
    launcher.wait_for_event(
        a, "swarm_rejoined", timeout_s=10, where=lambda e: (e["reached"], e["bootstrap_peers"]) == (1, 1)
    )
    start = len(a.events)
    while True:
        epoch, start = next_epoch(a, 120, start)
        if epoch["swarm_peers"] >= 2:
            break
    a_epochs = [e["epoch"] for e in events_named(a, "epoch")[-5:]]
    b_epochs = [e["epoch"] for e in events_named(b, "epoch")[-5:]]
    assert abs(a_epochs[-1] - b_epochs[-1]) <= 1, (a_epochs, b_epochs)
