"""The model a run manifest may ask a volunteer to build: known model types, known keys, sane values.

A manifest's `model.config` becomes `transformers.AutoConfig.for_model(model_type, **config)` on
every volunteer (peer/run/model.py), and the manifest comes from the coordinator, or from whoever sits
between it and the volunteer. transformers takes any keyword: `attn_implementation` naming a hub
kernel is downloaded and imported, `auto_map` points at remote code, and sizes are whatever was
written. So a manifest's model is held to what our presets build (peer/run/manifest.py `PRESETS`):
a model type in `MODEL_KEYS`, only the keys listed for it, each a value of its kind in its range,
and shapes transformers can build. How many parameters that makes is counted before anything is
allocated (peer/run/modelsize.py). Imports neither torch nor transformers (the manifest is parsed by
the coordinator's light modules too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """One config key: its kind ("int", "float" or "bool") and, for numbers, its closed range."""

    kind: str
    low: float = 0
    high: float = 0


# the keys our presets write (Preset.model_config), with ranges far beyond any preset: a preset may
# grow within them; a new key or model type needs a new entry here
LLAMA_KEYS: dict[str, Bound] = {
    "hidden_size": Bound("int", 8, 16_384),
    "num_hidden_layers": Bound("int", 1, 256),
    "num_attention_heads": Bound("int", 1, 256),
    "num_key_value_heads": Bound("int", 1, 256),
    "intermediate_size": Bound("int", 8, 65_536),
    "vocab_size": Bound("int", 2, 262_144),
    "max_position_embeddings": Bound("int", 2, 131_072),
    "tie_word_embeddings": Bound("bool"),
    "rms_norm_eps": Bound("float", 1e-12, 0.1),
    "rope_theta": Bound("float", 1.0, 1e9),
}
MODEL_KEYS: dict[str, dict[str, Bound]] = {"llama": LLAMA_KEYS}


def _value_problem(key: str, value: object, bound: Bound) -> str | None:
    """Pure: why `value` is not a `bound.kind` in its range, or None."""
    if bound.kind == "bool":
        return None if isinstance(value, bool) else f"{key} must be true or false, not {value!r:.40}"
    kinds = (int,) if bound.kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"{key} must be a{'n integer' if bound.kind == 'int' else ' number'}, not {value!r:.40}"
    if not bound.low <= value <= bound.high:  # NaN fails this too
        return f"{key} is {value!r:.40}, outside [{bound.low:g}, {bound.high:g}]"
    return None


def check_model_config(model_type: object, config: object, seq_len: object) -> tuple[bool, str]:
    """Pure: may a volunteer build this model (`seq_len`: the manifest's tokens per sequence)?"""
    if not isinstance(model_type, str) or model_type not in MODEL_KEYS:
        return False, f"model type {model_type!r:.40} is not one of {', '.join(MODEL_KEYS)}"
    if not isinstance(config, Mapping):
        return False, "the model config is not a JSON object"
    keys = MODEL_KEYS[model_type]
    unknown = sorted(str(k)[:40] for k in config if k not in keys)
    if unknown:
        return False, f"the model config has keys a {model_type} model here may not set: {unknown[:5]}"
    missing = sorted(k for k, bound in keys.items() if k not in config and bound.kind != "bool")
    if missing:
        return False, f"the model config lacks {missing}"
    for key, value in config.items():
        problem = _value_problem(key, value, keys[key])
        if problem:
            return False, f"model config: {problem}"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads or heads % kv_heads:
        return False, (
            f"model config: hidden_size {config['hidden_size']} must be a multiple of num_attention_heads "
            f"{heads}, and that of num_key_value_heads {kv_heads}"
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        return False, f"data.seq_len must be an integer, not {seq_len!r:.40}"
    if not 2 <= seq_len <= config["max_position_embeddings"]:
        return (
            False,
            f"data.seq_len {seq_len} is outside [2, max_position_embeddings {config['max_position_embeddings']}]",
        )
    return True, "ok"


__all__ = ["MODEL_KEYS", "Bound", "check_model_config"]
