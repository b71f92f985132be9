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
import re
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm
EPOCH = r"epoch=(\d+) loss=([\d.]+) samples_per_s=[\d.]+ swarm_peers=(\d+)"


def test_peers_that_started_apart_merge_into_one_swarm(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    args = ("--heartbeat-interval-s", "1", "--heartbeat-timeout-s", "6", "--checkpoint-interval-s", "0")
    coordinator = launcher.start_coordinator(data_dir, *args)
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    a = launcher.start_peer("peer-a", endpoints["grpc"], tmp_path / "cache-a")
    start = 0
    while int(launcher.wait_for_line(a, EPOCH, 300, start).group(1)) < 3:
        start = len(a.lines)

    os.killpg(coordinator.proc.pid, signal.SIGKILL)
    coordinator.proc.wait()
    (data_dir / "endpoints.json").unlink()
    b = launcher.start_peer("peer-b", endpoints["grpc"], tmp_path / "cache-b", "--join-timeout-s", "300")
    launcher.wait_for_line(b, r"coordinator .* unreachable|retrying|waiting", timeout_s=120)
    a_epoch_during_outage = int(launcher.wait_for_line(a, EPOCH, 120, len(a.lines)).group(1))

    restarted = launcher.start_coordinator(data_dir, *args, name="coordinator-restarted")
    again = launcher.wait_for_endpoints(data_dir, restarted)
    assert again["grpc"] == endpoints["grpc"] and again["dht"] == endpoints["dht"]
    # B may first see nobody (A has not found the fresh bootstrap node yet) and train alone: two
    # swarms. A re-pings the bootstrap node when its heartbeats get through; then B sees A's epoch
    # ahead of its own, loads A's state and the two train as one.
    start = 0
    while True:
        m = launcher.wait_for_line(b, EPOCH, timeout_s=240, start=start)
        start = b.lines.index(next(line for line in b.lines[start:] if m.group(0) in line)) + 1
        if int(m.group(1)) >= a_epoch_during_outage and int(m.group(3)) >= 2:
            break
    launcher.wait_for_line(a, r"re-joined the swarm through 1 of 1 bootstrap peer", timeout_s=10)
    start = len(a.lines)
    while int(launcher.wait_for_line(a, EPOCH, 120, start).group(3)) < 2:
        start = len(a.lines)
    a_epochs = [int(m.group(1)) for line in a.lines[-5:] if (m := re.search(EPOCH, line))]
    b_epochs = [int(m.group(1)) for line in b.lines[-5:] if (m := re.search(EPOCH, line))]
    assert abs(a_epochs[-1] - b_epochs[-1]) <= 1, (a_epochs, b_epochs)
