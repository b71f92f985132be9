"""The shared transformer, built from the run manifest with `transformers` and random init.

Every peer and the coordinator's publisher build the same initial weights: the init is seeded by
`manifest.model.init_seed` and done on the CPU, then moved to the device. Nothing is downloaded.
Before anything is allocated the model's parameters are counted on torch's meta device, and a model
over the ceiling or too big for this machine is refused (peer/run/modelsize.py); its config was held to
what our presets build when the manifest was read (peer/run/modelconfig.py).

    model = build_model(manifest)                     # LlamaForCausalLM, identical on every peer
    loss = evaluate(model, eval_blocks, batch_size=16) # mean next-token cross-entropy, nats
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from crowdtrain.peer.errors import ManifestError
from crowdtrain.peer.run.manifest import RunManifest
from crowdtrain.peer.run.modelconfig import check_model_config
from crowdtrain.peer.run.modelsize import check_before_building
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)


def build_config(manifest: RunManifest):
    """The run's transformers config; ManifestError for a model this crowdtrain does not build."""
    model = manifest.model
    ok, why = check_model_config(model.model_type, model.config, manifest.data.seq_len)
    if not ok:
        raise ManifestError(f"cannot build the run's model: {why}")
    return AutoConfig.for_model(
        model.model_type,
        bos_token_id=None,
        eos_token_id=0,  # EOS_TOKEN is the tokenizer's first special token
        pad_token_id=1,
        **model.config,
    )


def count_parameters(manifest: RunManifest) -> int:
    """The run's model's parameter count, from a copy built on torch's meta device (no memory)."""
    with torch.device("meta"):
        return num_parameters(AutoModelForCausalLM.from_config(build_config(manifest), dtype=torch.float32))


def build_model(
    manifest: RunManifest,
    device: str | torch.device = "cpu",
    *,
    max_memory_gb: float = 0.0,
    training: bool = False,
) -> PreTrainedModel:
    """The run's model with its deterministic initial weights, in float32 on `device`. Refused
    (modelsize.ModelTooLarge) before any allocation when its parameters pass the ceiling or do not
    fit this machine's memory (capped by `max_memory_gb`); with `training`, what must fit is the
    training's static memory (weights, gradients, optimizer state, hivemind's copies: peer/machine/fit.py)."""
    config = build_config(manifest)
    swarm = manifest.swarm
    check_before_building(
        count_parameters(manifest),
        device,
        max_memory_gb=max_memory_gb,
        mode=swarm.mode if training else None,
        overlap=swarm.overlap_communication,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(manifest.model.init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_new_tokens=64
    )
    return model.to(device)


def hf_tokenizer(tokenizer_json: str, manifest: RunManifest) -> PreTrainedTokenizerFast:
    """Wrap the run's `tokenizers` tokenizer so `AutoTokenizer.from_pretrained` can load it later."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        eos_token=manifest.tokenizer.eos_token,
        pad_token=manifest.tokenizer.pad_token,
        model_max_length=manifest.data.seq_len,
    )
    return tok


# transformers 5 names its fast tokenizer class "TokenizersBackend", which 4.x does not have; both
# load a tokenizer.json through this name (5.x maps it to the same class)
TOKENIZER_CLASS_4X_AND_5X = "PreTrainedTokenizerFast"


def save_hf(model: PreTrainedModel, tokenizer_json: str, manifest: RunManifest, directory: Path) -> None:
    """The model and its tokenizer in Hugging Face format, loadable with `from_pretrained(directory)`
    by transformers 4.57 and 5.x alike (tests/test_hf_compat.py): what 5.x writes in a form 4.x cannot
    read is rewritten in the form both read."""
    model.save_pretrained(directory)
    hf_tokenizer(tokenizer_json, manifest).save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") != TOKENIZER_CLASS_4X_AND_5X:
        config["tokenizer_class"] = TOKENIZER_CLASS_4X_AND_5X
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    # 5.x keeps rope_theta inside "rope_parameters", which 4.x ignores (it would use its default
    # 10000 whatever the run chose); 5.x reads a top-level rope_theta that agrees. Our model configs
    # allow only the default rope type (peer/run/modelconfig.py), so rope_theta is all 4.x needs.
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_hf_atomically(
    model, tokenizer_json: str, manifest: RunManifest, out: Path, extra: dict[str, str]
) -> None:
    """`save_hf` into a staging directory beside `out`, plus `extra` files (name: text), then swapped
    in by rename: a reader of `out` sees the old model or the new one, never half of one."""
    staging = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    save_hf(model, tokenizer_json, manifest, staging)
    for name, text in extra.items():
        (staging / name).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)


def as_batch(blocks: Sequence[list[int]], device: str | torch.device) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.long, device=device)


@torch.no_grad()
def evaluate(model: PreTrainedModel, blocks: Sequence[list[int]], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token) over `blocks`; the model is left in train mode."""
    if not blocks:
        raise ValueError("evaluate() needs at least one block")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = as_batch(blocks[i : i + batch_size], device)
        out = model(input_ids=batch, labels=batch)
        n = batch.shape[0] * (batch.shape[1] - 1)  # every position but the last predicts a token
        total += out.loss.float().item() * n
        count += n
    model.train(was_training)
    return total / count


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
