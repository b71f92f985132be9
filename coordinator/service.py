"""The gRPC servicer (a thin translation layer) and the server factory.

The servicer turns protos into plain records (`PeerReport`, `PeerRecord`) and back, by field name;
every decision lives in `policy`, `registry` and `archive`, the state in the store. Domain errors
(`errors.RequestError`) map to gRPC status codes in one table, `STATUS_CODES`, which
`_translating_errors` applies around every handler. No torch, no hivemind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
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
    PortInUseError,
    RequestError,
)
from crowdtrain.coordinator.registry import HealthSettings, PeerRecord
from crowdtrain.coordinator.status import SwarmStatus
from crowdtrain.coordinator.store import Store
from crowdtrain.peer import checkpoint
from crowdtrain.peer.report import PeerReport, from_heartbeat, to_message
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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


def _translating_errors(handler):
    """Wrap an async handler (unary or streaming) so that a `RequestError` raised inside aborts the
    RPC with the status code `STATUS_CODES` gives its class, and its message as the details."""

    async def abort(context, error: RequestError):
        code = next(
            (STATUS_CODES[c] for c in type(error).__mro__ if c in STATUS_CODES), grpc.StatusCode.INTERNAL
        )
        await context.abort(code, str(error))

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self, request, context):
            try:
                async for response in handler(self, request, context):
                    yield response
            except RequestError as e:
                await abort(context, e)

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except RequestError as e:
            await abort(context, e)

    return unary


class _AioAdapter(pb_grpc.CoordinatorServicer):
    """Serves the plain servicer on grpc.aio: one event-loop thread, no GIL hand-offs between
    worker threads (see docs/figures.md for the tail latency this buys)."""

    def __init__(self, servicer: CoordinatorServicer):
        self.servicer = servicer

    @_translating_errors
    async def Join(self, request, context):
        return self.servicer.Join(request, context)

    @_translating_errors
    async def Heartbeat(self, request, context):
        return self.servicer.Heartbeat(request, context)

    @_translating_errors
    async def HeartbeatStream(self, request_iterator, context):
        async for request in request_iterator:
            yield self.servicer.Heartbeat(request, context)

    @_translating_errors
    async def Leave(self, request, context):
        return self.servicer.Leave(request, context)

    @_translating_errors
    async def ListCheckpoints(self, request, context):
        return self.servicer.ListCheckpoints(request, context)

    @_translating_errors
    async def GetStatus(self, request, context):
        return self.servicer.GetStatus(request, context)

    @_translating_errors
    async def DownloadCheckpointFile(self, request, context):
        f, size, step = self.servicer.open_checkpoint_file(request)
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
            self._server, self.port = self._run(self._build(servicer, host, port))
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
        return server, bound

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


def create_server(servicer: CoordinatorServicer, host: str, port: int) -> tuple[GrpcServer, int]:
    """Bind the coordinator API, health checking and reflection; returns (server, bound port)."""
    server = GrpcServer(servicer, host, port)
    return server, server.port
