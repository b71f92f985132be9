"""The gRPC server: the plain servicer (`service.CoordinatorServicer`) served on grpc.aio, with
health checking and reflection. `RequestError`s raised by the servicer become gRPC status codes
here, through `service.STATUS_CODES`. No torch, no hivemind.

Bounded for the internet (`GrpcLimits`): requests above `max_receive_bytes` are refused by gRPC
itself (RESOURCE_EXHAUSTED; the largest legitimate request is well under 1 KiB); every call goes
through `callgate` first (per-address rate limits, the first message within a few seconds, calls
held per kind and per address, a budget for accepted heartbeat streams that nothing
unauthenticated can take); `max_streams_per_connection` per connection, keepalive pings drop dead
clients, connections are renewed after `max_connection_age_s`; GetStatus, ListCheckpoints and
opening a download run in small thread pools (not on the loop that serves heartbeats), and a
checkpoint download whose client stops reading for `stall_timeout_s` is cancelled, releasing
retention. With `tls` it serves TLS only.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from crowdtrain.coordinator.api.loopthread import LoopThread
from crowdtrain.coordinator.api.servicer import (
    FILE_CHUNK_BYTES,
    SERVICE_NAME,
    STATUS_CODES,
    CoordinatorServicer,
)
from crowdtrain.coordinator.errors import InvalidRequestError, PortInUseError, RequestError
from crowdtrain.coordinator.flood.callbudget import CallBudget, CallLimits, Pool
from crowdtrain.coordinator.flood.callgate import CallGate, accept_session
from crowdtrain.peer.link.tls import server_grpc_credentials
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcLimits:
    """What gRPC clients may hold. How many calls of each kind, per address and in all, and how
    often one address may open them: `calls` (`callbudget.CallLimits`, which says when to raise
    what)."""

    max_receive_bytes: int = 64 << 10  # one request message
    max_streams_per_connection: int = 100  # HTTP/2 streams one connection may open at once
    keepalive_time_s: float = 30.0  # ping a connection silent for this long...
    keepalive_timeout_s: float = 10.0  # ...and drop it when the ping is not answered within this
    max_connection_idle_s: float = 600.0  # close a connection without any RPC for this long
    # a connection is asked to go away after this long (+-10%), so none is held forever; its calls
    # then have the grace to finish. A peer's heartbeat stream is cut at the end of the grace: its
    # next heartbeat fails and the one after, 2 intervals later (3 after the last one answered;
    # the default heartbeat timeout is 4), opens a new stream on a new connection
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 1800.0  # long enough for a checkpoint download to finish
    # calls that arrived faster than the handler loop takes them queue in gRPC core; past this many
    # it cancels new ones at random (CANCELLED), all of them at twice this. A burst of thousands of
    # calls (a flood, or every peer reconnecting at once) queues for a moment instead
    max_pending_calls: int = 8192
    stall_timeout_s: float = 30.0  # cancel a download whose client read nothing for this long
    status_workers: int = 2  # threads that answer GetStatus
    calls: CallLimits = CallLimits()
    # grpc.aio's own limit, above everything `calls` holds: calls being refused, and unary
    # heartbeats being answered, hold no slot there
    uncounted_rpcs: int = 4096

    @property
    def max_concurrent_rpcs(self) -> int:
        """grpc.aio's one global counter: never the limit that refuses a call (`calls` is)."""
        return self.calls.total_calls() + self.uncounted_rpcs

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.so_reuseport", 0),  # a second coordinator on the same port must fail, not share it
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self.max_pending_calls),
        ]


@dataclass(frozen=True)
class ServerTls:
    """The coordinator's certificate chain and private key (PEM files, --tls-cert/--tls-key)."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class _Undecodable:
    """What a request that is not a valid message of its type deserializes to: the handler then
    refuses it with INVALID_ARGUMENT (a deserializer that raised would make gRPC answer UNKNOWN
    and log a traceback for every stranger's garbage)."""

    message_type: str
    error: str


def _lenient_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return _Undecodable(message_cls.DESCRIPTOR.full_name, str(e))

    return parse


def _decoded(request):
    """The request, or InvalidRequestError when it did not parse; a client stream is checked
    message by message as it is read."""
    if isinstance(request, _Undecodable):
        raise InvalidRequestError(
            f"the request is not a valid {request.message_type} ({request.error}); "
            "send messages built from crowdtrain's .proto (server reflection lists it)"
        )
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    return request


async def _decoded_stream(requests):
    async for request in requests:
        yield _decoded(request)


def _method_handlers(adapter) -> grpc.GenericRpcHandler:
    """The Coordinator service's handlers, as the generated `add_CoordinatorServicer_to_server`
    would register them, but with `_lenient_parser` deserializers."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        kind = kinds[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(adapter, method.name),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


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
                async for response in handler(self, _decoded(request), context):
                    yield response
            except RequestError as e:
                await abort(context, e)

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, _decoded(request), context)
        except RequestError as e:
            await abort(context, e)

    return unary


class _AioAdapter(pb_grpc.CoordinatorServicer):
    """Serves the plain servicer on grpc.aio: one event-loop thread, no GIL hand-offs between
    worker threads (see docs/figures.md for the tail latency this buys)."""

    def __init__(self, servicer: CoordinatorServicer, limits: GrpcLimits):
        self.servicer, self.limits = servicer, limits
        self.status_pool = ThreadPoolExecutor(limits.status_workers, thread_name_prefix="grpc-status")
        self.reach_pool = ThreadPoolExecutor(4, thread_name_prefix="grpc-reach")
        self.disk_pool = ThreadPoolExecutor(2, thread_name_prefix="grpc-disk")

    @_translating_errors
    async def Join(self, request, context):
        return self.servicer.Join(request, context)

    @_translating_errors
    async def Heartbeat(self, request, context):
        return self.servicer.Heartbeat(request, context)

    @_translating_errors
    async def HeartbeatStream(self, request_iterator, context):
        """Its first message must name a valid session (else the servicer's error ends it); then
        it holds a session slot (`callgate.accept_session`)."""
        accepted = False
        async for request in request_iterator:
            response = self.servicer.Heartbeat(request, context)
            if not accepted:
                accept_session(request.session_id)
                accepted = True
            yield response

    @_translating_errors
    async def Leave(self, request, context):
        return self.servicer.Leave(request, context)

    @_translating_errors
    async def ListCheckpoints(self, request, context):
        """Off the loop: it may read every checkpoint's crowdtrain.json (`archive.published`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.disk_pool, self.servicer.ListCheckpoints, request, context)

    @_translating_errors
    async def GetStatus(self, request, context):
        """Off the loop: building it for thousands of peers must not delay heartbeats."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.status_pool, self.servicer.GetStatus, request, context)

    @_translating_errors
    async def CheckReachability(self, request, context):
        """Off the loop: it dials the peer, for up to a few seconds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.reach_pool, self.servicer.CheckReachability, request, context)

    @_translating_errors
    async def DownloadCheckpointFile(self, request, context):
        """Written with context.write (not yield) so that a client that stops reading is noticed."""
        f, size, step = await asyncio.to_thread(self.servicer.open_checkpoint_file, request)  # disk
        downloads = self.servicer.downloads
        downloads.begin(step)
        try:
            with f:
                offset = request.offset
                while data := await asyncio.to_thread(f.read, FILE_CHUNK_BYTES):  # disk off the loop
                    chunk = pb.FileChunk(data=data, offset=offset, size_bytes=size, step=step)
                    try:
                        await asyncio.wait_for(context.write(chunk), self.limits.stall_timeout_s)
                    except TimeoutError:
                        # cancel the RPC: a status could not be sent either, it queues behind the data
                        logger.info("cancelled a download of step %d: the client stopped reading", step)
                        raise asyncio.CancelledError from None
                    offset += len(data)
        finally:
            downloads.end(step)


class GrpcServer:
    """A grpc.aio server on its own event-loop thread, with the thread-pool server's interface:
    `start()`, `stop(grace)` (idempotent; returns self, whose `wait()` is a no-op)."""

    def __init__(
        self,
        servicer: CoordinatorServicer,
        host: str,
        port: int,
        limits: GrpcLimits = GrpcLimits(),
        tls: ServerTls | None = None,
    ):
        self._adapter = _AioAdapter(servicer, limits)
        self.calls = CallBudget(limits.calls)  # what every call holds (used on the server's loop)
        self._loop = LoopThread("grpc-aio")
        try:
            self._server, self.port = self._loop.run(self._build(host, port, limits, tls))
        except BaseException:
            self._close()
            raise

    async def _build(self, host: str, port: int, limits: GrpcLimits, tls: ServerTls | None):
        server = grpc.aio.server(
            options=limits.server_options(),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            interceptors=(CallGate(self.calls),),
        )
        server.add_generic_rpc_handlers((_method_handlers(self._adapter),))
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
            if tls is None:
                bound = server.add_insecure_port(f"{host}:{port}")
            else:
                credentials = server_grpc_credentials(tls.cert_file, tls.key_file)
                bound = server.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError as e:
            raise PortInUseError(f"cannot listen for gRPC on {host}:{port} ({e}); {advice}") from e
        if bound == 0:
            raise PortInUseError(f"cannot listen for gRPC on {host}:{port}; {advice}")
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, bound

    def start(self) -> GrpcServer:
        self._loop.run(self._server.start())
        return self

    def stop(self, grace: float | None = None) -> GrpcServer:
        if not self._loop.closed:
            try:
                self._loop.run(self._server.stop(grace), timeout_s=(grace or 0) + 10)
            finally:
                self._close()
        return self

    def calls_held(self) -> dict[Pool, int]:
        """How many calls each pool of `calls` holds right now (for metrics and tests)."""
        return self._loop.run(_call(self.calls.held))

    def wait(self) -> None:
        """Compatibility with grpc.Server.stop(...).wait(): stop() already waited."""

    def _close(self) -> None:
        self._loop.close()
        self._adapter.status_pool.shutdown(wait=False, cancel_futures=True)
        self._adapter.reach_pool.shutdown(wait=False, cancel_futures=True)
        self._adapter.disk_pool.shutdown(wait=False, cancel_futures=True)


async def _call(fn):
    return fn()


def create_server(
    servicer: CoordinatorServicer,
    host: str,
    port: int,
    limits: GrpcLimits = GrpcLimits(),
    tls: ServerTls | None = None,
) -> tuple[GrpcServer, int]:
    """Bind the coordinator API, health checking and reflection; returns (server, bound port)."""
    server = GrpcServer(servicer, host, port, limits, tls)
    return server, server.port
