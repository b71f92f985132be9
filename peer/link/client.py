"""A client of the coordinator API with deadlines and capped exponential backoff. No torch.

Only this module catches `grpc.RpcError`; callers see `CoordinatorUnavailable` (retryable: the
network or the coordinator is down) or `CoordinatorRejected` (the coordinator said no).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.tls import ClientTls, connection_hint
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MAX_DETAILS_CHARS = 500  # of a coordinator's error text shown to the volunteer


class CoordinatorUnavailable(CrowdtrainError, ConnectionError):
    """The coordinator could not be reached (wrong address, down, or the network is). `failure`:
    what failed and why, without the advice (so a retry loop that gives up adds its own once)."""

    def __init__(self, message: str, failure: str = ""):
        super().__init__(message)
        self.failure = failure or message


class CoordinatorRejected(CrowdtrainError):
    """The coordinator answered with an error that retrying will not fix."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class CoordinatorAddressError(CrowdtrainError, ValueError):
    """The coordinator's address is malformed, or names its HTTP port where the gRPC API is needed."""


DEFAULT_GRPC_PORT = 50051  # the coordinator's --grpc-port unless its operator changed it
NEXT_STEP = "check the address and that the coordinator is running and reachable from this machine"


def is_http_url(address: str) -> bool:
    """Whether `address` is an http(s):// URL (the coordinator's dashboard and HTTP API)."""
    return address.lower().startswith(("http://", "https://"))


def http_port_refusal(address: str) -> str:
    """Pure: the one line that says which port to use when `address` (an http(s):// URL, or a
    HOST:PORT that answered HTTP) names the coordinator's dashboard where its gRPC API is needed."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host = rest.rpartition(":")[0] if rest.rpartition(":")[2].isdigit() else rest
    host = host or "HOST"
    return (
        f"{address} is the coordinator's HTTP address (its dashboard), not its gRPC API: pass its "
        f"gRPC HOST:PORT, --coordinator {host}:{DEFAULT_GRPC_PORT} ({DEFAULT_GRPC_PORT} unless the operator "
        "set --grpc-port; it is in the coordinator's `peers join with` line)"
    )


def parse_address(address: str) -> str:
    """Validate HOST:PORT and return it; raises CoordinatorAddressError with what to type instead."""
    if is_http_url(address):
        raise CoordinatorAddressError(http_port_refusal(address))
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CoordinatorAddressError(
            f"coordinator address {address!r} is not HOST:PORT (for example 203.0.113.7:50051)"
        )
    return address


class CoordinatorClient:
    def __init__(self, address: str, rpc_timeout_s: float = 10.0, tls: ClientTls | None = None):
        self.address = parse_address(address)
        self.rpc_timeout_s = rpc_timeout_s
        self.tls = tls
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if tls is not None and tls.enabled:
            self._channel = grpc.secure_channel(self.address, tls.grpc_credentials(), options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request, timeout_s: float | None = None) -> T:
        try:
            return method(request, timeout=timeout_s or self.rpc_timeout_s)
        except grpc.RpcError as e:
            raise _translate(e, self.address, self.tls) from None

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        return self._call(self._stub.Join, request)

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return self._call(self._stub.Heartbeat, request)

    def heartbeat_stream(self) -> HeartbeatStream:
        return HeartbeatStream(self._stub, self.address, self.rpc_timeout_s)

    def leave(self, session_id: str, session_token: str, reason: str) -> None:
        request = pb.LeaveRequest(session_id=session_id, session_token=session_token, reason=reason)
        self._call(self._stub.Leave, request, timeout_s=3.0)

    def list_checkpoints(self) -> pb.ListCheckpointsResponse:
        return self._call(self._stub.ListCheckpoints, pb.ListCheckpointsRequest())

    def download_checkpoint_file(
        self, step: int, name: str, offset: int, timeout_s: float
    ) -> Iterator[pb.FileChunk]:
        """Stream one checkpoint file from `offset`; errors surface as CoordinatorUnavailable/Rejected."""
        request = pb.DownloadCheckpointFileRequest(step=step, name=name, offset=offset)
        try:
            yield from self._stub.DownloadCheckpointFile(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise _translate(e, self.address, self.tls) from None

    def get_status(self) -> pb.GetStatusResponse:
        return self._call(self._stub.GetStatus, pb.GetStatusRequest())

    def check_reachability(
        self, session_id: str, session_token: str, maddrs: list[str]
    ) -> pb.ReachabilityResponse:
        request = pb.ReachabilityRequest(
            session_id=session_id, session_token=session_token, maddrs=maddrs[:16]
        )
        return self._call(self._stub.CheckReachability, request, timeout_s=max(self.rpc_timeout_s, 30.0))


class CoordinatorSpeaksHttp(CoordinatorAddressError):
    """HOST:PORT answered HTTP/1: it is the coordinator's dashboard port, not its gRPC API."""


# gRPC's words for a transport failure -> what a user understands
_WHY_UNREACHABLE = (
    ("connection refused", "nothing accepts connections on that port"),
    ("domain name not found", "the host name does not resolve"),
    ("dns resolution failed", "the host name does not resolve"),
    ("name or service not known", "the host name does not resolve"),
    ("network is unreachable", "the network to that host is unreachable"),
    ("no route to host", "there is no route to that host"),
    ("timed out", "the connection timed out"),
    ("deadline exceeded", "no answer in time"),
)


def _why_unreachable(code: grpc.StatusCode, details: str) -> str:
    lowered = details.lower()
    for words, why in _WHY_UNREACHABLE:
        if words in lowered:
            return why
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    return f"{code.name}: {details[:200]}" if details else code.name


def _translate(e: grpc.RpcError, address: str, tls: ClientTls | None = None) -> Exception:
    """The error a caller sees: what failed, why and what to do, in one line (gRPC's own text goes
    to the debug log). The status details are the coordinator's own words (a hostile one may send
    terminal escape sequences): cleaned and cut before they reach any message or log."""
    code, details = e.code(), clean_display(e.details() or "", MAX_DETAILS_CHARS)
    logger.debug("coordinator at %s: %s: %s", address, code.name, details)
    if "http1.x server" in details or "expected settings frame" in details.lower():
        return CoordinatorSpeaksHttp(http_port_refusal(address))
    if code in _RETRYABLE or code is grpc.StatusCode.CANCELLED:
        hint = connection_hint(tls, details or "") if code is grpc.StatusCode.UNAVAILABLE else ""
        failure = f"coordinator at {address} is unreachable: {_why_unreachable(code, details)}"
        return CoordinatorUnavailable(
            f"{failure}; {hint or NEXT_STEP}", failure + (f"; {hint}" if hint else "")
        )
    return CoordinatorRejected(f"coordinator at {address} refused: {code.name}: {details}", code)


class HeartbeatStream:
    """One long-lived HeartbeatStream call; `send` blocks until the answer arrives.

    A watchdog cancels the call when no answer comes within `rpc_timeout_s` (a hung or stopped
    coordinator); any failure closes the stream and the next `send` opens a new one. A coordinator
    too old for streams answers UNIMPLEMENTED: then `send` falls back to unary heartbeats.
    """

    def __init__(self, stub, address: str, rpc_timeout_s: float):
        self._stub = stub
        self.address = address
        self.rpc_timeout_s = rpc_timeout_s
        self._queue: queue.Queue | None = None
        self._responses = None
        self._unary = False

    def _requests(self, q: queue.Queue):
        while (item := q.get()) is not None:
            yield item

    def send(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        if self._unary:
            try:
                return self._stub.Heartbeat(request, timeout=self.rpc_timeout_s)
            except grpc.RpcError as e:
                raise _translate(e, self.address) from None
        if self._responses is None:
            self._queue = queue.Queue()
            self._responses = self._stub.HeartbeatStream(self._requests(self._queue))
        self._queue.put(request)
        watchdog = threading.Timer(self.rpc_timeout_s, self._responses.cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            return next(self._responses)
        except grpc.RpcError as e:
            self.close()
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                self._unary = True
                return self.send(request)
            if e.code() is grpc.StatusCode.CANCELLED and not watchdog.is_alive():
                raise CoordinatorUnavailable(
                    f"coordinator at {self.address} did not answer a heartbeat within {self.rpc_timeout_s:.0f}s"
                ) from None
            raise _translate(e, self.address) from None
        except StopIteration:
            self.close()
            raise CoordinatorUnavailable(
                f"coordinator at {self.address} closed the heartbeat stream"
            ) from None
        finally:
            watchdog.cancel()

    def close(self) -> None:
        """End the call; idempotent."""
        if self._queue is not None:
            self._queue.put(None)
        if self._responses is not None:
            self._responses.cancel()
        self._queue = self._responses = None


def retry_until(
    fn: Callable[[], T],
    *,
    deadline_s: float,
    what: str,
    stop: threading.Event | None = None,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 10.0,
) -> T:
    """Call `fn` until it succeeds, retrying `CoordinatorUnavailable` with capped jittered backoff.

    Gives up after `deadline_s` seconds with a CoordinatorUnavailable saying what to check.
    """
    start = time.monotonic()
    backoff = initial_backoff_s
    while True:
        try:
            return fn()
        except CoordinatorUnavailable as e:
            elapsed = time.monotonic() - start
            if elapsed + backoff > deadline_s or (stop is not None and stop.is_set()):
                raise CoordinatorUnavailable(
                    f"{e.failure}; gave up on {what} after {elapsed:.0f}s - {NEXT_STEP}"
                ) from None
            emit(
                logger,
                "coordinator_unreachable",
                "%s: %s; retrying in %.1fs",
                what,
                e.failure,
                backoff,
                level=logging.WARNING,
                what=what,
                retry_in_s=round(backoff, 2),
            )
            if stop is not None:
                stop.wait(backoff)
            else:
                time.sleep(backoff)
            backoff = min(max_backoff_s, backoff * 2) * random.uniform(0.8, 1.2)
