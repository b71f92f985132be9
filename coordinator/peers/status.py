"""The swarm as operators see it: one pure function from stored facts to the status every view shows.

The JSON API, the dashboard, `/metrics`, gRPC `GetStatus` and `crowdtrain status` all render the
same `SwarmStatus`, so their numbers cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from crowdtrain.coordinator.peers.health import (
    HealthSettings,
    PeerRecord,
    PeerState,
    compute_state,
    contribution,
)
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.run.report import PeerReport, report_values


@dataclass(frozen=True)
class SwarmProgress:
    """What the swarm's own progress records said at the last DHT read."""

    global_epoch: int = 0
    samples_per_s: float = 0.0  # sum of every peer's reported throughput
    num_peers: int = 0  # progress records present, client-mode peers included
    read_unix_s: float = 0.0  # when; 0 = never read


@dataclass(frozen=True, kw_only=True)
class PeerView(PeerReport):
    """One peer as every view shows it: everything it reports about itself (the inherited
    `PeerReport` fields, so a new metric appears in /api/v1/peers on its own) and the verdict."""

    peer_id: str  # short public id; the session id and its token are never shown
    dht_verified: bool  # it proved dht_peer_id; only then the ledger's samples are credited to it
    state: str
    reason: str
    contributing: bool
    computed_samples: int  # = samples_total: processed, accepted or not (the API's name for it)
    contributed_samples: int  # its share of the epochs the swarm accepted it took part in (`credit`)
    last_seen_unix_s: float
    joined_unix_s: float
    source: str
    rejections_against: int = 0  # reports by other peers that refused its contributions (`evidence`)
    reachability: str = ""  # "reachable", "unreachable" (the coordinator dialed it) or "" (unchecked)


@dataclass(frozen=True)
class SwarmSummary:
    run_id: str
    global_epoch: int
    samples_per_s: float
    peers_by_state: dict[str, int]
    latest_eval_loss: float  # NaN before the first checkpoint
    latest_checkpoint_step: int  # -1 before the first checkpoint
    checkpoints: int
    total_contributed_samples: int
    progress_read_unix_s: float
    rejected_checkpoints: int = 0  # states the publisher refused (recent ones)
    last_rejection: str = ""  # "step N: reason" of the newest refusal
    peers_not_listed: int = 0  # peers left out of `SwarmStatus.peers` (bounded: MAX_LISTED_PEERS)
    # how much of the training data the swarm has read (`shardbook.Coverage`): sequences read, every
    # finished pass counted, of the sequences in the shards whose size peers reported
    dataset_sequences_read: int = 0
    dataset_sequences: int = 0
    dataset_shards: int = 0
    dataset_shards_sized: int = 0


@dataclass(frozen=True)
class SwarmStatus:
    summary: SwarmSummary
    peers: tuple[PeerView, ...]

    def to_json_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


MAX_LISTED_PEERS = 500  # every view lists at most this many peers: live first, then most recently seen
MAX_TOTAL_SAMPLES = 2**62  # totals stop here (GetStatus carries them as int64)
_DISPLAY = {"name": 64, "version": 32, "device": 64}


def _view(
    now: float,
    record: PeerRecord,
    contribution_totals: dict[str, int],
    health: HealthSettings,
    rejections_against: dict[str, int],
) -> PeerView:
    state, reason = compute_state(now, record, health)
    if record.samples_note:  # its sample count was capped: say so beside its state
        reason = f"{reason}; {record.samples_note}"
    contributing = state is PeerState.ONLINE and contribution(now, record, health)[0]
    report = report_values(record)
    # cleaned here too: a database written before display text was cleaned at input may hold any
    report.update({name: clean_display(report[name], n) for name, n in _DISPLAY.items()})
    # the ledger is keyed by the peer ids in progress records: credited to a session that proved
    # the id, or to the record's own row (a peer known only from the DHT)
    credited = (record.dht_verified or record.source == "dht") and record.dht_peer_id
    return PeerView(
        **report,
        peer_id=record.peer_id,
        dht_verified=record.dht_verified,
        state=state.value,
        reason=clean_display(reason, 300),
        contributing=contributing,
        computed_samples=record.samples_total,
        contributed_samples=contribution_totals.get(record.dht_peer_id, 0) if credited else 0,
        last_seen_unix_s=record.last_seen_unix_s,
        joined_unix_s=record.joined_unix_s,
        source=record.source,
        rejections_against=rejections_against.get(record.dht_peer_id, 0) if credited else 0,
        reachability=record.reachability,
    )


def build_status(
    now: float,
    run_id: str,
    peers: Sequence[PeerRecord],
    contribution_totals: dict[str, int],
    health: HealthSettings,
    progress: SwarmProgress,
    checkpoints: Sequence[CheckpointMeta],
    rejections: Sequence[dict] = (),
    max_listed_peers: int = MAX_LISTED_PEERS,
    rejections_against: dict[str, int] | None = None,
    coverage=None,
) -> SwarmStatus:
    """`rejections`: states the publisher refused, newest first; `rejections_against`: reports
    against each DHT identity (`evidence.EvidenceBook.counts_against`); `coverage`: how much of
    the data the swarm read (`shardbook.ShardBook.coverage`)."""
    against = rejections_against or {}
    views = [_view(now, record, contribution_totals, health, against) for record in peers]
    by_state = Counter(v.state for v in views)
    latest = checkpoints[-1] if checkpoints else None
    summary = SwarmSummary(
        run_id=run_id,
        # the monitor's: only proven identities' progress records move it (`credit`), never a heartbeat
        global_epoch=progress.global_epoch,
        samples_per_s=progress.samples_per_s,
        peers_by_state={s.value: by_state.get(s.value, 0) for s in PeerState},
        latest_eval_loss=latest.eval_loss if latest else math.nan,
        latest_checkpoint_step=latest.step if latest else -1,
        checkpoints=len(checkpoints),
        total_contributed_samples=min(sum(contribution_totals.values()), MAX_TOTAL_SAMPLES),
        progress_read_unix_s=progress.read_unix_s,
        rejected_checkpoints=len(rejections),
        last_rejection=f"step {rejections[0]['step']}: {rejections[0]['reason']}" if rejections else "",
        peers_not_listed=max(0, len(views) - max_listed_peers),
        dataset_sequences_read=coverage.read if coverage else 0,
        dataset_sequences=coverage.total if coverage else 0,
        dataset_shards=coverage.shards if coverage else 0,
        dataset_shards_sized=coverage.sized if coverage else 0,
    )
    # bounded: live peers first, then the most recently seen; shown by state, then by name
    live = (PeerState.ONLINE, PeerState.PAUSED, PeerState.JOINING, PeerState.STALE)
    order = {s.value: i for i, s in enumerate(live)}
    if len(views) > max_listed_peers:
        views.sort(key=lambda v: (order.get(v.state, 9), -v.last_seen_unix_s))
        views = views[:max_listed_peers]
    views.sort(key=lambda v: (order.get(v.state, 9), v.name, v.peer_id))
    return SwarmStatus(summary, tuple(views))


def contributors(status: SwarmStatus, contribution_totals: dict[str, int], max_rows: int = 200) -> list[dict]:
    """Leaderboard: one row per DHT identity, named after its latest session that proved it (an
    unproven claim lends no name), most samples first."""
    names: dict[str, str] = {}
    for view in sorted(status.peers, key=lambda v: v.last_seen_unix_s):
        if view.dht_peer_id and (view.dht_verified or view.source == "dht"):
            names[view.dht_peer_id] = view.name
    rows = [
        {"name": names.get(peer_id, f"peer {peer_id[-8:]}"), "dht_peer_id": peer_id, "samples": total}
        for peer_id, total in contribution_totals.items()
    ]
    rows.sort(key=lambda r: (-r["samples"], r["name"]))
    return rows[:max_rows]  # bounded, like every status response
