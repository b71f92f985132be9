"""What the coordinator decides about peers, as pure functions: no clocks, no I/O, no gRPC.

Which heartbeats and leaves are accepted (`admit_session`: the session's secret token, bans),
which sessions are pruned (`never_heartbeated`), which checkpoint a joiner starts from
(`resume_step`), and what of a peer's report is kept (`checked_report`, `apply_report`). Who is
too out of date to join is `version_verdict`, in peer/checks.py: `crowdtrain doctor` asks it too.
Decisions return (decision, reason); the servicer turns a refusal into a domain error with
`require_admitted`. Tests pass `now` and assert on the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import math
from collections.abc import Iterable

from crowdtrain.coordinator.errors import (
    BannedError,
    NotFoundError,
    UnauthenticatedError,
)
from crowdtrain.coordinator.limits import check_request
from crowdtrain.coordinator.peers.credit import identity_roots, vouched
from crowdtrain.coordinator.peers.groups import GroupReport
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, is_online
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.run.report import FIELD_NAMES, PeerReport, report_values


class Admission(str, enum.Enum):
    ADMITTED = "ADMITTED"
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # never joined, or joined a coordinator that lost its state
    BAD_TOKEN = "BAD_TOKEN"  # the session's secret token is missing or wrong
    BANNED = "BANNED"  # `crowdtrain ban`, an automatic ban on evidence, or its invite was revoked


_REFUSALS = {
    Admission.UNKNOWN_SESSION: NotFoundError,
    Admission.BAD_TOKEN: UnauthenticatedError,
    Admission.BANNED: BannedError,
}


def token_sha256(token: str) -> str:
    """What the store keeps of a session token: its sha256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def admit_session(
    session_id: str, record: PeerRecord | None, token: str, banned_dht_ids: frozenset[str] = frozenset()
) -> tuple[Admission, str]:
    """Whether a heartbeat or leave for `session_id` (whose record is `record`, if any) carrying
    `token` is accepted: the session exists, the token is its own, and the operator did not ban it
    (nor its proven DHT identity)."""
    if record is None:
        return Admission.UNKNOWN_SESSION, f"unknown session {session_id!r}; join again"
    if not record.token_sha256 or not hmac.compare_digest(record.token_sha256, token_sha256(token)):
        return Admission.BAD_TOKEN, "wrong or missing session_token for this session; join again"
    if record.banned or (record.dht_verified and record.dht_peer_id in banned_dht_ids):
        return Admission.BANNED, f"{record.ban_reason or 'this peer is banned by the operator'}; stop it"
    return Admission.ADMITTED, "session known, token matches, not banned"


def require_admitted(decision: tuple[Admission, str]) -> None:
    """Raise the domain error of a refusal (`NotFoundError`, `UnauthenticatedError`, `BannedError`);
    return when admitted."""
    admission, reason = decision
    if admission is not Admission.ADMITTED:
        raise _REFUSALS[admission](reason)


def never_heartbeated(now: float, record: PeerRecord, prune_after_s: float) -> tuple[bool, str]:
    """Whether a session is pruned: it joined more than `prune_after_s` ago and never heartbeated
    (a joiner heartbeats at once, so such sessions are abandoned or sybils), unless banned (kept so
    the operator's ban shows)."""
    if record.source != "heartbeat" or record.last_heartbeat_unix_s is not None or record.banned:
        return False, "heartbeated, banned, or known from the DHT"
    silent_s = now - record.joined_unix_s
    if silent_s <= prune_after_s:
        return False, f"joined {silent_s:.0f}s ago, within {prune_after_s:.0f}s"
    return True, f"joined {silent_s:.0f}s ago and never heartbeated (limit {prune_after_s:.0f}s)"


def forgotten(now: float, record: PeerRecord, forget_after_s: float) -> tuple[bool, str]:
    """Whether a session is deleted for good: not seen for `forget_after_s` (it left or died long
    ago; its credit lives in the ledger by identity, not here), unless banned (kept so the ban shows)."""
    if record.banned or record.source != "heartbeat":
        return False, "banned, or known from the DHT"
    silent_s = now - record.last_seen_unix_s
    if silent_s <= forget_after_s:
        return False, f"seen {silent_s:.0f}s ago, within {forget_after_s:.0f}s"
    return True, f"not seen for {silent_s:.0f}s (limit {forget_after_s:.0f}s)"


def sessions_verdict(live_from_root: int, max_live: int, root: str) -> tuple[bool, str]:
    """Whether one more session may join from `root` (an invite, allowlist entry or address) that
    has `live_from_root` sessions online: a cap on sybils behind one root."""
    if live_from_root >= max_live:
        return False, (
            f"{live_from_root} sessions from {root} are online, the most this coordinator allows "
            "from one invite, key or address; stop one of them, or retry once one has left"
        )
    return True, f"{live_from_root} of {max_live} sessions from {root}"


def minimum_peer_version(configured: str, own_version: str) -> str:
    """The oldest crowdtrain a peer may run: `configured` (checked), else this coordinator's own
    major.minor ("0.1" for 0.1.3); "" (no minimum) when the own version is not a release."""
    from packaging.version import InvalidVersion, Version

    if configured:
        try:
            return str(Version(configured))
        except InvalidVersion:
            raise CrowdtrainError(
                f"--min-peer-version {configured!r} is not a version number (e.g. 0.2 or 0.2.1)"
            ) from None
    try:
        own = Version(own_version)
    except InvalidVersion:
        return ""
    return "" if own.local else f"{own.major}.{own.minor}"


def resume_step(
    now: float,
    peers: Iterable[PeerRecord],
    latest_checkpoint_step: int | None,
    health: HealthSettings,
    groups: Iterable[GroupReport] = (),
) -> tuple[int, str]:
    """The checkpoint a joiner starts from: 0 (load the live state from the training peers) when a
    confirmed trainer exists, else the latest checkpoint, from which the joiner still loads the live
    state if the swarm is ahead of it (peer/volunteer/recovery.py `catch_up`). `groups`: the all-reduce groups
    peers reported lately (`groups.GroupBook.since`).

    A forged "someone is training" would send newcomers to random weights (a swarm epoch of 0 to
    catch up to), so a peer's own word (its heartbeats, its own progress record) never makes it a
    trainer: a training peer counts once another identity reported averaging with it within the
    grace period, one of another admission root when the trainers come from several roots
    (`trainers_confirmed`). A lone admitted peer (one invite, one allowlist entry) therefore never
    counts: its newcomers start from the checkpoint and then catch up with it."""
    if latest_checkpoint_step is None:
        return 0, "no checkpoint published yet: load the state from the swarm"
    confirmed_ids, why = trainers_confirmed(now, list(peers), health, groups)
    if confirmed_ids:
        return 0, f"peers are training ({why}): load the live state from them"
    return (
        latest_checkpoint_step,
        f"nobody is training that {why}: start from checkpoint {latest_checkpoint_step}",
    )


def trainers_confirmed(
    now: float, peers: list[PeerRecord], health: HealthSettings, groups: Iterable[GroupReport]
) -> tuple[frozenset[str], str]:
    """The identities of the sessions that train (`is_trainer`) and that another identity reported
    averaging with within the grace period: one of another admission root when the trainers come
    from several roots (`credit.vouched`), any other when they share one (in open runs, peers behind
    one address; a root that is one identity cannot confirm itself). Returns them and the rule."""
    roots = identity_roots(p for p in peers if is_trainer(now, p, health))
    recent = [g for g in groups if now - g.t <= health.contribution_grace_s]
    across = len(set(roots.values())) > 1
    mate = "another admission root" if across else "another identity"
    rule = f"a groupmate of {mate} confirmed within {health.contribution_grace_s:.0f}s"
    return vouched(recent, roots, across_roots=across), rule


def is_trainer(now: float, record: PeerRecord, health: HealthSettings) -> bool:
    """Online and training under a DHT identity it proved, and seen in the swarm's signed progress
    records within the grace period: its own word, until a groupmate confirms it
    (`trainers_confirmed`). Never a peer known only from the DHT."""
    if record.source != "heartbeat" or not record.dht_verified or not is_online(now, record, health):
        return False
    seen = record.dht_last_seen_unix_s
    return seen is not None and now - seen <= health.contribution_grace_s


def checked_report(request) -> PeerReport:
    """The report a HeartbeatRequest carries, every field within `limits.REQUEST_LIMITS` (display
    text cleaned and cut, NaN as unknown); InvalidRequestError names the first field outside."""
    return checked_heartbeat(request)[0]


def checked_heartbeat(request) -> tuple[PeerReport, list[dict], list[dict]]:
    """(report, rejections, groups) of a HeartbeatRequest, every field (each rejection's and group's
    too, and their number) within `limits.REQUEST_LIMITS`; InvalidRequestError names the first
    field outside."""
    values = check_request(request)
    report = PeerReport(**{name: values[name] for name in FIELD_NAMES})
    return report, values["rejections"], values["groups"]


def identity_verdict(record: PeerRecord, report: PeerReport) -> tuple[bool, str]:
    """Whether a heartbeat's DHT peer id is the session's: the identity it named and signed at Join
    is the only one it may ever claim (a session that could switch would be many reporters)."""
    if not record.admitted_dht_id:
        return False, "this session joined without naming its identity (an older coordinator); join again"
    if report.dht_peer_id and report.dht_peer_id != record.admitted_dht_id:
        return False, (
            f"dht_peer_id {report.dht_peer_id} is not the identity this session joined with "
            f"({record.admitted_dht_id}); a session never changes identity: join again with this one"
        )
    return True, "the identity it joined with"


def plausible_samples_total(
    now: float, record: PeerRecord, report: PeerReport, slack_samples: int = 4096
) -> tuple[int, str]:
    """A peer's `samples_total`, no more than its throughput allows since its last heartbeat: the
    increase is capped at twice the larger of its last two reported rates times the elapsed time (on
    the coordinator's clock), plus `slack_samples` (a batch in flight, a rate average that lags)."""
    since = record.last_heartbeat_unix_s if record.last_heartbeat_unix_s is not None else record.joined_unix_s
    rate = max(record.samples_per_s, report.samples_per_s)
    allowed = record.samples_total + math.ceil(2 * rate * max(0.0, now - since)) + slack_samples
    if report.samples_total <= allowed:
        return report.samples_total, "within what its throughput allows"
    return allowed, (
        f"claimed {report.samples_total} samples, more than its {rate:.1f} samples/s allow since its "
        f"last heartbeat; kept {allowed}"
    )


def apply_report(now: float, record: PeerRecord, report: PeerReport) -> PeerRecord:
    """The record after a heartbeat carrying `report`: seen now, no longer left, and the report's
    fields, except that empty text keeps what was known (e.g. a DHT id not yet known) and a sample
    count beyond its throughput is capped (`samples_note` says so). Its DHT id is checked before
    (`identity_verdict`): it never changes within a session."""
    values = {name: value for name, value in report_values(report).items() if value != ""}
    values["samples_total"], why = plausible_samples_total(now, record, report)
    # shown with its state (status, dashboard) while its claims exceed what its throughput allows
    values["samples_note"] = (
        "" if values["samples_total"] == report.samples_total else f"samples capped: {why}"
    )
    return dataclasses.replace(
        record, **values, last_seen_unix_s=now, last_heartbeat_unix_s=now, left_unix_s=None, left_reason=""
    )
