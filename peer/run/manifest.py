"""The run manifest: everything a peer needs to train the same model on the same data as the swarm.

The coordinator owns the manifest; peers receive it in `Join` and must not deviate from it. It is
plain JSON on the wire (`RunManifest.to_json` / `RunManifest.from_json`) and imports neither torch
nor hivemind, so the coordinator's CLI stays light.

Presets describe whole runs (model size, data budget, swarm knobs). `tiny` trains visibly on two CPU
cores in a few minutes; `base125m` is a realistic ~125M-parameter Llama-style model for GPUs.

How the swarm averages: a run's swarm settings (part of its signed manifest), their checks, and
the operator's overrides (`crowdtrain coordinator --swarm KEY=VALUE`).

Imports neither torch nor hivemind; peer/swarm/wiring.py turns these settings into hivemind's arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass

from crowdtrain.peer import checks as names
from crowdtrain.peer.errors import ManifestError
from crowdtrain.peer.machine.install import upgrade_hint
from crowdtrain.peer.run.modelconfig import check_model_config

MANIFEST_FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# the most a manifest may say one data shard holds: a peer downloads a shard whole and tokenizes it
# in memory (peer/data/shards.py); the coordinator refuses to write a bigger one (coordinator/run/dataset.py)
MAX_SHARD_BYTES = 512 << 20


@dataclass(frozen=True)
class SwarmSpec:
    target_batch_size: int  # samples the whole swarm accumulates per epoch (one optimizer step)
    batch_size_per_step: int  # default micro-batch of one peer; peers may override
    matchmaking_time_s: float  # raise when peers log "could not find a group" (slow links, many peers)
    averaging_timeout_s: float  # an all-reduce that takes longer is abandoned; raise for big models
    average_state_every: int  # average parameters and optimizer state every N epochs
    load_state_timeout_s: float  # how long a joiner waits for one peer to send the state
    # average an epoch's gradients while the next epoch computes, applying them one step late
    # (hivemind's delay_grad_averaging + delay_optimizer_step); in mode=diloco, the outer step lands
    # while inner steps go on, keeping their progress; docs/benchmarks.md has its effect
    overlap_communication: bool = False
    grad_compression: str = "none"  # how gradients travel: one of GRAD_COMPRESSIONS
    # "sync": every peer's gradients are averaged at every epoch; "diloco": peers take local AdamW
    # steps and average how far they moved once per epoch (peer/swarm/diloco.py, docs/performance.md)
    mode: str = "sync"
    outer_learning_rate: float = 0.7  # diloco: SGD learning rate of the outer step
    outer_momentum: float = 0.9  # diloco: its Nesterov momentum
    inner_warmup_steps: int = 50  # diloco: local steps over which the local AdamW's learning rate warms up
    # grad_compression="topk2bit" (diloco only; peer/robust/sparsecodec.py): of each chunk of
    # sparse_chunk values (a power of two) only the sparse_fraction largest travel, as sparse_bits-bit
    # codes, and the averages come back the same way at sparse_return_bits; the rest is carried to
    # the next round (error feedback). Defaults: ~270x fewer bytes than fp32 (docs/performance.md)
    sparse_fraction: float = 0.01
    sparse_chunk: int = 4096
    sparse_bits: int = 2
    sparse_return_bits: int = 4


GRAD_COMPRESSIONS = ("none", "float16", "scaled_float16", "uint8", "topk2bit")
# compressions whose error only the low-communication mode carries over (its peers' residuals)
DILOCO_ONLY_COMPRESSIONS = ("topk2bit",)
TRAINING_MODES = ("sync", "diloco")


def override_swarm(spec: SwarmSpec, assignments: typing.Iterable[str]) -> SwarmSpec:
    """`spec` with KEY=VALUE assignments (an operator's `--swarm` flags) applied, each checked:
    a known field, a value of its type, positive sizes and times, a known compression."""
    types = typing.get_type_hints(SwarmSpec)
    changes: dict[str, object] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in types:
            known = ", ".join(types)
            raise ManifestError(f"--swarm {assignment!r}: expected KEY=VALUE with KEY one of {known}")
        changes[key] = _parse_setting(key, types[key], text)
    return check_swarm(dataclasses.replace(spec, **changes))


def _parse_setting(key: str, tp, text: str):
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes", "on")
        return tp(text)
    except ValueError as e:
        raise ManifestError(f"--swarm {key}={text!r}: {e}") from None


def check_swarm(spec: SwarmSpec) -> SwarmSpec:
    """Raise ManifestError unless every swarm setting is usable; returns `spec`."""
    for key in ("target_batch_size", "batch_size_per_step", "average_state_every", "inner_warmup_steps"):
        if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
            raise ManifestError(f"swarm setting {key} must be a positive integer, not {getattr(spec, key)!r}")
    for key in ("matchmaking_time_s", "averaging_timeout_s", "load_state_timeout_s"):
        value = getattr(spec, key)
        if not isinstance(value, (int, float)) or not 0 < value < 86_400:
            raise ManifestError(f"swarm setting {key} must be between 0 and 86400 seconds, not {value!r}")
    if not isinstance(spec.overlap_communication, bool):
        raise ManifestError(
            f"swarm setting overlap_communication must be true or false, not {spec.overlap_communication!r}"
        )
    if spec.grad_compression not in GRAD_COMPRESSIONS:
        raise ManifestError(
            f"swarm setting grad_compression {spec.grad_compression!r} is not one of {', '.join(GRAD_COMPRESSIONS)}"
        )
    if spec.mode not in TRAINING_MODES:
        raise ManifestError(f"swarm setting mode {spec.mode!r} is not one of {', '.join(TRAINING_MODES)}")
    _check_sparse(spec)
    lr, momentum = spec.outer_learning_rate, spec.outer_momentum
    if not all(isinstance(v, (int, float)) for v in (lr, momentum)) or not (
        0 < lr <= 10 and 0 <= momentum < 1
    ):
        raise ManifestError(
            "swarm settings outer_learning_rate must be in (0, 10] and outer_momentum in [0, 1), not "
            f"{spec.outer_learning_rate!r} and {spec.outer_momentum!r}"
        )
    return spec


def _check_sparse(spec: SwarmSpec) -> None:
    """The sparse codec's knobs (checked whatever the compression: a manifest carries them all)."""
    if spec.grad_compression in DILOCO_ONLY_COMPRESSIONS and spec.mode != "diloco":
        raise ManifestError(
            f"swarm setting grad_compression {spec.grad_compression!r} needs mode=diloco (only its "
            "peers carry what the codec leaves out to the next round); set --swarm mode=diloco or "
            "choose another compression"
        )
    fraction, chunk = spec.sparse_fraction, spec.sparse_chunk
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ManifestError(f"swarm setting sparse_fraction must be in (0, 1], not {fraction!r}")
    if not isinstance(chunk, int) or not 64 <= chunk <= 65536 or chunk & (chunk - 1):
        raise ManifestError(
            f"swarm setting sparse_chunk must be a power of two from 64 to 65536, not {chunk!r}"
        )
    for key in ("sparse_bits", "sparse_return_bits"):
        bits = getattr(spec, key)
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ManifestError(f"swarm setting {key} must be an integer from 1 to 8, not {bits!r}")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # a transformers model type, e.g. "llama"
    config: dict  # kwargs for transformers.AutoConfig.for_model(model_type, **config)
    init_seed: int  # every peer initialises the same weights from this seed (on CPU)
    num_parameters: int  # for people; computed from the config when the run is created


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "byte-level-bpe"
    vocab_size: int
    sha256: str  # of the tokenizer.json text shipped beside the manifest
    eos_token: str = EOS_TOKEN
    pad_token: str = PAD_TOKEN


@dataclass(frozen=True)
class ShardSpec:
    name: str  # file name, served at <http_base_url>/data/<name>
    sha256: str
    size_bytes: int
    num_documents: int


@dataclass(frozen=True)
class DataSpec:
    source: str  # public provenance label, never a local path ("*.md in corpus", "hf:NAME", --data-name)
    seq_len: int  # tokens per training sequence
    eval_fraction: float  # share of documents held out for evaluation
    eval: ShardSpec  # the held-out documents
    shards: tuple[ShardSpec, ...]  # training shards; each peer reads one
    eval_max_sequences: int  # how many held-out sequences an evaluation uses


@dataclass(frozen=True)
class OptimSpec:
    learning_rate: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_epochs: int  # linear learning-rate warm-up, counted in swarm epochs
    max_grad_norm: float  # clip the averaged gradient to this norm (0 disables)


@dataclass(frozen=True)
class RunManifest:
    run_id: str  # prefix of every DHT key of the run
    preset: str
    created_unix_s: float
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    optim: OptimSpec
    swarm: SwarmSpec
    format_version: int = MANIFEST_FORMAT_VERSION
    signing_public_key: str = ""  # hex Ed25519 key that signs the run's checkpoints

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"run manifest is not valid JSON: {e}") from e
        if raw.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ManifestError(
                f"run manifest format {raw.get('format_version')!r} is not supported by this crowdtrain "
                f"(expects {MANIFEST_FORMAT_VERSION}); {upgrade_hint()}"
            )
        if not isinstance(raw, dict):
            raise ManifestError("run manifest is not a JSON object")
        manifest = _from_dict(cls, raw)
        _check_names(manifest)
        _check_model(manifest)
        check_swarm(manifest.swarm)  # from the network: an unknown mode or a wild outer step is refused
        return manifest

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _check_names(manifest: RunManifest) -> None:
    """The manifest's names become paths on the peer (cache_dir/<run_id>/<shard name>): each must
    be one plain path component; shard hashes must be sha256 hex. Raises ManifestError."""
    try:
        names.check_run_id(manifest.run_id)
        for shard in (manifest.data.eval, *manifest.data.shards):
            names.safe_component(shard.name, names.SHARD_FILE, "a data shard name")
            names.check_sha256(shard.sha256, f"the sha256 of shard {shard.name}")
            names.check_int(shard.size_bytes, f"the size of shard {shard.name}", maximum=MAX_SHARD_BYTES)
    except (names.NetworkValueError, AttributeError, TypeError) as e:
        raise ManifestError(f"run manifest refused: {e}") from e


def _check_model(manifest: RunManifest) -> None:
    """The model must be one a volunteer may build (peer/run/modelconfig.py). Raises ManifestError."""
    model = manifest.model
    ok, why = check_model_config(model.model_type, model.config, manifest.data.seq_len)
    seed = model.init_seed
    if ok and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        ok, why = False, f"model init_seed must be an integer in [0, 2^63), not {seed!r:.40}"
    if not ok:
        raise ManifestError(
            f"run manifest refused: {why}; this crowdtrain builds only models its presets describe"
        )


def _from_dict(cls, raw):
    """Build a (nested) frozen dataclass from its `asdict` form, rejecting unknown or missing keys."""
    hints = typing.get_type_hints(cls)
    if not isinstance(raw, dict):
        raise ManifestError(f"{cls.__name__} is not a JSON object")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - fields
    if unknown:
        raise ManifestError(
            f"{cls.__name__} has fields this crowdtrain does not know ({sorted(unknown)}): it comes from a newer "
            f"version; {upgrade_hint()}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING:
                raise ManifestError(f"{cls.__name__} lacks field {f.name!r}")
            continue
        kwargs[f.name] = _convert(hints[f.name], raw[f.name])
    return cls(**kwargs)


def _convert(tp, value):
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
    return value


@dataclass(frozen=True)
class Preset:
    """A whole run's shape. Sizes are Llama-style; counts in names say their unit."""

    name: str
    description: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    tie_word_embeddings: bool
    max_corpus_bytes: int  # 0 = use the whole corpus
    num_shards: int
    eval_fraction: float
    eval_max_sequences: int
    optim: OptimSpec
    swarm: SwarmSpec
    init_seed: int = 1234

    def model_config(self) -> dict:
        return dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
        )

    def num_parameters(self) -> int:
        """Exact parameter count of a Llama model of this shape (no biases, RMSNorm weights)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="0.7M parameters; trains visibly on 2 CPU cores in a few minutes",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=384,
            vocab_size=2048,
            seq_len=128,
            tie_word_embeddings=True,
            max_corpus_bytes=6_000_000,
            num_shards=8,
            eval_fraction=0.02,
            eval_max_sequences=64,
            optim=OptimSpec(
                learning_rate=3e-3, weight_decay=0.01, betas=(0.9, 0.95), warmup_epochs=3, max_grad_norm=1.0
            ),
            swarm=SwarmSpec(
                target_batch_size=256,
                batch_size_per_step=16,
                matchmaking_time_s=3.0,
                averaging_timeout_s=30.0,
                average_state_every=5,
                load_state_timeout_s=60.0,
            ),
        ),
        Preset(
            name="small30m",
            description="~30M parameters; a model whose gradients take seconds to exchange, for CPU "
            "benchmarks and small GPUs",
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            intermediate_size=1408,
            vocab_size=8192,
            seq_len=256,
            tie_word_embeddings=True,
            max_corpus_bytes=20_000_000,
            num_shards=8,
            eval_fraction=0.02,
            eval_max_sequences=32,
            optim=OptimSpec(
                learning_rate=1e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=5, max_grad_norm=1.0
            ),
            swarm=SwarmSpec(
                # one CPU thread computes ~1 micro-batch of 8 x 256 tokens in a few seconds: 64
                # sequences per epoch keeps a 2-peer CPU swarm at an epoch every ~30 s
                target_batch_size=64,
                batch_size_per_step=8,
                matchmaking_time_s=5.0,
                averaging_timeout_s=60.0,
                average_state_every=5,
                load_state_timeout_s=120.0,
            ),
        ),
        Preset(
            name="base125m",
            description="~124M parameters (GPT-2-small-sized Llama); for volunteers with GPUs",
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=2560,
            vocab_size=32768,
            seq_len=1024,
            tie_word_embeddings=True,
            max_corpus_bytes=0,
            num_shards=64,
            eval_fraction=0.01,
            eval_max_sequences=128,
            optim=OptimSpec(
                learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95), warmup_epochs=20, max_grad_norm=1.0
            ),
            swarm=SwarmSpec(
                # 4096 x 1024 tokens per step: one epoch must take several matchmaking windows of
                # compute, or peers spend their time waiting for groups (measured: docs/figures.md)
                target_batch_size=4096,
                batch_size_per_step=16,
                matchmaking_time_s=15.0,
                averaging_timeout_s=120.0,
                average_state_every=5,
                load_state_timeout_s=600.0,
            ),
        ),
    )
}

# small30m's model for volunteers behind home links: DiLoCo with 8-bit pseudo-gradients.
# target_batch_size sets H, the local steps between exchanges (1024 / 2 peers / 8 per step = 64 on a
# 2-peer swarm). With fp16, each round cost a peer about 36 s at 20 Mbit/s (a ~60 MB exchange and the
# matchmaking around it) whatever H is: at 512, 0.89 of wall time computed on 2 CPU cores; at 1024,
# 0.96 (docs/performance.md). 8-bit halves the bytes at no measured cost in quality. Faster hardware
# needs a proportionally larger H. State rounds move 3 model sizes in fp32 (parameters and both
# AdamW moments), so they are rare. overlap_communication stays an operator's choice (measured there).
PRESETS["wan30m"] = dataclasses.replace(
    PRESETS["small30m"],
    name="wan30m",
    description="small30m's ~30M-parameter model in the low-communication mode (DiLoCo), for "
    "volunteers behind 20-100 Mbit/s links",
    swarm=SwarmSpec(
        target_batch_size=1024,
        batch_size_per_step=8,
        matchmaking_time_s=10.0,
        averaging_timeout_s=300.0,
        average_state_every=10,
        load_state_timeout_s=600.0,
        grad_compression="uint8",
        mode="diloco",
    ),
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ManifestError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def build_manifest(
    preset: Preset,
    *,
    run_id: str,
    created_unix_s: float,
    tokenizer: TokenizerSpec,
    data: DataSpec,
    signing_public_key: str = "",
    swarm: SwarmSpec | None = None,
) -> RunManifest:
    """Pure: combine a preset with the run's tokenizer and dataset into the manifest peers receive
    (`swarm` replaces the preset's swarm settings: see `override_swarm`)."""
    if tokenizer.vocab_size != preset.vocab_size:
        raise ManifestError(
            f"tokenizer has {tokenizer.vocab_size} tokens but preset {preset.name!r} expects {preset.vocab_size}; "
            "the corpus is probably too small to learn that many merges - give the coordinator more text"
        )
    return RunManifest(
        run_id=run_id,
        preset=preset.name,
        created_unix_s=created_unix_s,
        model=ModelSpec(
            model_type="llama",
            config=preset.model_config(),
            init_seed=preset.init_seed,
            num_parameters=preset.num_parameters(),
        ),
        tokenizer=tokenizer,
        data=data,
        optim=preset.optim,
        swarm=check_swarm(swarm or preset.swarm),
        signing_public_key=signing_public_key,
    )


__all__ = [
    "PRESETS",
    "DataSpec",
    "GRAD_COMPRESSIONS",
    "MAX_SHARD_BYTES",
    "ManifestError",
    "ModelSpec",
    "OptimSpec",
    "Preset",
    "RunManifest",
    "ShardSpec",
    "SwarmSpec",
    "TokenizerSpec",
    "build_manifest",
    "check_swarm",
    "get_preset",
    "override_swarm",
]
