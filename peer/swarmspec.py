"""How the swarm averages: a run's swarm settings (part of its signed manifest), their checks, and
the operator's overrides (`crowdtrain coordinator --swarm KEY=VALUE`).

Imports neither torch nor hivemind; peer/swarm.py turns these settings into hivemind's arguments.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from crowdtrain.peer.errors import ManifestError


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
    # steps and average how far they moved once per epoch (peer/diloco.py, docs/performance.md)
    mode: str = "sync"
    outer_learning_rate: float = 0.7  # diloco: SGD learning rate of the outer step
    outer_momentum: float = 0.9  # diloco: its Nesterov momentum
    inner_warmup_steps: int = 50  # diloco: local steps over which the local AdamW's learning rate warms up


GRAD_COMPRESSIONS = ("none", "float16", "scaled_float16", "uint8")
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
    lr, momentum = spec.outer_learning_rate, spec.outer_momentum
    if not all(isinstance(v, (int, float)) for v in (lr, momentum)) or not (
        0 < lr <= 10 and 0 <= momentum < 1
    ):
        raise ManifestError(
            "swarm settings outer_learning_rate must be in (0, 10] and outer_momentum in [0, 1), not "
            f"{spec.outer_learning_rate!r} and {spec.outer_momentum!r}"
        )
    return spec


__all__ = ["GRAD_COMPRESSIONS", "TRAINING_MODES", "SwarmSpec", "check_swarm", "override_swarm"]
