"""Peer health as a pure function of (now, record, settings) -> (state, reason).

No clocks, no I/O: the servicer and the status views call `compute_state` with the current time,
and tests move the clock instead of sleeping.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PeerState(str, enum.Enum):
    JOINING = "JOINING"  # joined, still loading the model, data or swarm state
    ONLINE = "ONLINE"  # heartbeats arrive and it trains
    STALE = "STALE"  # heartbeats are late; it may be overloaded or its link stalls
    DEAD = "DEAD"  # silent longer than the heartbeat timeout
    LEFT = "LEFT"  # said goodbye


@dataclass(frozen=True)
class HealthSettings:
    heartbeat_interval_s: float
    heartbeat_timeout_s: float


@dataclass(frozen=True)
class PeerRecord:
    session_id: str
    name: str
    joined_unix_s: float
    last_seen_unix_s: float
    phase: str = "joining"  # as last reported: "joining", "loading_state", "training"
    left_unix_s: float | None = None
    left_reason: str = ""
    dht_peer_id: str = ""
    version: str = ""
    device: str = ""
    shard_index: int = 0
    samples_per_s: float = 0.0
    local_epoch: int = 0
    loss: float = math.nan
    uptime_s: float = 0.0
    samples_total: int = 0
    swarm_size: int = 0


def compute_state(now: float, record: PeerRecord, settings: HealthSettings) -> tuple[PeerState, str]:
    """The peer's state and a human-readable reason for it."""
    if record.left_unix_s is not None:
        return PeerState.LEFT, f"left {now - record.left_unix_s:.0f}s ago" + (
            f": {record.left_reason}" if record.left_reason else ""
        )
    silent_s = now - record.last_seen_unix_s
    if silent_s > settings.heartbeat_timeout_s:
        return (
            PeerState.DEAD,
            f"no heartbeat for {silent_s:.0f}s (timeout {settings.heartbeat_timeout_s:.0f}s)",
        )
    if silent_s > 2 * settings.heartbeat_interval_s:
        return (
            PeerState.STALE,
            f"last heartbeat {silent_s:.0f}s ago (expected every {settings.heartbeat_interval_s:.0f}s)",
        )
    if record.phase != "training":
        return PeerState.JOINING, f"{record.phase.replace('_', ' ')}"
    return PeerState.ONLINE, f"training at {record.samples_per_s:.1f} samples/s, epoch {record.local_epoch}"
