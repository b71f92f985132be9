"""The gRPC server: the plain servicer (`service.CoordinatorServicer`) served on grpc.aio, with
health checking and reflection. `RequestError`s raised by the servicer become gRPC status codes
here, through `service.STATUS_CODES`. No torch, no hivemind.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading

import grpc
from crowdtrain.coordinator.errors import PortInUseError, RequestError
from crowdtrain.coordinator.service import FILE_CHUNK_BYTES, SERVICE_NAME, STATUS_CODES, CoordinatorServicer
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)


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
