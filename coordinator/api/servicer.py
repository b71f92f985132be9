"""The gRPC servicer: a thin translation layer (the server itself: `grpcserver`).

The servicer turns protos into plain records (`PeerReport`, `PeerRecord`) and back, by field name;
every decision lives in `policy`, `registry` and `archive`, the state in the store. Domain errors
(`errors.RequestError`) map to gRPC status codes in one table, `STATUS_CODES`, which
`grpcserver` applies around every handler. No torch, no hivemind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
from crowdtrain.coordinator.admission.bans import EvidenceBook
from crowdtrain.coordinator.admission.gate import AdmissionSettings, Gate, NotAdmittedError
from crowdtrain.coordinator.admission.proofs import IdentityProofs, banned_message
from crowdtrain.coordinator.api import reachability
from crowdtrain.coordinator.errors import (
    BannedError,
    IncompatibleError,
    InvalidRequestError,
    NotFoundError,
    NotServedError,
    OutOfRangeError,
    RateLimitedError,
    RequestError,
    UnauthenticatedError,
)
from crowdtrain.coordinator.flood.ratelimit import BucketSettings, RateLimiter
from crowdtrain.coordinator.limits import check_request
from crowdtrain.coordinator.peers import policy
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, is_online
from crowdtrain.coordinator.peers.shardbook import Claim, ShardBook, resume_claim
from crowdtrain.coordinator.peers.standings import Standings
from crowdtrain.coordinator.peers.status import SwarmStatus
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checks import version_verdict
from crowdtrain.peer.run.report import to_message
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

FILE_CHUNK_BYTES = 1 << 20  # per DownloadCheckpointFile message; well under gRPC's 4 MiB default
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name  # "crowdtrain.v1.Coordinator"

# the one place domain errors become gRPC status codes
STATUS_CODES: dict[type[RequestError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    BannedError: grpc.StatusCode.PERMISSION_DENIED,  # the peer's heartbeat stops it on this code
    IncompatibleError: grpc.StatusCode.FAILED_PRECONDITION,  # an out-of-date peer: upgrade, not retry
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,  # peers retry it with backoff
    OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    NotServedError: grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass(frozen=True)
class RunInfo:
    """What the servicer hands to joining peers; fixed for the life of the process."""

    manifest_json: str
    manifest_sha256: str
    tokenizer_json: str
    num_shards: int
    http_base_url: str
    checkpoint_root: Path
    signing_public_key: str = ""
    manifest_signature: str = ""  # the run key's signature of manifest_json (peer/run/runproof.py)
    min_peer_version: str = ""  # joiners saying they run an older crowdtrain are refused ("" = any)
    shard_bytes: tuple[int, ...] = ()  # each training shard's size (bounds the sizes peers report)


@dataclass(frozen=True)
class AbuseLimits:
    """How much one caller may ask of the coordinator (see `ratelimit`)."""

    joins_burst: int = 20  # joins one address (an IPv6 /64) may make at once
    joins_per_minute: float = 6.0  # and then, sustained
    heartbeat_burst: int = 10  # heartbeats one session may send at once
    heartbeats_per_interval: float = 10.0  # sustained, per heartbeat_interval_s (peers send 1)
    prune_silent_joins_after_s: float = 120.0  # a session that never heartbeats is deleted then
    forget_sessions_after_s: float = 86400.0  # a session not seen for this long is deleted
    max_live_sessions_per_root: int = 256  # online sessions from one invite, allowlist key or address
    reachability_burst: int = 3  # reachability checks one session may ask for at once
    reachability_per_minute: float = 1.0  # and then, sustained (each dials up to 8 addresses)
    max_failed_proofs: int = 3  # failed DHT proofs that end a session


def _run_id_of(manifest_json: str) -> str:
    try:
        return str(json.loads(manifest_json).get("run_id", ""))
    except (ValueError, AttributeError):  # tests serve stand-in manifests
        return ""


class CoordinatorServicer:
    """The coordinator's RPCs as plain methods: protos in, protos out, `RequestError`s for refusals."""

    def __init__(
        self,
        run: RunInfo,
        store: Store,
        health_settings: HealthSettings,
        initial_peers: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
        status: Callable[[], SwarmStatus] | None = None,
        heartbeat_latency: Callable[[float], None] = lambda seconds: None,
        downloads: archive.DownloadTracker | None = None,
        abuse: AbuseLimits = AbuseLimits(),
        gate: Gate | None = None,
        evidence: EvidenceBook | None = None,
        reach: reachability.ReachSettings | None = None,
    ):
        """`gate`: admission and swarm tokens (default: open, no tokens); `evidence`: reports
        against peers and automatic bans (default: the store's, with default thresholds)."""
        self.run = run
        self.store = store
        self.health = health_settings
        self.gate = gate or Gate(AdmissionSettings(), "", sign=None)
        self.evidence = evidence or (EvidenceBook(store) if store is not None else None)
        self.initial_peers, self.clock = initial_peers, clock
        self.status, self.heartbeat_latency = status, heartbeat_latency
        self.downloads = downloads or archive.DownloadTracker()
        self.abuse = abuse
        self._join_lock = threading.Lock()
        self.proofs = IdentityProofs(store, abuse.max_failed_proofs)
        self._joins = RateLimiter(BucketSettings(abuse.joins_burst, abuse.joins_per_minute / 60))
        interval_s = health_settings.heartbeat_interval_s if health_settings else 1.0
        self._heartbeats = RateLimiter(
            BucketSettings(abuse.heartbeat_burst, abuse.heartbeats_per_interval / interval_s)
        )
        self._reach = RateLimiter(
            BucketSettings(abuse.reachability_burst, abuse.reachability_per_minute / 60)
        )
        self.dial: Callable[[str, int], bool] = reachability.tcp_dial
        self.reach = (
            reach or reachability.ReachSettings()
        )  # whom the check may dial; which proxy names callers
        num_shards = run.num_shards if run is not None else 1
        sizes = (run.shard_bytes if run is not None else ()) or (2**40,) * num_shards
        live_s = health_settings.heartbeat_timeout_s if health_settings else 60.0
        self.shards = ShardBook(store, num_shards, sizes, live_s=live_s)
        self._run_id = _run_id_of(run.manifest_json if run is not None else "")
        self.standings = Standings(store.contribution_totals if store else dict, clock)

    def _refuse_out_of_date(self, joiner: dict) -> None:
        compatible, reason = version_verdict(joiner["version"], self.run.min_peer_version)
        if not compatible:
            logger.info("refused peer %r: %s", joiner["name"], reason)
            raise IncompatibleError(reason)

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        now = self.clock()
        joiner = check_request(request)
        address = reachability.caller_address(context, self.reach)  # behind a trusted proxy: the caller's
        self._limit(self._joins, address, now, "joins")
        self._refuse_out_of_date(joiner)
        invite_id, announced_dht_id = self.gate.admit_join(joiner, now, self._refuse_banned)
        token, challenge = secrets.token_urlsafe(32), secrets.token_bytes(32)
        claim = resume_claim(request, joiner, self._run_id)  # where its last session stopped reading
        with self._join_lock:  # shard assignment must not race between two joiners
            root = self.gate.admission_root(invite_id, announced_dht_id, address)
            self._prune(now, root)
            session_id = uuid.uuid4().hex
            shard_index, start, shard_reason = self.shards.lease(now, session_id, claim)
            record = PeerRecord(
                session_id=session_id,
                peer_id=secrets.token_hex(6),
                token_sha256=policy.token_sha256(token),
                dht_challenge=challenge.hex(),
                joined_unix_s=now,
                last_seen_unix_s=now,
                name=joiner["name"] or "anonymous",
                version=joiner["version"],
                device=joiner["device"],
                shard_index=shard_index,
                lease_shard=shard_index,
                invite_id=invite_id,
                admitted_dht_id=announced_dht_id,
                admission_root=root,
            )
            self.store.upsert_peer(record)
        resume_step = self._resume_step(
            now, record, f"shard {shard_index} at {start.position} ({shard_reason})"
        )
        return pb.JoinResponse(
            session_id=record.session_id,
            session_token=token,
            peer_id=record.peer_id,
            dht_challenge=challenge,
            manifest_json=self.run.manifest_json,
            manifest_sha256=self.run.manifest_sha256,
            manifest_signature=self.run.manifest_signature,
            tokenizer_json=self.run.tokenizer_json,
            initial_peers=self.initial_peers(),
            admission=self.gate.settings.mode,
            settings=pb.PeerSettings(
                heartbeat_interval_s=self.health.heartbeat_interval_s,
                shard_index=shard_index,
                http_base_url=self.run.http_base_url,
                resume_from_step=resume_step,
                shard_position=start.position,
                shard_pass=start.passes,
            ),
        )

    def _refuse_banned(self, dht_id: str) -> None:
        if dht_id in self.store.banned_dht_ids():
            raise BannedError(banned_message(self.store, dht_id))

    def _resume_step(self, now: float, record: PeerRecord, shard: str) -> int:
        """The checkpoint a joiner starts from (0: the live swarm's state); logs the join."""
        metas = archive.published(self.run.checkpoint_root)
        groups = self.evidence.groups.since(now - self.health.contribution_grace_s) if self.evidence else ()
        latest = metas[-1].step if metas else None
        step, why = policy.resume_step(now, self.store.peers_unordered(), latest, self.health, groups)
        logger.info(
            "peer %r joined (id %s, %s): %s, resume from step %d (%s)",
            *(record.name, record.peer_id, record.device, shard, step, why),
        )
        return step

    def _limit(self, limiter: RateLimiter, key: str, now: float, what: str) -> None:
        allowed, retry_s = limiter.allow(key, now)
        if not allowed:
            raise RateLimitedError(f"too many {what} from {key}; retry in {retry_s:.1f}s")

    def _prune(self, now: float, root: str) -> None:
        """Delete sessions that joined long ago and never heartbeated (abandoned, or sybils) and
        sessions not seen for a day; refuse a joiner whose root has too many sessions online."""
        silent, forget = self.abuse.prune_silent_joins_after_s, self.abuse.forget_sessions_after_s
        stale, live_from_root = [], 0
        for p in self.store.peers_unordered():
            if policy.never_heartbeated(now, p, silent)[0] or policy.forgotten(now, p, forget)[0]:
                stale.append(p.session_id)
            elif p.admission_root == root and is_online(now, p, self.health):
                live_from_root += 1
        if stale:
            self.store.delete_peers(stale)
            logger.info("pruned %d session(s): never heartbeated, or not seen for %.0fs", len(stale), forget)
        ok, why = policy.sessions_verdict(live_from_root, self.abuse.max_live_sessions_per_root, root)
        if not ok:
            raise RateLimitedError(why)

    def _session(self, request) -> PeerRecord:
        """The record of the session a request names, once its token and bans are checked."""
        record = self.store.get_peer(request.session_id)
        decision = policy.admit_session(
            request.session_id, record, request.session_token, self.store.banned_dht_ids()
        )
        policy.require_admitted(decision)
        admitted, why = self.gate.still_admitted(record)
        if not admitted:
            raise NotAdmittedError(why)
        return record

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        t0 = time.perf_counter()
        # every field within its limit (the evidence too), before any lookup
        report, rejections, groups = policy.checked_heartbeat(request)
        record = self._session(request)
        now = self.clock()
        self._limit(self._heartbeats, record.session_id, now, "heartbeats")
        same, why = policy.identity_verdict(record, report)
        if not same:
            raise InvalidRequestError(why)
        updated = policy.apply_report(now, record, report)
        if request.dht_public_key and updated.dht_peer_id and not updated.dht_verified:
            updated = self.proofs.prove(updated, request.dht_public_key, request.dht_signature)
            still, why = self.gate.still_admitted(updated)
            if not still:
                raise NotAdmittedError(why)
        updated = self._place_in_data(now, updated)
        # written behind: heartbeats are frequent
        self.store.upsert_peer(updated, durable=False)
        swarm_token, _ = self.gate.token_for(now, updated, self.store.banned_dht_ids())
        if (rejections or groups) and updated.dht_verified and self.evidence:  # only proven identities
            holds_token = self.gate.holds_token(updated.session_id, now)
            self.evidence.take(now, updated, holds_token, rejections, groups)
        response = pb.HeartbeatResponse(
            heartbeat_interval_s=self.health.heartbeat_interval_s,
            dht_verified=updated.dht_verified,
            swarm_token=swarm_token,
        )
        if updated.dht_verified:  # only a proven identity's ledger is its own
            standing = self.standings.of(updated.dht_peer_id)
            response.accepted_samples, response.share = standing.accepted_samples, standing.share
            response.rank, response.ranked_peers = standing.rank, standing.ranked_peers
        if updated.next_shard >= 0:
            after = self.shards.cursor(updated.next_shard)
            response.next_shard = updated.next_shard
            response.next_shard_position, response.next_shard_pass = after.position, after.passes
        self.heartbeat_latency(time.perf_counter() - t0)
        return response

    def _place_in_data(self, now: float, record: PeerRecord) -> PeerRecord:
        """Its lease and next shard after the data position its heartbeat reports (`shardbook`)."""
        if record.shard_sequences <= 0:  # it has not read a shard yet: nothing to report
            claim = Claim(-1, 0, 0)
        else:
            claim = Claim(
                record.shard_index, record.shard_position, record.shard_pass, record.shard_sequences
            )
        lease, next_shard = self.shards.report(
            now, record.session_id, record.lease_shard, record.next_shard, claim
        )
        return dataclasses.replace(record, lease_shard=lease, next_shard=next_shard)

    def CheckReachability(self, request: pb.ReachabilityRequest, context) -> pb.ReachabilityResponse:
        """Dial what the peer announces (`reachability`): blocking for up to a few seconds, so the
        server runs it off its event loop."""
        maddrs = check_request(request)["maddrs"]
        record = self._session(request)
        now = self.clock()
        self._limit(self._reach, record.session_id, now, "reachability checks")
        metadata = (context.invocation_metadata() or ()) if context is not None else ()
        seen = reachability.caller_host(context.peer(), metadata, self.reach) if context is not None else ""
        reachable, dialed, advice = reachability.check(seen, maddrs[:8], self.dial, record.name, self.reach)
        current = self.store.get_peer(record.session_id) or record
        verdict = "reachable" if reachable else "unreachable"
        self.store.upsert_peer(dataclasses.replace(current, reachability=verdict))
        return pb.ReachabilityResponse(
            reachable=reachable, seen_host=seen, dialed=", ".join(dialed), advice=advice
        )

    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        reason = check_request(request)["reason"]
        try:
            record = self._session(request)
        except BannedError:
            record = self.store.get_peer(request.session_id)  # a banned peer may still say goodbye
        now = self.clock()
        self.store.upsert_peer(
            dataclasses.replace(record, left_unix_s=now, last_seen_unix_s=now, left_reason=reason)
        )
        self._heartbeats.forget(record.session_id)
        self.gate.forget(record.session_id)
        self.proofs.forget(record.session_id)
        self.shards.release(record.session_id, now)  # held a while for its restart
        logger.info("peer %r (id %s) left (%s)", record.name, record.peer_id, reason or "no reason given")
        return pb.LeaveResponse()

    def ListCheckpoints(self, request, context) -> pb.ListCheckpointsResponse:
        base = self.run.http_base_url
        return pb.ListCheckpointsResponse(
            http_base_url=base,
            signing_public_key=self.run.signing_public_key,
            checkpoints=[
                pb.CheckpointInfo(
                    step=m.step,
                    created_unix_s=m.created_unix_s,
                    eval_loss=m.eval_loss,
                    samples_seen=m.samples_seen,
                    files=[
                        pb.CheckpointFile(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes)
                        for f in m.files
                    ],
                    url=f"{base}/checkpoints/{m.step}",
                )
                for m in archive.published(self.run.checkpoint_root)
            ],
        )

    def open_checkpoint_file(self, request: pb.DownloadCheckpointFileRequest) -> tuple[BinaryIO, int, int]:
        """(open file positioned at request.offset, file size, step) for DownloadCheckpointFile.

        The caller streams the file and must close it; while it is open, count it in `downloads`
        so that retention does not delete the checkpoint under the reader.
        """
        check_request(request)
        meta, path = archive.lookup_file(self.run.checkpoint_root, request.step or None, request.name)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes it when the stream ends
        except FileNotFoundError:
            raise NotFoundError(f"checkpoint {meta.step} was just pruned; ask for the latest") from None
        size = os.fstat(f.fileno()).st_size
        if not 0 <= request.offset <= size:
            f.close()
            raise OutOfRangeError(f"offset {request.offset} is outside 0..{size}; restart the download at 0")
        f.seek(request.offset)
        return f, size, meta.step

    def GetStatus(self, request, context) -> pb.GetStatusResponse:
        if self.status is None:
            raise NotServedError("this coordinator keeps no swarm status")
        status = self.status()
        return pb.GetStatusResponse(
            summary=to_message(pb.SwarmSummary, status.summary),
            peers=[to_message(pb.PeerStatus, view) for view in status.peers],
        )
