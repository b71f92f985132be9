"""A real swarm: the coordinator and three volunteers as separate `crowdtrain` processes.

Asserts outcomes only: the held-out loss of a published checkpoint fell by at least 1 nat, a late
joiner started from the swarm's state (not from random init), the peers' parameters agree after
averaging, and `crowdtrain pull` gives a directory `transformers` loads and generates from.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from crowdtrain.coordinator.demo import cli_command
from safetensors.torch import load_file

from scripts.harness import events_named, index_after, rounds_together
from tests.helpers import ARTIFACTS

pytestmark = pytest.mark.swarm
MAX_EPOCHS = 16


def test_swarm_trains_publishes_and_a_late_joiner_catches_up(launcher, tmp_path: Path):
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--checkpoint-interval-s",
        "8",
        "--heartbeat-interval-s",
        "2",
        "--keep-last-checkpoints",
        "1000",  # the test pulls an early checkpoint at the end
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    initial_loss = endpoints["initial_eval_loss"]
    assert abs(initial_loss - math.log(2048)) < 0.5

    def start_peer(i: int):
        return launcher.start_peer(
            f"peer-{i}",
            endpoints["grpc"],
            tmp_path / "cache",
            "--max-epochs",
            str(MAX_EPOCHS),
            "--save-dir",
            str(tmp_path / f"saved-{i}"),
        )

    peers = [start_peer(0), start_peer(1)]

    # --- late join: after several epochs, a third peer must start from the swarm's state
    launcher.wait_for_event(peers[0], "epoch", timeout_s=420, where=lambda e: e["epoch"] >= 8)
    swarm_loss = events_named(peers[0], "epoch")[-1]["loss"]
    peers.append(start_peer(2))
    loaded = launcher.wait_for_event(peers[2], "state_loaded", timeout_s=300)
    assert loaded["epoch"] >= 7
    first = launcher.wait_for_event(peers[2], "epoch", timeout_s=300)
    first_loss = first["loss"]
    assert first_loss < math.log(2048) - 1.0, f"late joiner's first loss {first_loss} looks like random init"
    assert abs(first_loss - swarm_loss) < 0.8, (first_loss, swarm_loss)

    # --- a published checkpoint at least 1 nat better than the initial model
    published = None
    start = 0
    while published is None:
        e = launcher.wait_for_event(coordinator, "checkpoint_published", timeout_s=420, start=start)
        start = index_after(coordinator, e)
        if e["eval_loss"] <= initial_loss - 1.0:
            published = (e["step"], e["eval_loss"])

    # --- every peer trains to MAX_EPOCHS and leaves on its own
    for peer in peers:
        assert peer.proc.wait(timeout=900) == 0, "\n".join(peer.lines[-30:])
    for peer in peers[:2]:
        epochs = events_named(peer, "epoch")
        assert max(e["swarm_peers"] for e in epochs) >= 2, "peer never saw the others"
        assert epochs[-1]["loss"] < epochs[0]["loss"] - 1.0, "training loss did not fall"

    # --- parameters agree after averaging. The peers trained on different shards, so without
    # averaging they would be about as far apart as each is from the initial weights; hivemind
    # tolerates a failed or partial round (a peer then applies its local gradient for the missing
    # part until the next state averaging), so "agree" means: far closer to each other than to init.
    # Without averaging they would be about `travelled` apart; with it, typically ~1% of it. One
    # partial round after the last state averaging (every 5 epochs) leaves a peer about one local
    # AdamW step (~1 here, 4% of `travelled`) off the others: seen once in a clean-clone run, on 2
    # busy cores. 10% still fails any run whose averaging does not work.
    import urllib.request

    from crowdtrain.peer.run.manifest import RunManifest
    from crowdtrain.peer.run.model import build_model

    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/run", timeout=10) as response:
        initial = build_model(RunManifest.from_json(response.read().decode())).state_dict()
    states = [load_file(tmp_path / f"saved-{i}" / "model.safetensors") for i in range(3)]
    epochs = [int((tmp_path / f"saved-{i}" / "epoch.txt").read_text()) for i in range(3)]
    assert epochs == [MAX_EPOCHS] * 3

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5

    travelled = distance(states[0], initial)
    gaps = [distance(states[0], other) for other in states[1:]]
    max_diff = gaps[0] / travelled
    assert travelled > 1.0, f"peer 0 barely moved from its initial weights ({travelled})"
    together = rounds_together(peers[0], peers[1])
    assert sum(together.values()) >= 0.6 * len(together), (
        f"peers 0 and 1 rarely averaged together: {together}"
    )
    # a round that split them since the last state averaging (every 5 epochs) leaves each about one
    # local step off the other: ~4% of `travelled` each (seen 12% with the joiner's rounds in CI)
    splits = [epoch for epoch, ok in together.items() if epoch > MAX_EPOCHS - 5 and not ok]
    bound = 0.25 if splits else 0.10
    assert max_diff < bound, f"peers 0 and 1 differ by {gaps[0]}, travelled {travelled}; rounds: {together}"
    # the late joiner can lag the swarm by a few epochs on 2 busy cores (seen: 5), and once the
    # others leave at MAX_EPOCHS it trains its last epochs alone: it must still end in the swarm's
    # basin, far closer to the others than to the initial weights (without averaging: ~travelled)
    assert gaps[1] / travelled < 0.5, f"the late joiner ended {gaps[1]} from peer 0 (travelled {travelled})"

    # --- pull that checkpoint with the CLI; transformers loads it, generates, and scores it as published
    step, published_loss = published
    out = tmp_path / "pulled"
    result = subprocess.run(
        cli_command("pull", "--coordinator", endpoints["grpc"], "--out", str(out), "--step", str(step)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from crowdtrain.peer.data.shards import read_shard, tokenize_blocks
    from crowdtrain.peer.run.model import evaluate
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = "import os\n\ndef "
    torch.manual_seed(0)
    text = tokenizer.decode(
        model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=24, do_sample=True, top_k=20)[
            0
        ]
    )
    assert text.startswith(prompt) and len(text) > len(prompt)
    eval_texts = read_shard(data_dir / "data" / "eval.jsonl")
    blocks = tokenize_blocks(Tokenizer.from_file(str(out / "tokenizer.json")), eval_texts, 128)[:64]
    pulled_loss = evaluate(model, blocks)
    assert abs(pulled_loss - published_loss) < 1e-3, (pulled_loss, published_loss)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "swarm_summary.txt").write_text(
        f"initial eval loss {initial_loss:.3f}; first checkpoint >= 1 nat better: step {step} eval loss "
        f"{published_loss:.3f} (recomputed from the pull: {pulled_loss:.3f}); late joiner first loss "
        f"{first_loss:.3f} vs swarm {swarm_loss:.3f}; parameter distance between peers / distance travelled from init {max_diff:.2e}\n"
        f"sample: {text!r}\n"
    )
    for child in launcher.children:
        shutil.copy(child.log_path, ARTIFACTS / f"swarm-{child.name}.log")
