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

    phase: str = "joining"  # "joining", "loading_state", "training", "paused"
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
    pause_reason: str = ""  # with phase "paused": why, in its words
    client_mode: bool = False  # its DHT accepts no incoming connections
    # its place in the run's data: the shard it reads, sequences read in this pass, the shard's size
    # in sequences, and passes over it finished before (claims; the coordinator keeps them only for
    # the shard it leased to this peer, see coordinator/peers/shardbook.py)
    shard_index: int = 0
    shard_position: int = 0
    shard_sequences: int = 0
    shard_pass: int = 0


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PeerReport))


def dht_claim_message(challenge: bytes, dht_peer_id: str) -> bytes:
    """What a peer signs with its hivemind (libp2p) private key to prove that `dht_peer_id` is its
    own: the coordinator's random per-session challenge, bound to the id and to this purpose, so a
    signature cannot be replayed for another session or another protocol."""
    return b"crowdtrain dht claim v1\n" + challenge + b"\n" + dht_peer_id.encode("ascii")


def join_message(join_unix_s: int, dht_peer_id: str) -> bytes:
    """What a joiner signs with the key it names at Join: the time it joins and its peer id, bound to
    this purpose (a DHT claim signature cannot pass for one). The coordinator accepts it only within
    a few minutes of its own clock, so a copy seen on the wire is soon useless."""
    return b"crowdtrain join v1\n" + str(int(join_unix_s)).encode() + b"\n" + dht_peer_id.encode("ascii")


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
