"""The low-communication mode (`swarm.mode = "diloco"`, peer/swarm/diloco.py): its settings are checked,
and one real hivemind Optimizer takes DiLoCo's outer step exactly (the swarm-level behaviour is in
tests/test_swarm.py's DiLoCo run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from crowdtrain.peer.run.manifest import ManifestError, get_preset, override_swarm
from crowdtrain.peer.swarm.optimizers import inner_optimizer, outer_optimizer

ROOT = Path(__file__).resolve().parent.parent


def test_the_mode_and_its_outer_step_settings_are_checked():
    tiny = get_preset("tiny").swarm
    assert tiny.mode == "sync"
    diloco = override_swarm(tiny, ["mode=diloco", "outer_learning_rate=0.5", "outer_momentum=0.8"])
    assert (diloco.mode, diloco.outer_learning_rate, diloco.outer_momentum) == ("diloco", 0.5, 0.8)
    assert override_swarm(tiny, ["mode=diloco", "overlap_communication=true"]).overlap_communication
    for bad, message in (
        (["mode=async"], "not one of"),
        (["outer_learning_rate=0"], "outer_learning_rate"),
        (["outer_momentum=1"], "outer_momentum"),
        (["inner_warmup_steps=0"], "positive"),
    ):
        with pytest.raises(ManifestError, match=message):
            override_swarm(tiny, bad)


def test_the_inner_learning_rate_warms_up_over_local_steps_and_a_joiner_continues_the_count():
    from crowdtrain.peer.swarm.optimizers import adamw

    model = torch.nn.Linear(3, 1, bias=False)
    manifest = SimpleNamespace(
        optim=get_preset("tiny").optim,
        swarm=override_swarm(get_preset("tiny").swarm, ["mode=diloco", "inner_warmup_steps=4"]),
    )
    inner = inner_optimizer(manifest, model)
    assert isinstance(
        inner.optimizer, type(adamw([torch.nn.Parameter(torch.zeros(1))], optim=manifest.optim))
    )
    seen = []
    for _ in range(6):
        model.weight.grad = torch.ones(1, 3)
        inner.step()
        seen.append(inner.optimizer.param_groups[0]["lr"] / manifest.optim.learning_rate)
        assert torch.equal(model.weight.grad, torch.zeros(1, 3)), (
            "gradients are cleared after every inner step"
        )
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # a joiner receives these tensors (moments and step counts) in place, and so its warm-up is over
    joiner = inner_optimizer(manifest, torch.nn.Linear(3, 1, bias=False))
    for mine, theirs in zip(joiner.state_tensors(), inner.state_tensors(), strict=True):
        mine.copy_(theirs)
    joiner.optimizer.param_groups[0]["params"][0].grad = torch.ones(1, 3)
    joiner.step()
    assert joiner.optimizer.param_groups[0]["lr"] == manifest.optim.learning_rate


def test_the_outer_optimizer_is_nesterov_sgd_on_the_pseudo_gradient():
    outer = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = outer_optimizer([outer], learning_rate=0.7, momentum=0.9)
    delta = torch.tensor([0.5, 0.25])  # outer minus local: the local model moved by -delta
    outer.grad = delta.clone()
    opt.step()
    assert torch.allclose(outer.detach(), torch.tensor([1.0, -2.0]) - 0.7 * 1.9 * delta)


def run_probe(workdir: Path, *args: str) -> dict:
    """tests/diloco_probe.py in a fresh process (hivemind forks); its JSON result."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.diloco_probe", str(workdir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["cpu", "gpu-like"])
def test_a_diloco_peer_takes_the_outer_step_and_resets_its_model(tmp_path: Path, where: str):
    """The real hivemind Optimizer (its offloaded copy is the outer model) with our averager: after
    4 inner steps, one outer step from the pseudo-gradient, and the model reset to the result.
    "gpu-like": the state averager keeps copies of the tensors, as it must when the inner AdamW's
    state is on a GPU (hivemind 1.1.12 refuses to share those in place and the optimizer was never
    built; no GPU here, so the copying path runs on the CPU)."""
    result = run_probe(tmp_path, *(["copies"] if where == "gpu-like" else []))
    assert result["reuse_tensors"] is (where == "cpu"), result
    assert result["moved"] > 1e-4, "the inner steps moved the model away from the outer one"
    assert result["outer_error"] < 1e-5, result
    assert result["reset_error"] == 0.0, result
    assert result["inner_state_served"] and result["inner_steps_counted"] == 4.0, (
        "joiners get the inner AdamW"
    )
    assert len(result["losses"]) == 4 and all(math.isfinite(x) for x in result["losses"])


@pytest.mark.parametrize("name, bytes_ratio, max_error", [("float16", 0.51, 1e-3), ("uint8", 0.26, 0.03)])
def test_each_gradient_codec_decodes_what_it_encodes(name: str, bytes_ratio: float, max_error: float):
    """What a peer sends with `grad_compression=NAME` (hivemind's codecs): smaller, and close to the
    original. uint8 also proves the numpy pin: hivemind 1.1.12's 8-bit decoder fails on numpy>=2.4."""
    from crowdtrain.peer.swarm.averaging import grad_compression
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    torch.manual_seed(0)
    pseudo_gradient = torch.randn(200_000) * 3e-3 + 1e-4  # 32 AdamW steps of ~1e-4 each
    codec = grad_compression(name)
    sent = serialize_torch_tensor(pseudo_gradient, codec.compression_type)
    received = deserialize_torch_tensor(sent)
    assert received.shape == pseudo_gradient.shape and received.dtype == torch.float32
    assert len(sent.buffer) <= bytes_ratio * 4 * pseudo_gradient.numel(), len(sent.buffer)
    error = float((received - pseudo_gradient).norm() / pseudo_gradient.norm())
    assert error < max_error, error


def test_an_overlapped_outer_step_keeps_the_inner_steps_taken_meanwhile(tmp_path: Path):
    """overlap_communication in mode=diloco: the round runs while inner steps go on, and the outer
    step must not throw them away. A lone peer with outer learning rate 1 and no momentum lands its
    outer step exactly where its model was when the round began, so the model must never jump,
    although it moved while the round ran (hivemind's plain copy would move it back by that much)."""
    result = run_probe(tmp_path, "overlap")
    assert result["outer_steps"] >= 3, result
    assert result["kept"] > 1e-4, f"no inner step ran while a round did: {result}"
    assert result["jump"] < 1e-5, result
    assert all(math.isfinite(x) for x in result["losses"])


DILOCO_EPOCHS = 6


@pytest.mark.swarm
def test_a_diloco_swarm_trains_agrees_publishes_and_takes_a_joiner(launcher, tmp_path: Path):
    """Three volunteers as real processes in mode=diloco (16 local AdamW steps per peer between
    outer steps): the loss falls, the two that trained throughout end with the same outer model,
    a late joiner starts from the swarm's state, and the coordinator publishes a better model."""
    from safetensors.torch import load_file

    from scripts.harness import events_named, rounds_together

    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--checkpoint-interval-s",
        "8",
        "--heartbeat-interval-s",
        "2",
        "--swarm",
        "mode=diloco",
        "target_batch_size=512",
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    initial_loss = endpoints["initial_eval_loss"]

    def start_peer(i: int):
        args = ("--max-epochs", str(DILOCO_EPOCHS), "--save-dir", str(tmp_path / f"saved-{i}"))
        return launcher.start_peer(f"peer-{i}", endpoints["grpc"], tmp_path / "cache", *args)

    peers = [start_peer(0), start_peer(1)]
    launcher.wait_for_event(peers[0], "epoch", timeout_s=420, where=lambda e: e["epoch"] >= 2)
    swarm_loss = events_named(peers[0], "epoch")[-1]["loss"]
    peers.append(start_peer(2))
    loaded = launcher.wait_for_event(peers[2], "state_loaded", timeout_s=300)
    assert loaded["epoch"] >= 2
    first_loss = launcher.wait_for_event(peers[2], "epoch", timeout_s=300)["loss"]
    # not random init, and not worse than the swarm before it joined (the swarm keeps improving while
    # the joiner starts: seen 5.34 against the 6.27 sampled then)
    assert first_loss < initial_loss - 1.0 and first_loss < swarm_loss + 0.8, (first_loss, swarm_loss)
    published = launcher.wait_for_event(
        coordinator,
        "checkpoint_published",
        timeout_s=420,
        where=lambda e: e["eval_loss"] < initial_loss - 1.0,
    )
    for peer in peers:
        assert peer.proc.wait(timeout=600) == 0, "\n".join(peer.lines[-30:])
    for peer in peers[:2]:
        epochs = events_named(peer, "epoch")
        assert max(e["swarm_peers"] for e in epochs) >= 2, "peer never saw the others"
        assert epochs[-1]["loss"] < epochs[0]["loss"] - 1.0, "training loss did not fall"
    together = rounds_together(peers[0], peers[1])
    assert sum(together.values()) >= len(together) / 2, f"peers 0 and 1 rarely averaged together: {together}"
    # Each saved its model right after the last outer step, which resets it to the outer model.
    # The two agree exactly only if no round (of pseudo-gradients or of state) ever split them: a
    # peer that steps alone keeps that difference until a state round that groups them both. Seen:
    # 0 with no split; 0.045 of the distance travelled from init after a split first round, 0.117
    # after a split last one (the joiner's first round held a partner until its timeout). Without
    # averaging they would end about as far apart as they travelled.
    import urllib.request

    from crowdtrain.peer.run.manifest import RunManifest
    from crowdtrain.peer.run.model import build_model

    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/run", timeout=10) as response:
        initial = build_model(RunManifest.from_json(response.read().decode())).state_dict()
    states = [load_file(tmp_path / f"saved-{i}" / "model.safetensors") for i in range(2)]

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5

    travelled, gap = distance(states[0], initial), distance(states[0], states[1])
    assert gap < 0.25 * travelled, (
        f"outer models {gap} apart, travelled {travelled}; rounds together: {together}"
    )
    assert published["step"] >= 1


@pytest.mark.parametrize(
    "codebook_size, indices, dtype, size",
    [
        (2**62, b"\x00" * 16, "float32", [16]),  # a codebook far longer than the message
        (-5, b"\x00" * 16, "float32", [16]),
        (2, bytes(range(16)), "float32", [16]),  # indices past the codebook's end
        (256, b"\x00" * 16, "float32", [1 << 20]),  # a shape larger than the values sent
        (256, b"\x00" * 16, "manual_seed", [16]),  # a dtype naming something else in torch
    ],
)
def test_a_hostile_8_bit_part_fails_to_decode_without_allocating(codebook_size, indices, dtype, size):
    """The sender picks a part's codec, so any peer may send 8-bit parts whatever the run uses. A
    malformed one must fail to decode (hivemind's reducer then drops that sender from the round)
    rather than allocate what it claims or decode to garbage."""
    import numpy as np
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.proto import runtime_pb2

    codebook = np.zeros(min(max(codebook_size, 0), 256), dtype=np.float32).tobytes()
    part = runtime_pb2.Tensor(
        compression=runtime_pb2.UNIFORM_8BIT,
        buffer=np.int64(codebook_size).tobytes() + codebook + indices,
        size=size,
        dtype=dtype,
    )
    with pytest.raises((ValueError, IndexError, TypeError, AttributeError, RuntimeError)):
        deserialize_torch_tensor(part)
