"""The whole swarm leaves; volunteers come back and continue from the latest published checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from scripts.harness import events_named, index_after

pytestmark = pytest.mark.swarm


def checkpoints(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/checkpoints", timeout=10) as response:
        return json.loads(response.read())


def wait_for_a_good_checkpoint(launcher, coordinator, target: float, timeout_s: float) -> dict:
    """The first checkpoint_published event with eval_loss <= target; each one may take timeout_s."""
    start = 0
    while True:
        published = launcher.wait_for_event(coordinator, "checkpoint_published", timeout_s, start)
        if published["eval_loss"] <= target:
            return published
        start = index_after(coordinator, published)


def test_full_swarm_restart_resumes_from_the_latest_checkpoint(launcher, tmp_path: Path):
    """In the low-communication mode (the fallback test below covers the synchronous one): a
    resumed peer's outer model, the copy hivemind keeps and peers share, must be the checkpoint's."""
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--checkpoint-interval-s",
        "5",
        "--heartbeat-interval-s",
        "1",
        "--heartbeat-timeout-s",
        "6",
        "--swarm",
        "mode=diloco",
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    first = launcher.start_peer("first", endpoints["grpc"], tmp_path / "cache-1")
    # train until a checkpoint is clearly better than the initial model, so "resumed" is unmistakable
    wait_for_a_good_checkpoint(launcher, coordinator, endpoints["initial_eval_loss"] - 1.0, 420)
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=120) == 0
    latest = checkpoints(endpoints["http"])[-1]

    # a newcomer with an empty cache: the swarm is empty, so it must start from that checkpoint
    second = launcher.start_peer("second", endpoints["grpc"], tmp_path / "cache-2")
    resumed = launcher.wait_for_event(second, "resumed_from_checkpoint", 300)
    assert resumed["step"] == latest["step"]
    first_epoch = launcher.wait_for_event(second, "epoch", 300)
    first_loss = first_epoch["loss"]
    assert first_epoch["epoch"] > latest["step"], "epochs must continue from the checkpoint's step"
    assert first_loss < endpoints["initial_eval_loss"] - 0.7, (
        f"first loss {first_loss} looks like random init"
    )
    assert abs(first_loss - latest["eval_loss"]) < 0.6, (first_loss, latest["eval_loss"])

    # and the community keeps publishing from there
    latest_published = launcher.wait_for_event(
        coordinator, "checkpoint_published", 60, where=lambda e: e["step"] == latest["step"]
    )
    published = launcher.wait_for_event(
        coordinator, "checkpoint_published", timeout_s=300, start=index_after(coordinator, latest_published)
    )
    assert published["step"] > latest["step"]
    assert published["eval_loss"] < latest["eval_loss"] + 0.25
    assert events_named(second, "resumed_from_checkpoint")


def peers(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/peers", timeout=10) as response:
        return json.loads(response.read())


def test_a_joiner_falls_back_to_the_latest_checkpoint_when_no_peer_can_send_the_state(
    launcher, tmp_path: Path
):
    """The swarm exists (its only peer is ONLINE at the joiner's Join) but cannot send its state.

    Join tells a newcomer to start from a checkpoint when no peer trains that a groupmate confirms
    (a lone donor is unconfirmed); otherwise it joins the swarm and must fall back by itself. To make "the donor is online at Join" certain rather
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
    # a checkpoint clearly better than random weights
    wait_for_a_good_checkpoint(launcher, coordinator, endpoints["initial_eval_loss"] - 1.0, 420)
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
        # a lone trainer that no groupmate confirms is no proof the swarm can send its state (its
        # own records are its own word), so Join names the latest checkpoint; had it said "load the
        # live state", the joiner would have fallen back by itself (`checkpoint_fallback`) and
        # resumed the same way
        resumed = launcher.wait_for_event(joiner, "resumed_from_checkpoint", timeout_s=300)
        latest = checkpoints(endpoints["http"])[-1]
        assert resumed["step"] == latest["step"]
        first = launcher.wait_for_event(joiner, "epoch", timeout_s=300)
        assert first["loss"] < endpoints["initial_eval_loss"] - 0.7, "trained from the checkpoint"
    finally:
        os.killpg(donor.proc.pid, signal.SIGCONT)
    # the donor wakes up and both go on training together
    n = len(donor.events)
    launcher.wait_for_event(donor, "epoch", timeout_s=300, start=n)
    m = len(joiner.events)
    launcher.wait_for_event(joiner, "epoch", timeout_s=300, start=m)
