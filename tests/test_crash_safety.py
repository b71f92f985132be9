"""kill -9 the coordinator while it writes a checkpoint: after a restart no partial checkpoint is
listed, every listed one verifies against the run's key, and publishing goes on."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.peer.checkpoints import format as checkpoint

pytestmark = pytest.mark.swarm


def test_kill_9_during_a_checkpoint_write(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    args = (
        "--checkpoint-interval-s",
        "1",
        "--keep-last-checkpoints",
        "1000",
    )
    coordinator = launcher.start_coordinator(data_dir, *args)
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    launcher.start_peer("trainer", endpoints["grpc"], tmp_path / "cache")
    root = data_dir / "checkpoints"
    launcher.wait_for_event(coordinator, "checkpoint_published", timeout_s=300)

    # wait for the next write to begin, then kill the coordinator's whole process group mid-write
    deadline = time.monotonic() + 300
    caught = None
    while caught is None and time.monotonic() < deadline:
        caught = next(iter(root.glob(".tmp-*")), None)
        if caught is None:
            time.sleep(0.002)
    assert caught is not None, "never saw a checkpoint being written"
    os.killpg(coordinator.proc.pid, signal.SIGKILL)
    coordinator.proc.wait()
    assert list(root.glob(".tmp-*")), "the kill should have left an unfinished write behind"
    before = [m.step for m in checkpoint.list_checkpoints(root)]
    assert before, "the previous checkpoint must still be listed"

    restarted = launcher.start_coordinator(data_dir, *args, name="coordinator-restarted")
    launcher.wait_for_event(restarted, "coordinator_ready", timeout_s=300)
    assert not list(root.glob(".tmp-*")), "leftovers of the interrupted write must be removed"
    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/run", timeout=10) as response:
        public_key = json.loads(response.read())["signing_public_key"]
    assert public_key
    for meta in checkpoint.list_checkpoints(root):
        checkpoint.verify_dir(root / checkpoint.step_dirname(meta.step), public_key=public_key)
    launcher.wait_for_event(restarted, "checkpoint_published", timeout_s=150)
    after = [m.step for m in checkpoint.list_checkpoints(root)]
    assert after[: len(before)] == before and len(after) > len(before)
