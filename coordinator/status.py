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

from crowdtrain.coordinator.registry import HealthSettings, PeerRecord, PeerState, compute_state, contribution
from crowdtrain.peer.checkpoint import CheckpointMeta
from crowdtrain.peer.report import PeerReport, report_values


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

    session_id: str
    state: str
    reason: str
    contributing: bool
    computed_samples: int  # = samples_total: processed, accepted or not (the API's name for it)
    contributed_samples: int  # samples the swarm's progress records show it contributed
    last_seen_unix_s: float
    joined_unix_s: float
    source: str


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


def build_status(
    now: float,
    run_id: str,
    peers: Sequence[PeerRecord],
    contribution_totals: dict[str, int],
    health: HealthSettings,
    progress: SwarmProgress,
    checkpoints: Sequence[CheckpointMeta],
    rejections: Sequence[dict] = (),
) -> SwarmStatus:
    views = []
    for record in peers:
        state, reason = compute_state(now, record, health)
        contributing = state is PeerState.ONLINE and contribution(now, record, health)[0]
        views.append(
            PeerView(
                **report_values(record),
                session_id=record.session_id,
                state=state.value,
                reason=reason,
                contributing=contributing,
                computed_samples=record.samples_total,
                contributed_samples=contribution_totals.get(record.dht_peer_id, 0)
                if record.dht_peer_id
                else 0,
                last_seen_unix_s=record.last_seen_unix_s,
                joined_unix_s=record.joined_unix_s,
                source=record.source,
            )
        )
    by_state = Counter(v.state for v in views)
    latest = checkpoints[-1] if checkpoints else None
    summary = SwarmSummary(
        run_id=run_id,
        global_epoch=max(
            progress.global_epoch, max((v.local_epoch for v in views if v.state == "ONLINE"), default=0)
        ),
        samples_per_s=progress.samples_per_s,
        peers_by_state={s.value: by_state.get(s.value, 0) for s in PeerState},
        latest_eval_loss=latest.eval_loss if latest else math.nan,
        latest_checkpoint_step=latest.step if latest else -1,
        checkpoints=len(checkpoints),
        total_contributed_samples=sum(contribution_totals.values()),
        progress_read_unix_s=progress.read_unix_s,
        rejected_checkpoints=len(rejections),
        last_rejection=f"step {rejections[0]['step']}: {rejections[0]['reason']}" if rejections else "",
    )
    # live peers first, then by name
    order = {s.value: i for i, s in enumerate((PeerState.ONLINE, PeerState.JOINING, PeerState.STALE))}
    views.sort(key=lambda v: (order.get(v.state, 9), v.name, v.session_id))
    return SwarmStatus(summary, tuple(views))


def contributors(status: SwarmStatus, contribution_totals: dict[str, int]) -> list[dict]:
    """Leaderboard: one row per DHT identity, named after its latest session, most samples first."""
    names: dict[str, str] = {}
    for view in sorted(status.peers, key=lambda v: v.last_seen_unix_s):
        if view.dht_peer_id:
            names[view.dht_peer_id] = view.name
    rows = [
        {"name": names.get(peer_id, f"peer {peer_id[-8:]}"), "dht_peer_id": peer_id, "samples": total}
        for peer_id, total in contribution_totals.items()
    ]
    rows.sort(key=lambda r: (-r["samples"], r["name"]))
    return rows
