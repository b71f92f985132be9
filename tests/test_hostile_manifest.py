"""A hostile manifest cannot size a volunteer's work.

The review's coordinator served `model.config` 8192 hidden x 16 layers, which `build_model`
allocated (58 GiB) before any memory check, passed any keyword to transformers, and claimed shards
of up to 1 TiB. Each is refused here: at manifest parse, or before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from crowdtrain.coordinator.run import dataset
from crowdtrain.peer.data import shards as data
from crowdtrain.peer.run import model
from crowdtrain.peer.run.manifest import (
    MAX_SHARD_BYTES,
    PRESETS,
    DataSpec,
    ManifestError,
    RunManifest,
    ShardSpec,
    TokenizerSpec,
    build_manifest,
)
from crowdtrain.peer.run.modelsize import MAX_MODEL_PARAMETERS, ModelTooLarge, fits_before_building

# the review's probe: 8192 hidden x 16 layers, 15.6 B parameters
HUGE = dict(
    hidden_size=8192,
    num_hidden_layers=16,
    num_attention_heads=64,
    num_key_value_heads=64,
    intermediate_size=28672,
)


def _manifest(preset: str = "tiny", **config) -> RunManifest:
    """A preset's manifest (no dataset built) with `config` written over its model's."""
    p = PRESETS[preset]
    shard = ShardSpec("train-00000.jsonl", "0" * 64, 1000, 10)
    spec = DataSpec("t", p.seq_len, 0.1, dataclasses.replace(shard, name="eval.jsonl"), (shard,), 8)
    tokenizer = TokenizerSpec("byte-level-bpe", p.vocab_size, "0" * 64)
    m = build_manifest(p, run_id="ct_test", created_unix_s=1.0, tokenizer=tokenizer, data=spec)
    return dataclasses.replace(m, model=dataclasses.replace(m.model, config={**m.model.config, **config}))


def _wire(manifest: RunManifest, edit) -> str:
    """The manifest's JSON with `edit(raw dict)` applied, as a coordinator would send it."""
    raw = json.loads(manifest.to_json())
    edit(raw)
    return json.dumps(raw)


@pytest.fixture
def allocations(monkeypatch) -> list[str]:
    """The default device of every model transformers builds during the test ('meta' = no memory)."""
    seen: list[str] = []
    real = model.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        seen.append(torch.get_default_device().type)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.AutoModelForCausalLM, "from_config", spy)
    return seen


def test_every_preset_passes_and_its_meta_count_is_exact():
    for name, preset in PRESETS.items():
        manifest = _manifest(name)
        assert RunManifest.from_json(manifest.to_json()) == manifest
        assert model.count_parameters(manifest) == preset.num_parameters()


def test_the_reviews_huge_model_is_refused_before_any_allocation(allocations):
    manifest = RunManifest.from_json(_manifest(**HUGE).to_json())  # every value within its own range
    with pytest.raises(ModelTooLarge, match=r"15\.\d+ B parameters, more than the 1\.00 B .* not allocated"):
        model.build_model(manifest)
    assert allocations == ["meta"], "a real model was built before the refusal"


def test_a_model_under_the_ceiling_but_over_this_machine_is_refused_before_allocation(allocations):
    small30m = _manifest("small30m")  # 30 M parameters: 120 MB of float32 weights
    with pytest.raises(ModelTooLarge, match="needs 119.6 MB of RAM for its float32 weights"):
        model.build_model(small30m, max_memory_gb=0.05)
    with pytest.raises(ModelTooLarge, match="of RAM for training it"):  # the trainer's static count
        model.build_model(_manifest("tiny"), max_memory_gb=0.01, training=True)
    assert allocations == ["meta", "meta"]
    built = model.build_model(_manifest("tiny"), max_memory_gb=0.05, training=True)
    assert model.num_parameters(built) == PRESETS["tiny"].num_parameters()


def test_the_ceiling_and_the_device_are_pure_decisions():
    plenty = (10**15, "test")
    ok, why = fits_before_building(MAX_MODEL_PARAMETERS + 1, plenty, None)
    assert not ok and "more than the 1.00 B" in why
    ok, why = fits_before_building(10**6, plenty, (3 * 10**6, "cuda:0: test"), mode="sync")
    assert not ok and "of device for training it" in why  # 3 x 4 MB of weights, gradients, accumulators
    assert fits_before_building(10**6, plenty, (10**9, "cuda:0"), mode="diloco")[0]


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda m: m.update(model_type="gpt_neox"), "model type 'gpt_neox' is not one of llama"),
        (lambda m: m["config"].update(attn_implementation="kernels-community/x"), "attn_implementation"),
        (lambda m: m["config"].update(auto_map={"AutoConfig": "evil.Config"}), "auto_map"),
        (lambda m: m["config"].update(_name_or_path="evil/model"), "may not set"),
        (lambda m: m["config"].pop("hidden_size"), "lacks"),
        (lambda m: m["config"].update(num_hidden_layers=10**6), "outside"),
        (lambda m: m["config"].update(vocab_size=True), "must be an integer"),
        (lambda m: m["config"].update(rms_norm_eps="1e-5"), "must be a number"),
        (lambda m: m["config"].update(hidden_size=130), "multiple of num_attention_heads"),
        (lambda m: m.update(init_seed=-1), "init_seed"),
    ],
)
def test_an_unknown_model_type_key_or_value_is_refused_at_parse(edit, why):
    text = _wire(_manifest(), lambda raw: edit(raw["model"]))
    with pytest.raises(ManifestError, match=why):
        RunManifest.from_json(text)


def test_a_sequence_longer_than_the_model_allows_is_refused_at_parse():
    text = _wire(_manifest(), lambda raw: raw["data"].update(seq_len=10**6))
    with pytest.raises(ManifestError, match="seq_len"):
        RunManifest.from_json(text)


def test_a_shard_claiming_a_tebibyte_is_refused_at_parse():
    def edit(raw):
        raw["data"]["shards"][0]["size_bytes"] = 1 << 40

    with pytest.raises(
        ManifestError, match=f"the size of shard train-00000.jsonl must be .* to {MAX_SHARD_BYTES}"
    ):
        RunManifest.from_json(_wire(_manifest(), edit))
    RunManifest.from_json(
        _wire(_manifest(), lambda raw: raw["data"]["eval"].update(size_bytes=MAX_SHARD_BYTES))
    )


def test_a_cached_shard_over_the_bound_is_not_read_and_the_coordinator_never_writes_one(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(data, "MAX_SHARD_BYTES", 100)
    shard = tmp_path / "train-00000.jsonl"
    shard.write_text(json.dumps({"text": "x" * 200}) + "\n")
    with pytest.raises(data.DataError, match="holds 213 bytes, more than the 100 a run's shard may"):
        data.read_shard(shard)

    monkeypatch.setattr(dataset, "MAX_SHARD_BYTES", 100)
    docs = [dataset.Document(f"d{i}", "y" * 40) for i in range(3)]
    with pytest.raises(data.DataError, match="would hold more than"):
        dataset.write_shard(docs, tmp_path / "big.jsonl")
    assert list(tmp_path.glob("big.jsonl*")) == []
    assert dataset.write_shard(docs[:1], tmp_path / "ok.jsonl").size_bytes < 100
