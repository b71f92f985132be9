"""Peer health as pure functions of (now, record, settings): no clocks, no I/O.

Two sources of truth meet here: heartbeats sent to the coordinator (`last_seen_unix_s`, `phase`)
and the swarm's own hivemind progress records in the DHT (`dht_last_seen_unix_s`). A peer that
heartbeats but is absent from the progress records is "not contributing"; one that appears in the
progress records but never heartbeats (`source == "dht"`) is still shown. Tests move the clock
instead of sleeping and assert on the reason text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from crowdtrain.peer.run.report import PeerReport


class PeerState(str, enum.Enum):
    JOINING = "JOINING"  # joined, still loading the model, data or swarm state
    ONLINE = "ONLINE"  # heartbeats (or progress records) arrive and it trains
    PAUSED = "PAUSED"  # alive and heartbeating, but not training: its volunteer's settings or signal
    STALE = "STALE"  # late; it may be overloaded, suspended, or its link stalls
    DEAD = "DEAD"  # silent longer than the heartbeat timeout
    LEFT = "LEFT"  # said goodbye
    BANNED = "BANNED"  # refused: `crowdtrain ban`, an automatic ban on evidence, a revoked invite


@dataclass(frozen=True)
class HealthSettings:
    heartbeat_interval_s: float = 5.0  # how often peers send heartbeats (the Join response tells them)
    heartbeat_timeout_s: float = 20.0  # a peer silent for this long is DEAD
    # how long a training peer may be missing from the DHT progress records before it is flagged
    # "not contributing" (progress records are re-published at least every 30 s by hivemind)
    contribution_grace_s: float = 45.0


@dataclass(frozen=True, kw_only=True)
class PeerRecord(PeerReport):
    """Everything the coordinator knows about one peer: what the peer last reported about itself
    (the inherited `PeerReport` fields) and what the coordinator itself observed."""

    session_id: str  # coordinator-assigned, private; "dht:<peer id>" for peers known only from the DHT
    joined_unix_s: float
    last_seen_unix_s: float  # last heartbeat (or, for DHT-only peers, last progress record)
    left_unix_s: float | None = None
    left_reason: str = ""
    lease_shard: int = -1  # the data shard the coordinator gave it to read (-1: none; `shardbook`)
    next_shard: int = -1  # the shard reserved for it to read next (-1: none reserved yet)
    reachability: str = ""  # "reachable", "unreachable" (the coordinator dialed it), "" = unchecked
    source: str = "heartbeat"  # "heartbeat" or "dht"
    dht_last_seen_unix_s: float | None = None  # last time its progress record was in the DHT
    banned: bool = False
    peer_id: str = ""  # short public id: what every view shows and `crowdtrain ban` takes
    token_sha256: str = ""  # sha256 (hex) of the session's secret token; "" = no token (refused)
    dht_challenge: str = ""  # hex of the random bytes the peer signs to prove its dht_peer_id
    dht_verified: bool = False  # dht_peer_id was proven (or came from a signed progress record)
    last_heartbeat_unix_s: float | None = None  # None: never heartbeated (pruned after a while)
    ban_reason: str = ""  # why it is banned, when not by the operator's `crowdtrain ban`
    invite_id: str = ""  # the invite it joined with (`invite` admission); revoking it ends the session
    admitted_dht_id: str = ""  # the DHT identity it announced at Join; its proof must be of this one
    proven_key_hex: str = ""  # the libp2p public key (hex) of its proven DHT identity: its swarm token's key
    samples_note: str = ""  # why its samples_total was capped below its claim ("" when not)
    admission_root: str = (
        ""  # what admitted it: "invite:ID", "key:PEER_ID" (allowlist), "addr:ADDRESS" (open)
    )


def compute_state(now: float, record: PeerRecord, settings: HealthSettings) -> tuple[PeerState, str]:
    """The peer's state and a human-readable reason for it."""
    if record.banned:
        return (
            PeerState.BANNED,
            record.ban_reason or "banned by the operator; its joins and heartbeats are refused",
        )
    if record.left_unix_s is not None:
        return PeerState.LEFT, f"left {now - record.left_unix_s:.0f}s ago" + (
            f": {record.left_reason}" if record.left_reason else ""
        )
    silent_s = now - record.last_seen_unix_s
    what = "progress record" if record.source == "dht" else "heartbeat"
    if silent_s > settings.heartbeat_timeout_s:
        return PeerState.DEAD, f"no {what} for {silent_s:.0f}s (timeout {settings.heartbeat_timeout_s:.0f}s)"
    if record.source == "heartbeat" and silent_s > 2 * settings.heartbeat_interval_s:
        return (
            PeerState.STALE,
            f"last heartbeat {silent_s:.0f}s ago (expected every {settings.heartbeat_interval_s:.0f}s)",
        )
    if record.phase == "paused":
        return PeerState.PAUSED, f"paused: {record.pause_reason or 'no reason given'}"
    if record.phase != "training":
        return PeerState.JOINING, record.phase.replace("_", " ")
    contributing, why = contribution(now, record, settings)
    base = f"training at {record.samples_per_s:.1f} samples/s, epoch {record.local_epoch}"
    return PeerState.ONLINE, base if contributing else f"{base}; not contributing: {why}"


def contribution(now: float, record: PeerRecord, settings: HealthSettings) -> tuple[bool, str]:
    """Whether the swarm's own records confirm this peer's work, and why not."""
    if record.source == "dht":
        return True, "seen only in the swarm's progress records (sends no heartbeats)"
    if record.phase != "training":
        return False, f"still {record.phase.replace('_', ' ')}"
    since = now - (
        record.dht_last_seen_unix_s if record.dht_last_seen_unix_s is not None else record.joined_unix_s
    )
    if record.dht_last_seen_unix_s is None and since > settings.contribution_grace_s:
        return (
            False,
            f"heartbeats arrive but it never appeared in the swarm's progress records ({since:.0f}s)",
        )
    if since > settings.contribution_grace_s:
        return False, f"heartbeats arrive but it left the swarm's progress records {since:.0f}s ago"
    return True, "in the swarm's progress records"


def is_online(now: float, record: PeerRecord, settings: HealthSettings) -> bool:
    """Fast check of `compute_state(...)[0] is ONLINE` without building a reason, for aggregates
    over many peers (the coordinator's history tick must not hold the GIL for long)."""
    if record.banned or record.left_unix_s is not None or record.phase != "training":
        return False
    limit = settings.heartbeat_timeout_s if record.source == "dht" else 2 * settings.heartbeat_interval_s
    return now - record.last_seen_unix_s <= limit
