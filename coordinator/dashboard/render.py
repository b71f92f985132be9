"""The operator's status table: a GetStatusResponse (what `GetStatus` serves) as the text
`crowdtrain status` prints, or as the JSON document `crowdtrain status --json` prints; and the
HTTP API's JSON (/api/v1/state, /api/v1/peers) read back into a GetStatusResponse. Pure.

    print(format_status(client.get_status(), time.time()))
    print(json.dumps(status_json(client.get_status())))
"""

from __future__ import annotations

import math
from collections import Counter

from crowdtrain.coordinator.dashboard.numbers import data_read, epoch_shown
from crowdtrain.peer.display import clean_display
from crowdtrain.protos import coordinator_pb2 as pb
from google.protobuf import json_format


def _message_json(message) -> dict:
    """Every field of a message by its proto name, defaults included (stable keys); maps as
    objects, int64 as numbers, a non-finite float as null."""
    out = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = dict(value)
        elif f.is_repeated:
            value = [_message_json(v) if f.message_type is not None else v for v in value]
        elif f.message_type is not None:
            value = _message_json(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        out[f.name] = value
    return out


def status_json(status: pb.GetStatusResponse) -> dict:
    """`crowdtrain status --json`: {"summary": {...}, "peers": [{...}, ...]}, keys as in the
    proto (the same names as the HTTP API's /api/v1/state and /api/v1/peers)."""
    return _message_json(status)


def status_from_json(summary: dict, peers: list) -> pb.GetStatusResponse:
    """A GetStatusResponse from the HTTP API's /api/v1/state (`summary`) and /api/v1/peers
    (`peers`); fields the proto lacks are skipped, a null is the field's default."""
    return json_format.ParseDict(
        {"summary": summary, "peers": peers}, pb.GetStatusResponse(), ignore_unknown_fields=True
    )


def _ago(now: float, t: float) -> str:
    s = max(0.0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


# REPORTED: times other peers refused its contributions (evidence; enough of them ban it)
_STATUS_COLUMNS = (
    *"ID NAME STATE REASON DEVICE VERSION NETWORK DATA SAMPLES/S EPOCH COMPUTED CONTRIBUTED".split(),
    *"REPORTED SWARM UPTIME".split(),
    "LAST SEEN",
)


def format_status(status, now: float) -> str:
    """Render a GetStatusResponse as the operator's table (SWARM: peers it sees in the run's progress
    records; UPTIME: since its heartbeats started)."""
    s = status.summary
    loss = (
        f"{s.latest_eval_loss:.3f} (step {s.latest_checkpoint_step})"
        if s.latest_checkpoint_step >= 0
        else "none yet"
    )
    states = ", ".join(f"{n} {state}" for state, n in sorted(s.peers_by_state.items()) if n) or "no peers"
    versions = Counter(
        p.version or "unknown" for p in status.peers if p.state in ("JOINING", "ONLINE", "PAUSED", "STALE")
    )
    epoch, read = epoch_shown(s.global_epoch, s.latest_checkpoint_step), data_read(s)
    source = "" if epoch.source == "swarm" else " (the latest checkpoint's; no swarm records now)"
    lines = [
        f"run {clean_display(s.run_id)}: global epoch {epoch.epoch}{source}, swarm {s.samples_per_s:.1f} samples/s, "
        f"latest checkpoint eval loss {loss}, {s.total_contributed_samples} samples contributed",
        f"peers: {states}",
        *([f"versions: {', '.join(f'{v} x{n}' for v, n in versions.most_common())}"] if versions else []),
        *([f"last refused checkpoint: {clean_display(s.last_rejection)}"] if s.last_rejection else []),
        *([f"data read: {read.text()}"] if read else []),
        "",
    ]
    header = _STATUS_COLUMNS
    rows = [
        (
            p.peer_id,
            p.name,
            p.state,
            p.reason,
            p.device,
            p.version or "-",
            "client" if p.client_mode else p.reachability or "-",
            f"{p.shard_index}:{p.shard_position}" if p.shard_position else "-",  # shard:sequence
            f"{p.samples_per_s:.1f}",
            str(p.local_epoch),
            str(p.computed_samples),
            str(p.contributed_samples),
            str(p.rejections_against) if p.rejections_against else "-",
            str(p.swarm_size) if p.swarm_size else "-",
            _ago(p.uptime_s, 0.0).removesuffix(" ago") if p.uptime_s > 0 else "-",  # 0: no heartbeat yet
            _ago(now, p.last_seen_unix_s),
        )
        for p in status.peers
    ]
    # names and reasons come from strangers: no control character reaches the terminal, even from a
    # database written before display text was cleaned at input
    rows = [tuple(clean_display(cell) for cell in row) for row in rows]
    widths = [min(60, max(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell[:60].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if s.peers_not_listed:
        lines.append(f"... and {s.peers_not_listed} more peer(s) not listed")
    return "\n".join(lines)
