"""The whole swarm leaves; volunteers come back and continue from the latest published checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm
EPOCH_LINE = r"epoch=(\d+) loss=([\d.]+) "


def checkpoints(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/checkpoints", timeout=10) as response:
        return json.loads(response.read())


def test_full_swarm_restart_resumes_from_the_latest_checkpoint(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--checkpoint-interval-s",
        "5",
        "--heartbeat-interval-s",
        "1",
        "--heartbeat-timeout-s",
        "6",
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    first = launcher.start_peer("first", endpoints["grpc"], tmp_path / "cache-1")
    # train until a checkpoint is clearly better than the initial model, so "resumed" is unmistakable
    target = endpoints["initial_eval_loss"] - 1.0
    start = 0
    while True:
        m = launcher.wait_for_line(
            coordinator, r"published checkpoint step=(\d+) eval_loss=([\d.]+)", timeout_s=420, start=start
        )
        start = next(i for i, line in enumerate(coordinator.lines) if m.group(0) in line) + 1
        if float(m.group(2)) <= target:
            break
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=120) == 0
    latest = checkpoints(endpoints["http"])[-1]

    # a newcomer with an empty cache: the swarm is empty, so it must start from that checkpoint
    second = launcher.start_peer("second", endpoints["grpc"], tmp_path / "cache-2")
    resumed = launcher.wait_for_line(
        second, r"resuming the run from published checkpoint step (\d+) \(eval loss ([\d.]+)\)", 300
    )
    assert int(resumed.group(1)) == latest["step"]
    first_epoch = launcher.wait_for_line(second, EPOCH_LINE, 300)
    first_loss = float(first_epoch.group(2))
    assert int(first_epoch.group(1)) > latest["step"], "epochs must continue from the checkpoint's step"
    assert first_loss < endpoints["initial_eval_loss"] - 0.7, (
        f"first loss {first_loss} looks like random init"
    )
    assert abs(first_loss - latest["eval_loss"]) < 0.6, (first_loss, latest["eval_loss"])

    # and the community keeps publishing from there
    m = launcher.wait_for_line(
        coordinator,
        r"published checkpoint step=(\d+) eval_loss=([\d.]+)",
        timeout_s=300,
        start=next(i for i, line in enumerate(coordinator.lines) if f"step={latest['step']} " in line) + 1,
    )
    assert int(m.group(1)) > latest["step"]
    assert float(m.group(2)) < latest["eval_loss"] + 0.25
    assert re.search(r"resuming", "\n".join(second.lines))


def peers(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/peers", timeout=10) as response:
        return json.loads(response.read())


def test_a_joiner_falls_back_to_the_latest_checkpoint_when_no_peer_can_send_the_state(
    launcher, tmp_path: Path
):
    """The swarm exists (its only peer is ONLINE at the joiner's Join) but cannot send its state.

    Join tells a newcomer to start from a checkpoint only when no peer trains; otherwise it joins
    the swarm and must fall back by itself. To make "the donor is online at Join" certain rather
    than a race between the joiner's start-up and the heartbeat interval, heartbeats are every
    60 s (a peer counts as online for 2 intervals) and the donor is frozen right after one.
    """
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--checkpoint-interval-s",
        "5",
        "--heartbeat-interval-s",
        "60",
        "--heartbeat-timeout-s",
        "600",
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    donor = launcher.start_peer("donor", endpoints["grpc"], tmp_path / "cache-1")
    target = endpoints["initial_eval_loss"] - 1.0
    start = 0
    while True:  # a checkpoint clearly better than random weights
        m = launcher.wait_for_line(
            coordinator, r"published checkpoint step=(\d+) eval_loss=([\d.]+)", 420, start
        )
        start = next(i for i, line in enumerate(coordinator.lines) if m.group(0) in line) + 1
        if float(m.group(2)) <= target:
            break
    # the only peer that could send the state freezes (a closed laptop lid) just after a heartbeat:
    # its DHT record stays, and the coordinator counts it online for the next 2 intervals (120 s)
    (seen,) = [p["last_seen_unix_s"] for p in peers(endpoints["http"]) if p["name"] == "donor"]
    deadline = time.monotonic() + 90
    while [p["last_seen_unix_s"] for p in peers(endpoints["http"]) if p["name"] == "donor"] == [seen]:
        assert time.monotonic() < deadline, "the donor sent no heartbeat in 90 s"
        time.sleep(0.2)
    os.killpg(donor.proc.pid, signal.SIGSTOP)
    try:
        joiner = launcher.start_peer("joiner", endpoints["grpc"], tmp_path / "cache-2")
        fell_back = launcher.wait_for_line(
            joiner,
            r"starting from published checkpoint step (\d+) and joining the swarm at epoch (\d+)",
            timeout_s=300,
        )
        latest = checkpoints(endpoints["http"])[-1]
        assert int(fell_back.group(1)) == latest["step"]
        first = launcher.wait_for_line(joiner, EPOCH_LINE, timeout_s=300)
        assert float(first.group(2)) < endpoints["initial_eval_loss"] - 0.7, "trained from the checkpoint"
    finally:
        os.killpg(donor.proc.pid, signal.SIGCONT)
    # the donor wakes up and both go on training together
    n = len(donor.lines)
    launcher.wait_for_line(donor, EPOCH_LINE, timeout_s=300, start=n)
    m = len(joiner.lines)
    launcher.wait_for_line(joiner, EPOCH_LINE, timeout_s=300, start=m)
