"""What a peer says about itself: one record from the trainer to the heartbeat, the coordinator's
servicer, its store and every view of a peer.

Adding a metric is a field here and a field of the same name in `HeartbeatRequest`
(protos/coordinator.proto); it then travels, is stored and appears in /api/v1/peers on its own,
and only its rendering (dashboard, `crowdtrain status` via `PeerStatus`) is written by hand.
Conversion to and from protobuf messages goes by field name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PeerReport:
    """A peer's self-reported state; the trainer publishes a new immutable snapshot after each step."""

    phase: str = "joining"  # "joining", "loading_state", "training"
    dht_peer_id: str = ""  # its hivemind peer id, once its DHT runs
    name: str = ""  # display name chosen by the volunteer
    version: str = ""  # crowdtrain version of the peer
    device: str = ""  # "cpu", "cuda:0 (NVIDIA H100)", ...
    samples_per_s: float = 0.0  # recent training throughput
    local_epoch: int = 0
    loss: float = math.nan  # recent training loss; NaN when unknown
    uptime_s: float = 0.0  # since its heartbeats started
    samples_total: int = 0  # samples it processed since it started, accepted into the model or not
    swarm_size: int = 0  # peers it sees in the run's progress records


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PeerReport))


@dataclass(frozen=True)
class InputLimits:
    """The longest strings (in characters) the coordinator takes from a request, defined once.

    Display text (`TRUNCATED`) is cut to its limit; an identifier or a phase means nothing cut short,
    so a longer one refuses the request. Every string field of `PeerReport` has a limit here.
    """

    name: int = 64
    version: int = 32
    device: int = 64
    reason: int = 200  # why a peer leaves (Leave)
    phase: int = 32
    dht_peer_id: int = 128  # a base58 hivemind peer id has ~52
    session_id: int = 64  # a coordinator-assigned uuid hex (32), or "dht:<peer id>"

    TRUNCATED = frozenset({"name", "version", "device", "reason"})


LIMITS = InputLimits()


def report_values(source) -> dict[str, object]:
    """The report's fields taken from any object that has them by name (a PeerReport, a record
    that extends it, a HeartbeatRequest)."""
    return {name: getattr(source, name) for name in FIELD_NAMES}


def to_message(message_cls, source, **extra):
    """A protobuf message whose every field comes from `extra` or else from `source`'s attribute of
    the same name; a field `source` lacks is an AttributeError (a proto and its record disagree)."""
    return message_cls(
        **{
            f.name: extra[f.name] if f.name in extra else getattr(source, f.name)
            for f in message_cls.DESCRIPTOR.fields
        }
    )


def from_heartbeat(request) -> PeerReport:
    """The report a `HeartbeatRequest` carries, as sent (bounding it is the coordinator's job)."""
    return PeerReport(**report_values(request))
