"""The whole swarm leaves; volunteers come back and continue from the latest published checkpoint."""

from __future__ import annotations

import json
import re
import signal
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
