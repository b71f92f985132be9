"""Honest spreads that peer/robust/reduce.py's constants were chosen from (`python -m scripts.bench_robust --spread`).

Senders are honest peers: the tiny preset's model (hidden 128, 2 layers, vocab 2,048) on different
Zipf-distributed token batches, each peer accumulating 1 to 10 batches (its declared weight), at
initialisation and after 30 training steps; and synthetic gradients `signal + noise / sqrt(weight)`
with noise 0.1x to 10x the signal. Parts are split per tensor into 131,072 values as hivemind does.
For each trial it records what the constants must stay clear of: the largest distance to the
aggregate over the median one (tau_factor), the honest span distance over the span's tau
(outlier_factor), the lowest cosine to the aggregate in parts of >= 4,096 values (flip_cosine), the
largest returned delta over the reference norm (delta_bound), and any verdict at all (must be none).
"""

from __future__ import annotations

import math

import torch
from crowdtrain.peer.robust.reduce import DEFAULT, SpanEvidence, robust_reduce

PART_VALUES = 2**17


def _split(flat_tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per tensor, hivemind's split into parts of PART_VALUES values."""
    return [list(t.reshape(-1).split(PART_VALUES)) for t in flat_tensors]


def _tiny_model():
    from crowdtrain.peer.run.manifest import get_preset
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", bos_token_id=None, eos_token_id=0, pad_token_id=1, **get_preset("tiny").model_config()
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _zipf_batch(generator: torch.Generator, vocab: int, batch: int = 16, seq: int = 128) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    return torch.multinomial(probs / probs.sum(), batch * seq, replacement=True, generator=generator).reshape(
        batch, seq
    )


def model_gradients(
    num_senders: int, weights: list[int], seed: int, trained_steps: int
) -> list[list[torch.Tensor]]:
    """Each sender's mean gradient over `weights[i]` batches, as a list of tensors."""
    model = _tiny_model()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    if trained_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(trained_steps):
            batch = _zipf_batch(generator, vocab)
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    senders = []
    for i in range(num_senders):
        model.zero_grad()
        for _ in range(weights[i]):
            batch = _zipf_batch(generator, vocab)
            (model(input_ids=batch, labels=batch).loss / weights[i]).backward()
        senders.append([p.grad.detach().clone() for p in model.parameters()])
    return senders


def synthetic_gradients(
    num_senders: int, weights: list[int], noise: float, seed: int
) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    signal = [torch.randn(s, generator=generator) for s in ((300_000,), (4096,), (64,))]
    return [
        [g + noise / math.sqrt(weights[i]) * torch.randn(g.shape, generator=generator) for g in signal]
        for i in range(num_senders)
    ]


def measure(senders: list[list[torch.Tensor]], weights: list[int]) -> dict:
    """The honest figures of one trial (see the module docstring)."""
    n = len(senders)
    parts_by_sender = [_split(tensors) for tensors in senders]
    evidence = SpanEvidence(n)
    figures = dict(dist_over_median=0.0, min_cosine=1.0, delta_over_reference=0.0, mean_error=0.0)
    whole_norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors)) for tensors in senders]
    total = sum(t.numel() for t in senders[0])
    for t_index, tensor_parts in enumerate(parts_by_sender[0]):
        for p_index in range(len(tensor_parts)):
            parts = [parts_by_sender[i][t_index][p_index] for i in range(n)]
            result = robust_reduce(parts, [float(w) for w in weights])
            evidence.add(result)
            x = torch.stack([p.reshape(-1) for p in parts])
            dist = (x - result.aggregate.reshape(-1)).norm(dim=1)
            if float(dist.median()) > 0:
                figures["dist_over_median"] = max(
                    figures["dist_over_median"], float(dist.max() / dist.median())
                )
            weighted = (torch.tensor(weights, dtype=torch.float32)[:, None] * x).sum(0) / sum(weights)
            scale = float(weighted.norm()) or 1.0
            figures["mean_error"] = max(
                figures["mean_error"], float((weighted - result.aggregate.reshape(-1)).norm()) / scale
            )
            if x.shape[1] >= DEFAULT.min_flip_numel:
                agg = result.aggregate.reshape(-1)
                cos = (x @ agg) / (x.norm(dim=1) * agg.norm()).clamp_min(1e-30)
                figures["min_cosine"] = min(figures["min_cosine"], float(cos.min()))
            for i in range(n):
                floor = whole_norms[i] * math.sqrt(x.shape[1] / total)
                reference = max(float(x[i].norm()), floor)
                if reference > 0:
                    ratio = float((result.aggregate.reshape(-1) - x[i]).norm()) / reference
                    figures["delta_over_reference"] = max(figures["delta_over_reference"], ratio)
    tau = math.sqrt(evidence.sq_tau) or 1.0
    figures["span_dist_over_tau"] = float(evidence.sq_dist.sqrt().max()) / tau
    figures["verdicts"] = evidence.verdicts()
    return figures


def run_spread(trials: int = 8) -> None:
    generator = torch.Generator().manual_seed(1)
    worst: dict = {}
    for trial in range(trials):
        n = 2 + trial % 7
        weights = torch.randint(1, 11, (n,), generator=generator).tolist()
        cases = [
            ("model@init", model_gradients(n, weights, trial, 0)),
            ("model@30", model_gradients(n, weights, trial, 30)),
        ]
        for noise in (0.1, 1.0, 10.0):
            cases.append((f"synthetic noise {noise:g}", synthetic_gradients(n, weights, noise, trial)))
        for name, senders in cases:
            figures = measure(senders, weights)
            print(
                f"trial {trial} n={n} weights={weights} {name}: "
                + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
            )
            for key in ("dist_over_median", "delta_over_reference", "mean_error", "span_dist_over_tau"):
                worst[key] = max(worst.get(key, 0.0), figures[key])
            worst["min_cosine"] = min(worst.get("min_cosine", 1.0), figures["min_cosine"])
            worst["verdicts"] = worst.get("verdicts", 0) + len(figures["verdicts"])
    print("worst over all trials: " + " ".join(f"{k}={v:.3g}" for k, v in worst.items()))
