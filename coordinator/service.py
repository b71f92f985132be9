"""The gRPC servicer (a thin translation layer) and the server factory.

The servicer turns protos into `PeerRecord`s and back; every decision lives in `registry` and the
store. Domain errors map to gRPC status codes in one place (`_abort`). No torch, no hivemind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
from crowdtrain.coordinator import archive
from crowdtrain.coordinator.errors import PortInUseError
from crowdtrain.coordinator.registry import HealthSettings, PeerRecord
from crowdtrain.coordinator.status import SwarmStatus
from crowdtrain.coordinator.store import Store
from crowdtrain.peer import checkpoint
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

FILE_CHUNK_BYTES = 1 << 20  # per DownloadCheckpointFile message; well under gRPC's 4 MiB default
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name  # "crowdtrain.v1.Coordinator"


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


class Rejected(Exception):
    """A request the coordinator refuses; carries the gRPC status the client will see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class CoordinatorServicer:
    """The coordinator's RPCs as plain methods: protos in, protos out, `Rejected` for refusals."""

    def __init__(
        self,
        run: RunInfo,
        store: Store,
        health_settings: HealthSettings,
        initial_peers: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
        status: Callable[[], SwarmStatus] | None = None,
        heartbeat_latency: Callable[[float], None] = lambda seconds: None,
        resume_step: Callable[[], int] = lambda: 0,
        downloads: archive.DownloadTracker | None = None,
    ):
        self.run, self.store, self.health = run, store, health_settings
        self.initial_peers, self.clock = initial_peers, clock
        self.status, self.heartbeat_latency, self.resume_step = status, heartbeat_latency, resume_step
        self.downloads = downloads or archive.DownloadTracker()
        self._join_lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        now = self.clock()
        if self.store.is_banned(request.name):
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED, f"peer name {request.name!r} is banned by the operator"
            )
        with self._join_lock:  # shard assignment must not race between two joiners
            previous = (
                self.store.get_peer(request.previous_session_id) if request.previous_session_id else None
            )
            shard_index = previous.shard_index if previous else self.store.count_peers() % self.run.num_shards
            record = PeerRecord(
                session_id=uuid.uuid4().hex,
                name=request.name[:64] or "anonymous",
                joined_unix_s=now,
                last_seen_unix_s=now,
                phase="joining",
                version=request.version[:32],
                device=request.device[:64],
                shard_index=shard_index,
            )
            self.store.upsert_peer(record)
        logger.info(
            "peer %r joined (session %s, shard %d, %s)",
            record.name,
            record.session_id[:8],
            shard_index,
            record.device,
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
                resume_from_step=self.resume_step(),
            ),
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        t0 = time.perf_counter()
        record = self.store.get_peer(request.session_id)
        if record is None:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}; join again")
        if record.banned:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "this peer is banned by the operator")
        updated = dataclasses.replace(
            record,
            last_seen_unix_s=self.clock(),
            left_unix_s=None,
            left_reason="",
            dht_peer_id=request.dht_peer_id or record.dht_peer_id,
            name=request.name[:64] or record.name,
            version=request.version[:32] or record.version,
            device=request.device[:64] or record.device,
            phase=request.phase or record.phase,
            samples_per_s=_finite(request.samples_per_s),
            local_epoch=request.local_epoch,
            loss=request.loss if math.isfinite(request.loss) else math.nan,
            uptime_s=_finite(request.uptime_s),
            samples_total=request.samples_total,
            swarm_size=request.swarm_size,
        )
        self.store.upsert_peer(updated, durable=False)  # written behind: heartbeats are frequent
        response = pb.HeartbeatResponse(heartbeat_interval_s=self.health.heartbeat_interval_s)
        self.heartbeat_latency(time.perf_counter() - t0)
        return response

    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        record = self.store.get_peer(request.session_id)
        if record is None:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}")
        now = self.clock()
        self.store.upsert_peer(
            dataclasses.replace(
                record, left_unix_s=now, last_seen_unix_s=now, left_reason=request.reason[:200]
            )
        )
        logger.info("peer %r left (%s)", record.name, request.reason or "no reason given")
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
        metas = checkpoint.list_checkpoints(self.run.checkpoint_root)
        if not metas:
            raise Rejected(grpc.StatusCode.NOT_FOUND, "no checkpoint has been published yet")
        meta = metas[-1] if request.step == 0 else next((m for m in metas if m.step == request.step), None)
        if meta is None:
            available = ", ".join(str(m.step) for m in metas)
            raise Rejected(
                grpc.StatusCode.NOT_FOUND, f"no checkpoint at step {request.step} (have {available})"
            )
        if request.name not in {f.name for f in meta.files} | {checkpoint.META_NAME}:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"checkpoint {meta.step} has no file {request.name!r}")
        path = self.run.checkpoint_root / checkpoint.step_dirname(meta.step) / request.name
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes it when the stream ends
        except FileNotFoundError:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"checkpoint {meta.step} was just pruned") from None
        size = os.fstat(f.fileno()).st_size
        if not 0 <= request.offset <= size:
            f.close()
            raise Rejected(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is outside 0..{size}")
        f.seek(request.offset)
        return f, size, meta.step

    def GetStatus(self, request, context) -> pb.GetStatusResponse:
        if self.status is None:
            raise Rejected(grpc.StatusCode.UNIMPLEMENTED, "this coordinator keeps no swarm status")
        status = self.status()
        s = status.summary
        return pb.GetStatusResponse(
            summary=pb.SwarmSummary(
                run_id=s.run_id,
                global_epoch=s.global_epoch,
                samples_per_s=s.samples_per_s,
                latest_eval_loss=s.latest_eval_loss,
                latest_checkpoint_step=s.latest_checkpoint_step,
                peers_by_state=s.peers_by_state,
                total_contributed_samples=s.total_contributed_samples,
                last_rejection=s.last_rejection,
            ),
            peers=[
                pb.PeerStatus(
                    session_id=v.session_id,
                    name=v.name,
                    state=v.state,
                    reason=v.reason,
                    device=v.device,
                    samples_per_s=v.samples_per_s,
                    local_epoch=v.local_epoch,
                    contributed_samples=v.contributed_samples,
                    computed_samples=v.computed_samples,
                    last_seen_unix_s=v.last_seen_unix_s,
                    contributing=v.contributing,
                    dht_peer_id=v.dht_peer_id,
                    loss=v.loss,
                )
                for v in status.peers
            ],
        )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


class _AioAdapter(pb_grpc.CoordinatorServicer):
    """Serves the plain servicer on grpc.aio: one event-loop thread, no GIL hand-offs between
    worker threads (see docs/figures.md for the tail latency this buys)."""

    def __init__(self, servicer: CoordinatorServicer):
        self.servicer = servicer

    async def _call(self, method, request, context):
        try:
            return method(request, context)
        except Rejected as e:
            await context.abort(e.code, e.message)

    async def Join(self, request, context):
        return await self._call(self.servicer.Join, request, context)

    async def Heartbeat(self, request, context):
        return await self._call(self.servicer.Heartbeat, request, context)

    async def HeartbeatStream(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield self.servicer.Heartbeat(request, context)
            except Rejected as e:
                await context.abort(e.code, e.message)

    async def Leave(self, request, context):
        return await self._call(self.servicer.Leave, request, context)

    async def ListCheckpoints(self, request, context):
        return await self._call(self.servicer.ListCheckpoints, request, context)

    async def GetStatus(self, request, context):
        return await self._call(self.servicer.GetStatus, request, context)

    async def DownloadCheckpointFile(self, request, context):
        try:
            f, size, step = self.servicer.open_checkpoint_file(request)
        except Rejected as e:
            await context.abort(e.code, e.message)
        downloads = self.servicer.downloads
        downloads.begin(step)
        try:
            with f:
                offset = request.offset
                while data := await asyncio.to_thread(f.read, FILE_CHUNK_BYTES):  # disk off the loop
                    yield pb.FileChunk(data=data, offset=offset, size_bytes=size, step=step)
                    offset += len(data)
        finally:
            downloads.end(step)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (it ships with hivemind): a cheaper event loop per RPC."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class GrpcServer:
    """A grpc.aio server on its own event-loop thread, with the thread-pool server's interface:
    `start()`, `stop(grace)` (idempotent; returns self, whose `wait()` is a no-op)."""

    def __init__(self, servicer: CoordinatorServicer, host: str, port: int):
        self._loop = _new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        try:
            self._server, self.port, self.health = self._run(self._build(servicer, host, port))
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro, timeout_s: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _build(self, servicer: CoordinatorServicer, host: str, port: int):
        # so_reuseport=0: a second coordinator on the same port must fail, not silently share it
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 64 << 20)]
        )
        pb_grpc.add_CoordinatorServicer_to_server(_AioAdapter(servicer), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # server reflection, so `grpcurl -plaintext HOST:PORT list` works without the .proto files
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        advice = "another process uses it - stop it or pass --grpc-port 0"
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise PortInUseError(f"cannot listen for gRPC on {host}:{port} ({e}); {advice}") from e
        if bound == 0:
            raise PortInUseError(f"cannot listen for gRPC on {host}:{port}; {advice}")
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, bound, health_servicer

    def start(self) -> GrpcServer:
        self._run(self._server.start())
        return self

    def stop(self, grace: float | None = None) -> GrpcServer:
        if not self._loop.is_closed():
            try:
                self._run(self._server.stop(grace), timeout_s=(grace or 0) + 10)
            finally:
                self._close_loop()
        return self

    def wait(self) -> None:
        """Compatibility with grpc.Server.stop(...).wait(): stop() already waited."""

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def create_server(servicer: CoordinatorServicer, host: str, port: int) -> tuple[GrpcServer, int, object]:
    """Bind the coordinator API, health checking and reflection; returns (server, bound port, health)."""
    server = GrpcServer(servicer, host, port)
    return server, server.port, server.health
