"""What a state must pass before it is published, and the model card that goes with it. Pure.

A state reaches the publisher already shaped like the model and finite: the one check of its
tensors runs where its stream is read (peer/swarm/statewire.py, `peer.run.tensors.check_tensors`),
before anything is copied into the model. What is left to decide here is its quality:
`check_candidate` returns None for a state whose held-out loss may be published, or why not; the
publisher records rejections (shown by `crowdtrain status`, /api/v1/state and the dashboard).
"""

from __future__ import annotations

import math
import re

from crowdtrain.peer.run.manifest import RunManifest


def check_candidate(eval_loss: float, last_eval_loss: float | None, max_regression_nats: float) -> str | None:
    """None if a state with held-out loss `eval_loss` may be published after one at
    `last_eval_loss` (None: nothing published yet), else why not."""
    if not math.isfinite(eval_loss):
        return f"eval loss is {eval_loss}"
    if last_eval_loss is not None and eval_loss > last_eval_loss + max_regression_nats:
        return (
            f"eval loss {eval_loss:.4f} is worse than the last published {last_eval_loss:.4f} by "
            f"{eval_loss - last_eval_loss:.4f} nats (allowed {max_regression_nats:.4f})"
        )
    return None


# an absolute local path (`/home/alice/texts`, `~/texts`, `C:\\texts`) starting a word and ending at a
# space, comma or parenthesis
_LOCAL_PATH = re.compile(r"(?<![^\s,(])(?:~|[A-Za-z]:)?[/\\][^\s,()]*")


def _without_local_paths(text: str) -> str:
    """`text` with each absolute path replaced by its base name: runs made before the manifest's data
    name left out local paths still carry the operator's, which a card must not publish."""
    return _LOCAL_PATH.sub(lambda m: re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], text)


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

{_without_local_paths(d.source)}; {len(d.shards)} training shards, {d.eval_fraction:.0%} of documents
held out for evaluation (the loss above is measured on {d.eval_max_sequences} held-out sequences).
Tokenizer: byte-level BPE trained on the training shards, sha256 `{manifest.tokenizer.sha256[:16]}...`.
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
