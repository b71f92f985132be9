"""What the coordinator decides about peers, as pure functions: no clocks, no I/O, no gRPC.

Who may join or heartbeat (`admit_join`, `admit_heartbeat`), which data shard a joiner reads
(`assign_shard`), which checkpoint it starts from (`resume_step`), and what of a peer's report is
kept (`bound_report`, `apply_report`). Decisions return (decision, reason); the servicer turns a
refusal into a domain error with `require_admitted`. Tests pass `now` and assert on the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable

from crowdtrain.coordinator.errors import BannedError, InvalidRequestError, NotFoundError
from crowdtrain.coordinator.registry import HealthSettings, PeerRecord, is_online
from crowdtrain.peer.report import LIMITS, InputLimits, PeerReport, report_values

# every field of a report is text or a number (its default says which); bound_report checks each
_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(PeerReport) if isinstance(f.default, str))
_NUMBER_FIELDS = tuple(
    (f.name, f.default) for f in dataclasses.fields(PeerReport) if f.name not in _TEXT_FIELDS
)


class Admission(str, enum.Enum):
    ADMITTED = "ADMITTED"
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # never joined, or joined a coordinator that lost its state
    BANNED = "BANNED"  # the operator ran `crowdtrain ban`


_REFUSALS = {Admission.UNKNOWN_SESSION: NotFoundError, Admission.BANNED: BannedError}


def admit_join(name: str, peers: Iterable[PeerRecord]) -> tuple[Admission, str]:
    """Whether a peer called `name` may join: not when the operator banned a session of that name."""
    if any(p.banned and p.name == name for p in peers):
        return Admission.BANNED, f"peer name {name!r} is banned by the operator"
    return Admission.ADMITTED, f"peer name {name!r} is not banned"


def admit_heartbeat(session_id: str, record: PeerRecord | None) -> tuple[Admission, str]:
    """Whether a heartbeat for `session_id` (whose record is `record`, if any) is accepted."""
    if record is None:
        return Admission.UNKNOWN_SESSION, f"unknown session {session_id!r}; join again"
    if record.banned:
        return Admission.BANNED, "this peer is banned by the operator"
    return Admission.ADMITTED, f"session {session_id!r} is known and not banned"


def require_admitted(decision: tuple[Admission, str]) -> None:
    """Raise the domain error of a refusal (`NotFoundError`, `BannedError`); return when admitted."""
    admission, reason = decision
    if admission is not Admission.ADMITTED:
        raise _REFUSALS[admission](reason)


def assign_shard(known_peers: int, num_shards: int) -> tuple[int, str]:
    """The training shard a joiner starts on: round robin over every peer the run has seen (each
    peer then walks on through all shards, see `crowdtrain.peer.data.rotating_batches`)."""
    shard = known_peers % num_shards
    return shard, f"round robin: {known_peers} peers joined before it, {num_shards} shards"


def resume_step(
    now: float, peers: Iterable[PeerRecord], latest_checkpoint_step: int | None, health: HealthSettings
) -> tuple[int, str]:
    """The checkpoint a joiner starts from: the latest one when nobody is training (the whole swarm
    left and volunteers come back), else 0 (load the live state from the training peers)."""
    if latest_checkpoint_step is None:
        return 0, "no checkpoint published yet: load the state from the swarm"
    if any(is_online(now, p, health) for p in peers):
        return 0, "peers are training: load the live state from them"
    return latest_checkpoint_step, f"nobody is training: start from checkpoint {latest_checkpoint_step}"


def bound_text(field: str, value: str, limits: InputLimits = LIMITS) -> str:
    """`value` if within its limit; display text is cut to the limit; anything else is refused."""
    limit = getattr(limits, field)
    if len(value) <= limit:
        return value
    if field in limits.TRUNCATED:
        return value[:limit]
    raise InvalidRequestError(
        f"{field} has {len(value)} characters, more than the {limit} the coordinator accepts; "
        "send the value crowdtrain reports (is this client modified or from another version?)"
    )


def bound_report(report: PeerReport, limits: InputLimits = LIMITS) -> PeerReport:
    """The report as the coordinator keeps it: text within `limits` (see `bound_text`), and every
    number that is not finite or is negative replaced by its field's default (0; NaN, "unknown",
    for the loss), since no metric a peer reports can be negative."""
    changes = {}
    for name in _TEXT_FIELDS:
        value = getattr(report, name)
        if len(value) > getattr(limits, name):
            changes[name] = bound_text(name, value, limits)
    for name, default in _NUMBER_FIELDS:
        if not 0 <= getattr(report, name) < math.inf:  # false for NaN too
            changes[name] = default
    return dataclasses.replace(report, **changes) if changes else report


def apply_report(now: float, record: PeerRecord, report: PeerReport) -> PeerRecord:
    """The record after a heartbeat carrying `report`: seen now, no longer left, and the report's
    fields, except that empty text keeps what was known (e.g. a DHT id not yet known)."""
    values = {name: value for name, value in report_values(report).items() if value != ""}
    return dataclasses.replace(record, **values, last_seen_unix_s=now, left_unix_s=None, left_reason="")
