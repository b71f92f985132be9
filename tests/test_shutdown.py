"""Every way a volunteer stops leaves nothing behind: Ctrl+C, SIGTERM, and an error in training
(the operator bans the peer, which makes its training loop raise). No p2pd, no hivemind child."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from crowdtrain.coordinator.demo import cli_command

from tests.conftest import descendants_alive

pytestmark = pytest.mark.swarm
EPOCH_LINE = r"epoch=(\d+) loss="


def test_every_shutdown_path_leaves_no_process_behind(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir, "--heartbeat-interval-s", "1", "--checkpoint-interval-s", "0"
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    names = ("ctrl-c", "sigterm", "banned")
    peers = {n: launcher.start_peer(n, endpoints["grpc"], tmp_path / f"cache-{n}") for n in names}
    for peer in peers.values():
        launcher.wait_for_line(peer, EPOCH_LINE, timeout_s=300)
        assert len(descendants_alive([peer.proc.pid])) >= 4, "p2pd and hivemind's children run"

    os.killpg(peers["ctrl-c"].proc.pid, signal.SIGINT)  # a terminal sends Ctrl+C to the whole group
    peers["sigterm"].proc.send_signal(signal.SIGTERM)  # systemd, docker stop, kill
    banned = subprocess.run(
        cli_command("ban", "--data-dir", str(data_dir), "--peer", "banned"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert banned.returncode == 0, banned.stderr
    codes = {n: p.proc.wait(timeout=120) for n, p in peers.items()}
    assert codes == {"ctrl-c": 0, "sigterm": 0, "banned": 1}, codes
    assert "banned by the operator" in "\n".join(peers["banned"].lines[-5:])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and descendants_alive([p.proc.pid for p in peers.values()]):
        time.sleep(0.2)
    for name, peer in peers.items():
        assert not descendants_alive([peer.proc.pid]), f"{name} left processes behind"
    assert coordinator.proc.poll() is None
