"""What a state must pass before it is published, and the model card that goes with it. Pure.

`check_tensor` / `check_tensors` hold each downloaded tensor to the model's own parameter (shape,
dtype, finite) *before* anything is copied into the model: `Tensor.copy_` broadcasts, so a (1,)
tensor copied first would fill a whole matrix and pass any shape check made afterwards.
`check_candidate` returns None for a publishable state or the reason it is rejected; the publisher
records rejections (shown by `crowdtrain status`, /api/v1/state and the dashboard).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crowdtrain.peer.run.manifest import RunManifest


@dataclass(frozen=True)
class ExpectedTensor:
    """One parameter of the model, as a downloaded state must hold it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # str(torch.dtype), e.g. "torch.float32"
    element_size: int  # bytes per element

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.element_size


def expected_tensors(model) -> tuple[ExpectedTensor, ...]:
    """The model's parameters in `model.parameters()` order (hivemind's state order)."""
    return tuple(
        ExpectedTensor(name, tuple(p.shape), str(p.dtype), p.element_size())
        for name, p in model.named_parameters()
    )


def check_tensor(tensor, expected: ExpectedTensor) -> str | None:
    """None if `tensor` may stand for the parameter `expected`, else why not."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return f"{expected.name} is a {type(tensor).__name__}, not a tensor"
    if tuple(tensor.shape) != expected.shape:
        return f"{expected.name} has shape {tuple(tensor.shape)}, the model has {expected.shape}"
    if str(tensor.dtype) != expected.dtype:
        return f"{expected.name} has dtype {tensor.dtype}, the model has {expected.dtype}"
    if not bool(torch.isfinite(tensor).all()):
        return f"{expected.name} contains NaN or infinite values"
    return None


def check_tensors(tensors: Sequence, expected: Sequence[ExpectedTensor]) -> str | None:
    """None if `tensors` can be copied into the model's parameters one for one, else why not."""
    if len(tensors) != len(expected):
        return f"{len(tensors)} tensors, the model has {len(expected)} parameters"
    for tensor, want in zip(tensors, expected, strict=True):
        problem = check_tensor(tensor, want)
        if problem:
            return problem
    return None


def check_candidate(
    tensors: Mapping[str, object],
    expected_shapes: Mapping[str, tuple[int, ...]],
    eval_loss: float,
    last_eval_loss: float | None,
    max_regression_nats: float,
) -> str | None:
    """None if the state may be published, else why not. `tensors` maps names to torch tensors."""
    import torch

    if set(tensors) != set(expected_shapes):
        missing, extra = set(expected_shapes) - set(tensors), set(tensors) - set(expected_shapes)
        return f"tensor names differ from the manifest's model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected_shapes[name]):
            return f"{name} has shape {tuple(tensor.shape)}, the manifest's model has {tuple(expected_shapes[name])}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} contains NaN or infinite values"
    if not math.isfinite(eval_loss):
        return f"eval loss is {eval_loss}"
    if last_eval_loss is not None and eval_loss > last_eval_loss + max_regression_nats:
        return (
            f"eval loss {eval_loss:.4f} is worse than the last published {last_eval_loss:.4f} by "
            f"{eval_loss - last_eval_loss:.4f} nats (allowed {max_regression_nats:.4f})"
        )
    return None


def model_card(
    manifest: RunManifest,
    *,
    step: int,
    eval_loss: float,
    contributing_peers: int,
    created: str,
    data_read: str = "",
) -> str:
    """README.md of a checkpoint directory (Hugging Face model card, with YAML front matter)."""
    m, d, swarm = manifest.model, manifest.data, manifest.swarm
    samples = step * swarm.target_batch_size
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [crowdtrain, decentralized-training, hivemind]
---

# {manifest.run_id}, step {step}

A {m.num_parameters / 1e6:.2f}M-parameter {m.model_type} causal language model
(`{m.config["num_hidden_layers"]}` layers, hidden size `{m.config["hidden_size"]}`, vocabulary
`{m.config["vocab_size"]}`, context `{d.seq_len}` tokens), trained by volunteers with
[crowdtrain](https://github.com/) (preset `{manifest.preset}`), published {created}.

| | |
|---|---|
| swarm epoch (optimizer steps) | {step} |
| samples seen (lower bound) | {samples:,} sequences = {samples * d.seq_len:,} tokens |
| held-out loss | {eval_loss:.4f} nats/token (perplexity {math.exp(min(eval_loss, 50)):.2f}) |
| peers in the swarm's progress records | {contributing_peers} |
| run manifest sha256 | `{manifest.sha256()}` |

## Data

{d.source}; {len(d.shards)} training shards, {d.eval_fraction:.0%} of documents held out for
evaluation (the loss above is measured on {d.eval_max_sequences} held-out sequences). Tokenizer:
byte-level BPE trained on the training shards, sha256 `{manifest.tokenizer.sha256[:16]}...`.
{f"Read so far by the swarm: {data_read}." if data_read else ""}

## Use

```python
from transformers import pipeline
print(pipeline("text-generation", model="path/to/this/directory")("def "))
```

Verify the download first: `crowdtrain verify DIR --public-key {manifest.signing_public_key or "<run key>"}`.

## Intended use and limitations

A research artefact of a community training run: for studying decentralized training and for
experiments at this scale. It is small, trained on a narrow corpus, unaligned and unevaluated for
safety; it will produce wrong, insecure or nonsensical text and code. Do not deploy it to users.
"""
