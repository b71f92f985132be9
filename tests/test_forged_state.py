"""A volunteer serving a forged state cannot get it published: the publisher asks several voters.

Two honest peers train; a third joins that claims the swarm's epoch (in its state and its signed
progress record) and the highest donor priority (so hivemind alone would download from it first)
but serves 3x-scaled initial weights. It is admitted and heartbeats like any volunteer, so once it
is long-standing (`PublisherSettings.min_voter_age_s`) it is a voter: published checkpoints must
keep coming from the honest majority, the forger must be named in the recorded disagreement, and
with one honest peer against the forger nothing may be published at all. (Identities that are not
voters are never asked: tests/test_state_trust.py.)
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.peer.checkpoints import format as checkpoint

from scripts.harness import events_named, index_after

pytestmark = pytest.mark.swarm


def test_a_forged_state_is_outvoted_and_never_published(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir, "--checkpoint-interval-s", "4", "--heartbeat-interval-s", "1"
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    honest = [
        launcher.start_peer(name, endpoints["grpc"], tmp_path / f"cache-{name}") for name in ("alice", "bob")
    ]
    agreed = launcher.wait_for_event(
        coordinator, "state_chosen", timeout_s=420, where=lambda e: len(e["agreeing"]) == 2
    )
    launcher.wait_for_event(
        coordinator, "checkpoint_published", timeout_s=60, start=index_after(coordinator, agreed)
    )

    forger_cmd = [sys.executable, str(Path(__file__).with_name("forger.py")), endpoints["grpc"]]
    forger = launcher.start_program("forger", [*forger_cmd, "--cache-dir", str(tmp_path / "cache-forger")])
    forger_id = launcher.wait_for_event(forger, "forger_serving", timeout_s=300)["peer_id"]
    outvoted = launcher.wait_for_event(
        coordinator,
        "state_chosen",
        timeout_s=420,  # it votes once it is long-standing (min_voter_age_s)
        where=lambda e: len(e["agreeing"]) == 2 and forger_id in e["outvoted"],
    )
    published = launcher.wait_for_event(
        coordinator, "checkpoint_published", timeout_s=60, start=index_after(coordinator, outvoted)
    )
    assert published["eval_loss"] < endpoints["initial_eval_loss"], "the honest state was published"

    # one honest peer against the forger: no majority, so nothing is published
    honest[1].proc.send_signal(signal.SIGTERM)
    assert honest[1].proc.wait(timeout=120) == 0
    # honest peers caught mid-step can disagree for a moment earlier too: look only after bob left
    bob_left = len(coordinator.events)
    stalemate = launcher.wait_for_event(
        coordinator,
        "state_disagreement",
        timeout_s=300,
        start=bob_left,
        where=lambda e: forger_id in e["peers"],
    )
    after_stalemate = index_after(coordinator, stalemate)
    launcher.wait_for_event(coordinator, "state_disagreement", timeout_s=60, start=after_stalemate)
    published_meanwhile = events_named(coordinator, "checkpoint_published", after_stalemate)
    assert not published_meanwhile, "\n".join(coordinator.lines[-60:])

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
