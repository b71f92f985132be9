"""Checkpoints that downloaders load with transformers 4.x as well as the 5.x we train with.

The fast tests check what `save_hf` writes (a tokenizer class 4.x has, the run's rope_theta where
4.x reads it) and that the installed transformers still loads it. The `compat` test builds a venv
with transformers 4.57.6 in a temp dir and loads the checkpoint there, comparing logits with ours:

    .venv/bin/python -m pytest -m compat tests/test_hf_compat.py      # or scripts/compat.sh
    CROWDTRAIN_TF4_VENV=/tmp/tf457 scripts/compat.sh                   # reuse a venv built before
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.helpers import make_run

TEXT = "def f(x):\n    return x * 2  # twice"
ROPE_THETA = 50_000.0  # not 4.x's default (10000), so a rope_theta 4.x missed would change the logits
TRANSFORMERS_4 = "transformers==4.57.6"
# the class names transformers 4.57's AutoTokenizer resolves for a tokenizer.json with no model type
CLASSES_4X_HAS = {"PreTrainedTokenizerFast"}


def _save_checkpoint(tmp_path: Path, corpus: Path) -> tuple[Path, torch.Tensor, list[int]]:
    """A tiny run's model saved with save_hf (rope_theta set off the default): (directory, the
    logits of TEXT from the model in memory, TEXT's token ids)."""
    from crowdtrain.peer.run.model import build_model, hf_tokenizer, save_hf

    manifest, tokenizer_json = make_run(tmp_path, corpus)
    model_spec = dataclasses.replace(
        manifest.model, config={**manifest.model.config, "rope_theta": ROPE_THETA}
    )
    manifest = dataclasses.replace(manifest, model=model_spec)
    model = build_model(manifest).eval()
    out = tmp_path / "checkpoint"
    save_hf(model, tokenizer_json, manifest, out)
    ids = hf_tokenizer(tokenizer_json, manifest)(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return out, logits, ids


def test_saved_tokenizer_names_a_class_transformers_4_has_and_still_loads(tmp_path: Path, small_corpus):
    from transformers import AutoTokenizer

    out, _, ids = _save_checkpoint(tmp_path, small_corpus)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in CLASSES_4X_HAS
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == ids
    assert tokenizer.decode(ids) == TEXT
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert tokenizer.model_max_length == 128  # the tiny preset's seq_len


def test_saved_config_gives_rope_theta_where_4x_reads_it_and_still_loads(tmp_path: Path, small_corpus):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, logits, ids = _save_checkpoint(tmp_path, small_corpus)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == ROPE_THETA
    config = AutoConfig.from_pretrained(out)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == ROPE_THETA
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        again = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(again, logits)


# run by the transformers 4.x interpreter, outside the repository: load, round-trip, logits, generate,
# and the README's pipeline
LOAD_WITH_4X = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, text = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(directory)
model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
model.eval()
ids = tokenizer(text)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    generated = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False)
piped = transformers.pipeline("text-generation", model=directory)(text, max_new_tokens=3, do_sample=False)
print(json.dumps({"version": transformers.__version__, "tokenizer": type(tokenizer).__name__,
    "ids": ids, "decoded": tokenizer.decode(ids), "logits": logits.tolist(),
    "new_tokens": generated.shape[1] - len(ids), "piped": piped[0]["generated_text"],
    "missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}))
"""


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=15):
            return True
    except OSError:
        return False


def _transformers_4_venv(tmp_path: Path) -> Path:
    """The python of a venv with transformers 4.57 (CROWDTRAIN_TF4_VENV reuses one); skips when
    PyPI cannot be reached, fails with pip's output otherwise."""
    if reuse := os.environ.get("CROWDTRAIN_TF4_VENV"):
        return Path(reuse) / "bin" / "python"
    venv = tmp_path / "tf4"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the same torch as ours (a CPU build on our machines), pinned so pip pulls no CUDA wheels
    torch_spec = os.environ.get("TORCH_SPEC", f"torch=={torch.__version__.split('+')[0]}")
    pip = [str(python), "-m", "pip", "install", "-q", TRANSFORMERS_4, "tokenizers", "safetensors", torch_spec]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        if not _pypi_reachable():
            pytest.skip(f"PyPI is unreachable, so no venv with {TRANSFORMERS_4} could be built")
        pytest.fail(
            f"installing {TRANSFORMERS_4} into {venv} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return python


@pytest.mark.compat
def test_transformers_4_loads_a_saved_checkpoint_in_its_own_venv(tmp_path: Path, small_corpus, request):
    # a `-m` given on the command line replaces the `not compat` of addopts: `-m "not swarm"` would
    # otherwise build the venv too
    if "compat" not in request.config.getoption("markexpr"):
        pytest.skip("builds a venv from PyPI (minutes): run it with `-m compat` or scripts/compat.sh")
    out, logits, ids = _save_checkpoint(tmp_path, small_corpus)
    python = _transformers_4_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-I", "-c", LOAD_WITH_4X, str(out), TEXT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, f"transformers 4.x could not load the checkpoint:\n{done.stderr[-4000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4."), got["version"]
    assert got["tokenizer"] == "PreTrainedTokenizerFast"
    assert (got["ids"], got["decoded"]) == (ids, TEXT)
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["new_tokens"] == 3
    assert got["piped"].startswith(TEXT)
    torch.testing.assert_close(torch.tensor(got["logits"]), logits, rtol=1e-4, atol=1e-4)
