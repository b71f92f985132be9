"""The gRPC servicer: a thin translation layer (the server itself: `grpcserver`).

The servicer turns protos into plain records (`PeerReport`, `PeerRecord`) and back, by field name;
every decision lives in `policy`, `registry` and `archive`, the state in the store. Domain errors
(`errors.RequestError`) map to gRPC status codes in one table, `STATUS_CODES`, which
`grpcserver` applies around every handler. No torch, no hivemind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
from crowdtrain.coordinator import archive, policy
from crowdtrain.coordinator.errors import (
    BannedError,
    InvalidRequestError,
    NotFoundError,
    NotServedError,
    OutOfRangeError,
    RequestError,
)
from crowdtrain.coordinator.registry import HealthSettings, PeerRecord
from crowdtrain.coordinator.status import SwarmStatus
from crowdtrain.coordinator.store import Store
from crowdtrain.peer import checkpoint
from crowdtrain.peer.report import PeerReport, from_heartbeat, to_message
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

FILE_CHUNK_BYTES = 1 << 20  # per DownloadCheckpointFile message; well under gRPC's 4 MiB default
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name  # "crowdtrain.v1.Coordinator"

# the one place domain errors become gRPC status codes
STATUS_CODES: dict[type[RequestError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    BannedError: grpc.StatusCode.PERMISSION_DENIED,  # the peer's heartbeat stops it on this code
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
    ):
        self.run, self.store, self.health = run, store, health_settings
        self.initial_peers, self.clock = initial_peers, clock
        self.status, self.heartbeat_latency = status, heartbeat_latency
        self.downloads = downloads or archive.DownloadTracker()
        self._join_lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        now = self.clock()
        joiner = policy.bound_report(
            PeerReport(name=request.name, version=request.version, device=request.device)
        )
        name = joiner.name or "anonymous"
        policy.require_admitted(policy.admit_join(name, self.store.peers_unordered()))
        with self._join_lock:  # shard assignment must not race between two joiners
            shard_index, shard_reason = policy.assign_shard(self.store.count_peers(), self.run.num_shards)
            record = PeerRecord(
                session_id=uuid.uuid4().hex,
                joined_unix_s=now,
                last_seen_unix_s=now,
                name=name,
                version=joiner.version,
                device=joiner.device,
                shard_index=shard_index,
            )
            self.store.upsert_peer(record)
        metas = checkpoint.list_checkpoints(self.run.checkpoint_root)
        resume_step, resume_reason = policy.resume_step(
            now, self.store.peers_unordered(), metas[-1].step if metas else None, self.health
        )
        logger.info(
            "peer %r joined (session %s, %s): shard %d (%s), resume from step %d (%s)",
            record.name,
            record.session_id[:8],
            record.device,
            shard_index,
            shard_reason,
            resume_step,
            resume_reason,
        )
        return pb.JoinResponse(
            session_id=record.session_id,
            manifest_json=self.run.manifest_json,
            manifest_sha256=self.run.manifest_sha256,
            tokenizer_json=self.run.tokenizer_json,
            initial_peers=self.initial_peers(),
            settings=pb.PeerSettings(
                heartbeat_interval_s=self.health.heartbeat_interval_s,
                shard_index=shard_index,
                http_base_url=self.run.http_base_url,
                resume_from_step=resume_step,
            ),
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        t0 = time.perf_counter()
        session_id = policy.bound_text("session_id", request.session_id)
        record = self.store.get_peer(session_id)
        policy.require_admitted(policy.admit_heartbeat(session_id, record))
        report = policy.bound_report(from_heartbeat(request))
        # written behind: heartbeats are frequent
        self.store.upsert_peer(policy.apply_report(self.clock(), record, report), durable=False)
        response = pb.HeartbeatResponse(heartbeat_interval_s=self.health.heartbeat_interval_s)
        self.heartbeat_latency(time.perf_counter() - t0)
        return response

    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        session_id = policy.bound_text("session_id", request.session_id)
        record = self.store.get_peer(session_id)
        if record is None:
            raise NotFoundError(f"unknown session {session_id!r}; nothing to leave")
        now = self.clock()
        reason = policy.bound_text("reason", request.reason)
        self.store.upsert_peer(
            dataclasses.replace(record, left_unix_s=now, last_seen_unix_s=now, left_reason=reason)
        )
        logger.info("peer %r left (%s)", record.name, reason or "no reason given")
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
                for m in checkpoint.list_checkpoints(self.run.checkpoint_root)
            ],
        )

    def open_checkpoint_file(self, request: pb.DownloadCheckpointFileRequest) -> tuple[BinaryIO, int, int]:
        """(open file positioned at request.offset, file size, step) for DownloadCheckpointFile.

        The caller streams the file and must close it; while it is open, count it in `downloads`
        so that retention does not delete the checkpoint under the reader.
        """
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
