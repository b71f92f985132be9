"""A volunteer serving a forged state cannot get it published: the publisher asks several peers.

Two honest peers train; a third joins that claims the swarm's epoch and the highest donor priority
(so hivemind alone would download from it first) but serves 3x-scaled initial weights. Published
checkpoints must keep coming from the honest majority, the forger must be named in the recorded
disagreement, and with one honest peer against the forger nothing may be published at all.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.peer import checkpoint

pytestmark = pytest.mark.swarm
PUBLISHED = r"published checkpoint step=(\d+) eval_loss=([\d.]+)"


def line_index(child, text: str, start: int = 0) -> int:
    return next(i for i, line in enumerate(child.lines) if i >= start and text in line)


def test_a_forged_state_is_outvoted_and_never_published(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir, "--checkpoint-interval-s", "4", "--heartbeat-interval-s", "1"
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    honest = [
        launcher.start_peer(name, endpoints["grpc"], tmp_path / f"cache-{name}") for name in ("alice", "bob")
    ]
    agreed = launcher.wait_for_line(coordinator, r"chosen: 2 peers agree \(", timeout_s=420)
    launcher.wait_for_line(
        coordinator, PUBLISHED, timeout_s=60, start=line_index(coordinator, agreed.group(0))
    )

    forger = launcher.start_program(
        "forger", [sys.executable, str(Path(__file__).with_name("forger.py")), endpoints["grpc"]]
    )
    forger_id = launcher.wait_for_line(forger, r"forger: serving as (\w+)", timeout_s=180).group(1)
    outvoted = launcher.wait_for_line(
        coordinator, rf"chosen: 2 peers agree .*outvoted: peer {forger_id[-8:]} is ", timeout_s=300
    )
    after_vote = line_index(coordinator, outvoted.group(0))
    published = launcher.wait_for_line(coordinator, PUBLISHED, timeout_s=60, start=after_vote)
    assert float(published.group(2)) < endpoints["initial_eval_loss"], "the honest state was published"

    # one honest peer against the forger: no majority, so nothing is published
    honest[1].proc.send_signal(signal.SIGTERM)
    assert honest[1].proc.wait(timeout=120) == 0
    # honest peers caught mid-step can disagree for a moment earlier too: look only after bob left
    bob_left = len(coordinator.lines)
    stalemate = launcher.wait_for_line(
        coordinator,
        rf"peers disagree on the state of epoch \d+: .*{forger_id[-8:]}",
        timeout_s=300,
        start=bob_left,
    )
    start = line_index(coordinator, stalemate.group(0), bob_left)
    launcher.wait_for_line(
        coordinator, r"peers disagree on the state of epoch", timeout_s=60, start=start + 1
    )
    between = "\n".join(coordinator.lines[start:])
    assert "published checkpoint" not in between, between[-3000:]

    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/rejections", timeout=10) as response:
        reasons = [r["reason"] for r in json.loads(response.read())]
    assert any("outvoted" in r and forger_id[-8:] in r for r in reasons), reasons
    assert any("disagree" in r and forger_id[-8:] in r for r in reasons), reasons
    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/run", timeout=10) as response:
        public_key = json.loads(response.read())["signing_public_key"]
    root = data_dir / "checkpoints"
    for meta in checkpoint.list_checkpoints(root):
        checkpoint.verify_dir(root / checkpoint.step_dirname(meta.step), public_key=public_key)
        assert meta.eval_loss < endpoints["initial_eval_loss"]
    assert honest[0].proc.poll() is None, "the honest peer kept training"
