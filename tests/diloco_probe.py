"""One DiLoCo peer alone, in a fresh process (hivemind forks; tests/test_diloco.py runs this with
`python -m tests.diloco_probe WORKDIR`): real hivemind Optimizer, DHT on 127.0.0.1, the tiny
test run in `mode=diloco`. Prints one JSON object with what the test checks:

- `reset_error`: max |model - outer| after the outer step (the model is reset to the outer model);
- `outer_error`: max |outer_after - expected| where expected is one Nesterov SGD step from the
  outer model on the pseudo-gradient (outer minus local) taken right before that step;
- `moved`: max |local - outer| before the outer step (inner steps did move the model);
- `losses`: the inner steps' losses.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

TARGET, MICRO = 8, 2  # 4 inner steps per outer step


def main(workdir: Path) -> None:
    from crowdtrain.peer.model import as_batch, build_model
    from crowdtrain.peer.optimizers import inner_optimizer
    from crowdtrain.peer.processes import use_fork_start_method
    from crowdtrain.peer.swarm import leave_swarm, make_optimizer, start_dht

    from tests.conftest import make_run

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
    )
    manifest = dataclasses.replace(manifest, swarm=swarm)
    use_fork_start_method()
    torch.manual_seed(0)
    model = build_model(manifest)
    dht = start_dht([], listen_host="127.0.0.1", attempts=1)
    inner = inner_optimizer(manifest, model)
    extras = inner.state_tensors()
    opt = make_optimizer(manifest, model, dht, batch_size_per_step=MICRO, verbose=False, extra_tensors=extras)
    outer = [p for g in opt.state_averager.optimizer.param_groups for p in g["params"]]
    vocab = manifest.model.config["vocab_size"]
    result: dict = {"losses": []}
    try:
        for step in range(TARGET // MICRO):
            batch = as_batch(torch.randint(2, vocab, (MICRO, 32)).tolist(), "cpu")
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            inner.step()
            result["losses"].append(loss.item())
            if step == TARGET // MICRO - 1:  # this micro-batch completes the epoch: snapshot first
                outer_before = [p.detach().clone() for p in outer]
                local_before = [p.detach().clone() for p in model.parameters()]
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
        result["inner_state_served"] = all(torch.equal(a, b) for a, b in zip(shared, extras, strict=True))
        result["inner_steps_counted"] = float(extras[-1])
        result["reset_error"] = max(
            float((p - o).abs().max()) for p, o in zip(model.parameters(), outer, strict=True)
        )
    finally:
        leave_swarm(opt, dht)
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
