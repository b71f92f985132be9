"""One DiLoCo peer alone, in a fresh process (hivemind forks; tests/test_diloco.py runs this with
`python -m tests.diloco_probe WORKDIR`): real hivemind Optimizer, DHT on 127.0.0.1, the tiny
test run in `mode=diloco`. Prints one JSON object with what the test checks:

- `reset_error`: max |model - outer| after the outer step (the model is reset to the outer model);
- `outer_error`: max |outer_after - expected| where expected is one Nesterov SGD step from the
  outer model on the pseudo-gradient (outer minus local) taken right before that step;
- `moved`: max |local - outer| before the outer step (inner steps did move the model);
- `losses`: the inner steps' losses.

`python -m tests.diloco_probe WORKDIR overlap` runs the same peer with `overlap_communication`, an
outer learning rate of 1 and no momentum: a lone peer's outer step then lands exactly where its
model was when the round began, so keeping the progress made since means the model never jumps.
It prints `outer_steps`, `jump` (max |model after - model before| over the opt.step calls that
applied an outer step) and `kept` (max |model - outer| right after one: the inner steps taken while
the round ran, which a plain copy of the outer model would throw away).

`--device cuda` (scripts/gpu_smoke.py) runs the first probe with the model and the inner AdamW on
a GPU. `python -m tests.diloco_probe WORKDIR copies` runs the first probe with the state averager keeping
its own copies of the tensors, as it does when the inner AdamW's state is on a GPU (hivemind shares
only CPU tensors in place), and adds `reuse_tensors`.

`python -m tests.diloco_probe WORKDIR stuck-leave` leaves the swarm while a round scheduled ahead is
looking for a group and its averager is frozen (SIGSTOP, woken 4 s later), so the cancel is not
taken within leave_swarm's wait: it prints `error` (what leave_swarm raised, or null) and
`alive` (averager processes still running after it), and must then exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

TARGET, MICRO = 8, 2  # 4 inner steps per outer step


def lone_peer(workdir: Path, device: str = "cpu", **swarm_settings):
    """(manifest, model, dht, inner optimizer, hivemind optimizer) of one peer in mode=diloco."""
    from crowdtrain.peer.run.model import build_model
    from crowdtrain.peer.swarm.lifecycle import use_fork_start_method
    from crowdtrain.peer.swarm.optimizers import inner_optimizer
    from crowdtrain.peer.swarm.wiring import make_optimizer, start_dht

    from tests.helpers import make_run

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(120):
        (corpus / f"m{i}.py").write_text(
            f"def f{i}(x):\n    return x * {i} + {i % 7}  # {i * 3}\n" * (1 + i % 5)
        )
    manifest, _ = make_run(workdir, corpus)
    swarm = dataclasses.replace(
        manifest.swarm,
        mode="diloco",
        target_batch_size=TARGET,
        batch_size_per_step=MICRO,
        matchmaking_time_s=1.0,
        **swarm_settings,
    )
    manifest = dataclasses.replace(manifest, swarm=swarm)
    use_fork_start_method()
    torch.manual_seed(0)
    model = build_model(manifest).to(device)
    dht = start_dht([], listen_host="127.0.0.1", attempts=1)
    inner = inner_optimizer(manifest, model)
    extras = inner.state_tensors()
    opt = make_optimizer(manifest, model, dht, batch_size_per_step=MICRO, verbose=False, extra_tensors=extras)
    return manifest, model, dht, inner, opt


def main(workdir: Path, device: str = "cpu") -> None:
    from crowdtrain.peer.run.model import as_batch
    from crowdtrain.peer.swarm.lifecycle import leave_swarm

    manifest, model, dht, inner, opt = lone_peer(workdir, device)
    swarm, extras = manifest.swarm, inner.state_tensors()
    result: dict = {"losses": [], "reuse_tensors": opt.state_averager.reuse_tensors, "device": device}
    outer = [p for g in opt.state_averager.optimizer.param_groups for p in g["params"]]
    vocab = manifest.model.config["vocab_size"]
    try:
        for step in range(TARGET // MICRO):
            batch = as_batch(torch.randint(2, vocab, (MICRO, 32)).tolist(), device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            inner.step()
            result["losses"].append(loss.item())
            if step == TARGET // MICRO - 1:  # this micro-batch completes the epoch: snapshot first
                outer_before = [p.detach().clone() for p in outer]
                local_before = [p.detach().to("cpu", copy=True) for p in model.parameters()]
            opt.step()
        assert opt.local_epoch == 1, f"no outer step happened (epoch {opt.local_epoch})"
        lr, m = swarm.outer_learning_rate, swarm.outer_momentum
        expected = [o - lr * (1 + m) * (o - loc) for o, loc in zip(outer_before, local_before, strict=True)]
        result["moved"] = max(
            float((loc - o).abs().max()) for o, loc in zip(outer_before, local_before, strict=True)
        )
        result["outer_error"] = max(float((p - e).abs().max()) for p, e in zip(outer, expected, strict=True))
        served = opt.state_averager.get_current_state()[1]  # what a joiner would download
        shared = served[len(outer) : len(outer) + len(extras)]
        result["inner_state_served"] = all(
            torch.equal(a, b.cpu()) for a, b in zip(shared, extras, strict=True)
        )
        result["inner_steps_counted"] = float(extras[-1])
        result["reset_error"] = max(
            float((p.cpu() - o).abs().max()) for p, o in zip(model.parameters(), outer, strict=True)
        )
    finally:
        leave_swarm(opt, dht)
    print(json.dumps(result))


def overlapped(workdir: Path, outer_steps: int = 3, max_inner_steps: int = 400) -> None:
    from crowdtrain.peer.run.model import as_batch
    from crowdtrain.peer.swarm.lifecycle import leave_swarm

    settings = dict(overlap_communication=True, outer_learning_rate=1.0, outer_momentum=0.0)
    manifest, model, dht, inner, opt = lone_peer(workdir, inner_warmup_steps=1, **settings)
    outer = [p for g in opt.state_averager.optimizer.param_groups for p in g["params"]]
    vocab = manifest.model.config["vocab_size"]
    result: dict = {"outer_steps": 0, "jump": 0.0, "kept": 0.0, "losses": []}
    landed = False  # an outer step landed in hivemind's thread; the next opt.step writes it in
    try:
        last_outer = [p.detach().clone() for p in outer]
        for _ in range(max_inner_steps):
            batch = as_batch(torch.randint(2, vocab, (MICRO, 32)).tolist(), "cpu")
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            inner.step()
            result["losses"].append(loss.item())
            with torch.no_grad():
                before = [p.detach().clone() for p in model.parameters()]
                if landed:  # the inner steps taken since the round began: a plain copy loses them
                    kept = max(float((a - o).abs().max()) for a, o in zip(before, outer, strict=True))
                    result["kept"], landed = max(result["kept"], kept), False
                    if result["outer_steps"] >= outer_steps:
                        break
                opt.step()  # writes a landed outer step into the model, or begins a round
                jump = max(
                    float((a - b).abs().max()) for a, b in zip(model.parameters(), before, strict=True)
                )
                result["jump"] = max(result["jump"], jump)
                if any(not torch.equal(a, b) for a, b in zip(outer, last_outer, strict=True)):
                    last_outer, landed = [p.detach().clone() for p in outer], True
                    result["outer_steps"] += 1
    finally:
        leave_swarm(opt, dht)
    print(json.dumps(result))


def stuck_leave(workdir: Path) -> None:
    import os
    import signal
    import threading
    import time

    from crowdtrain.peer.swarm.lifecycle import leave_swarm
    from hivemind.averaging.control import AveragingStage
    from hivemind.utils import get_dht_time

    _, _, dht, _, opt = lone_peer(workdir)
    averager = opt.grad_averager
    opt.scheduled_grads = averager.schedule_step(scheduled_time=get_dht_time() + 60, timeout=120)
    deadline = time.monotonic() + 30
    while opt.scheduled_grads.stage != AveragingStage.LOOKING_FOR_GROUP and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(averager.pid, signal.SIGSTOP)  # a starved averager: it takes the cancel late
    waker = threading.Timer(4.0, os.kill, (averager.pid, signal.SIGCONT))
    waker.start()
    result: dict = {"error": None}
    try:
        leave_swarm(opt, dht, timeout_s=1.0)
    except Exception as e:
        result["error"] = repr(e)
    waker.join()
    result["alive"] = [a.is_alive() for a in (opt.state_averager, averager)]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    device = "cpu"
    if "--device" in args:  # scripts/gpu_smoke.py: the first probe with the model on a GPU
        at = args.index("--device")
        device = args[at + 1]
        del args[at : at + 2]
    if args[1:] == ["overlap"]:
        overlapped(Path(args[0]))
    elif args[1:] == ["copies"]:
        import crowdtrain.peer.swarm.averaging

        crowdtrain.peer.swarm.averaging.all_on_host = lambda tensors: False  # what a GPU's tensors give
        main(Path(args[0]))
    elif args[1:] == ["stuck-leave"]:
        stuck_leave(Path(args[0]))
    else:
        main(Path(args[0]), device)
