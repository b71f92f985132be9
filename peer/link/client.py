"""A client of the coordinator API with deadlines and capped exponential backoff. No torch.

Only this module catches `grpc.RpcError`; callers see `CoordinatorUnavailable` (retryable: the
network or the coordinator is down) or `CoordinatorRejected` (the coordinator said no).

The coordinator's address may be its gRPC HOST:PORT or its dashboard's (`http(s)://HOST:PORT`, or
the HTTP port's HOST:PORT, found out when it answers HTTP/1): then its HTTP API's /api/v1/grpc says
where the gRPC API is, once per process (`resolve_address`). That answer is a stranger's: at most
MAX_DASHBOARD_ANSWER_BYTES, a plain host name or IP and a port 1-65535 (`checked_grpc_address`), or
the address is refused with the port to pass (`http_port_refusal`).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import queue
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from crowdtrain.peer.checks import NetworkValueError, parse_ascii_int
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.download import open_url
from crowdtrain.peer.link.tls import ClientTls, connection_hint, plaintext_refusal
from crowdtrain.peer.machine.install import upgrade_hint
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
    """Validate HOST:PORT, or the dashboard's http(s)://HOST[:PORT] (asked where its gRPC API is
    when a client connects: `resolve_address`), and return it; raises CoordinatorAddressError with
    what to type instead. No network."""
    if is_http_url(address):
        try:
            parts = urllib.parse.urlsplit(address)
            ok = bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number or over 65535
            ok = False
        if not ok:
            raise CoordinatorAddressError(
                f"coordinator address {address!r} is neither HOST:PORT (for example 203.0.113.7:50051) "
                "nor its dashboard's http(s)://HOST:PORT"
            )
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CoordinatorAddressError(
            f"coordinator address {address!r} is not HOST:PORT (for example 203.0.113.7:50051)"
        )
    return address


MAX_DASHBOARD_ANSWER_BYTES = 1024  # /api/v1/grpc: {"grpc": "HOST:PORT", "tls": bool}, ~60 bytes
DASHBOARD_TIMEOUT_S = 10.0  # for that one small answer
MAX_HOST_CHARS = 253  # the longest DNS name
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")  # plain DNS name: letters, digits, hyphens, dots


def checked_grpc_address(value: object) -> str:
    """Pure: `value` (a coordinator's word) as a gRPC HOST:PORT: a plain host name, an IPv4 address or
    a [bracketed] IPv6 address, and a port 1-65535 in ASCII digits; else NetworkValueError."""
    if not isinstance(value, str) or not value.isascii() or len(value) > MAX_HOST_CHARS + 8:
        raise NetworkValueError(f"{clean_display(str(value), 80)!r} is not a HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    port = parse_ascii_int(port_text, "the port") if sep else 0
    if not 0 < port < 65536:
        raise NetworkValueError(f"{clean_display(value, 80)!r} has no port from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        ip = None
    if ip is not None and "%" not in host:  # no IPv6 zone: it names an interface of the sender
        return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    if bracketed or len(host) > MAX_HOST_CHARS or not HOSTNAME.fullmatch(host):
        raise NetworkValueError(f"{clean_display(host, 80)!r} is not a plain host name or IP address")
    return f"{host}:{port}"


def _tls_mismatch(base: str, grpc_address: str, serves_tls: bool, tls: ClientTls) -> str:
    """Pure: why the gRPC API the dashboard at `base` names cannot be used with `tls` ("" if it can)."""
    if serves_tls and not tls.enabled:
        return (
            f"the coordinator at {base} says its gRPC API {grpc_address} takes TLS: pass "
            f"--coordinator {grpc_address} with --tls (or --tls-ca FILE, the operator's certificate)"
        )
    if tls.enabled and not serves_tls:
        return (
            f"TLS was asked for ({base} or --tls/--tls-ca), but the coordinator says its gRPC API "
            f"{grpc_address} is plaintext; pass --coordinator {grpc_address} without --tls/--tls-ca to accept that"
        )
    return ""


def grpc_address_from_dashboard(url: str, tls: ClientTls | None, given: str = "") -> tuple[str, ClientTls]:
    """(HOST:PORT of the gRPC API, the TLS to reach it with) from the coordinator's HTTP API at `url`
    (its scheme and HOST:PORT only). `given`: the address as the user typed it, for messages.
    Raises CoordinatorAddressError: the refusal naming the gRPC port when the answer is missing,
    oversized or malformed, and what to pass when the TLS the user asked for does not match."""
    given = given or url
    refused = plaintext_refusal(url, tls)
    if refused:
        raise CoordinatorAddressError(refused)
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme.lower()}://{parts.netloc}"
    grpc_tls = tls if tls is not None and tls.enabled else ClientTls(enabled=parts.scheme.lower() == "https")
    try:
        with open_url(f"{base}/api/v1/grpc", DASHBOARD_TIMEOUT_S, grpc_tls.ssl_context()) as response:
            body = response.read(MAX_DASHBOARD_ANSWER_BYTES + 1)
        if len(body) > MAX_DASHBOARD_ANSWER_BYTES:
            raise NetworkValueError(f"the answer is over {MAX_DASHBOARD_ANSWER_BYTES} bytes")
        answer = json.loads(body)
        if not isinstance(answer, dict) or not isinstance(answer.get("tls"), bool):
            raise NetworkValueError('the answer is not {"grpc": "HOST:PORT", "tls": true|false}')
        grpc_address = checked_grpc_address(answer.get("grpc"))
    except (OSError, ValueError, http.client.HTTPException, CrowdtrainError) as e:
        logger.debug("%s/api/v1/grpc: %s", clean_display(base, 300), clean_display(str(e), 300))
        raise CoordinatorAddressError(http_port_refusal(given)) from None
    mismatch = _tls_mismatch(base, grpc_address, answer["tls"], grpc_tls)
    if mismatch:
        raise CoordinatorAddressError(mismatch)
    return grpc_address, grpc_tls


_RESOLVED: dict[tuple[str, ClientTls | None], tuple[str, ClientTls | None]] = {}
_RESOLVED_LOCK = threading.Lock()
MAX_RESOLVED = 64  # addresses remembered per process (a process talks to one coordinator)


def _remember(key: tuple[str, ClientTls | None], found: tuple[str, ClientTls | None]) -> None:
    logger.info("the coordinator's gRPC API is at %s (from its dashboard)", found[0])
    with _RESOLVED_LOCK:
        if len(_RESOLVED) >= MAX_RESOLVED:
            _RESOLVED.clear()
        _RESOLVED[key] = found


def resolve_address(address: str, tls: ClientTls | None = None) -> tuple[str, ClientTls | None]:
    """(gRPC HOST:PORT, TLS to reach it with) for `address` as the user gave it: a checked HOST:PORT
    as is, or a dashboard URL asked once per process (`grpc_address_from_dashboard`; the one line
    `the coordinator's gRPC API is at HOST:PORT (from its dashboard)` is logged then)."""
    with _RESOLVED_LOCK:
        found = _RESOLVED.get((address, tls))
    if found is not None:
        return found
    if not is_http_url(parse_address(address)):
        return address, tls
    found = grpc_address_from_dashboard(address, tls)
    _remember((address, tls), found)
    return found


class CoordinatorClient:
    def __init__(self, address: str, rpc_timeout_s: float = 10.0, tls: ClientTls | None = None):
        self.given = address  # as the user typed it; `address` is the gRPC API's HOST:PORT
        self.address, self.tls = resolve_address(address, tls)
        self.rpc_timeout_s = rpc_timeout_s
        self._connect()

    def _connect(self) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if self.tls is not None and self.tls.enabled:
            self._channel = grpc.secure_channel(self.address, self.tls.grpc_credentials(), options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def _follow_dashboard(self) -> None:
        """`address` answered HTTP/1 (the dashboard's port given as HOST:PORT): ask its HTTP API
        where the gRPC API is and connect there; else the refusal naming the gRPC port."""
        scheme = "https" if self.tls is not None and self.tls.enabled else "http"
        try:
            found = grpc_address_from_dashboard(f"{scheme}://{self.address}", self.tls, self.address)
        except CoordinatorAddressError as e:
            raise CoordinatorSpeaksHttp(str(e)) from None
        _remember((self.given, self.tls), found)
        self._channel.close()
        self.address, self.tls = found
        self._connect()

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

    def _rpc(self, name: str, request, timeout_s: float | None = None):
        """The unary call `name`; when the address turns out to be the dashboard's port, once more
        at the gRPC API its HTTP API names (`_follow_dashboard`)."""
        try:
            return self._call(getattr(self._stub, name), request, timeout_s)
        except CoordinatorSpeaksHttp:
            if is_http_url(self.given) or self.address != self.given:
                raise  # already the address a dashboard named: never a second hop
            self._follow_dashboard()
        return self._call(getattr(self._stub, name), request, timeout_s)

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        """Join; a refusal of this crowdtrain as out of date adds the command that upgrades this
        machine's install (the coordinator can only list the ways)."""
        try:
            return self._rpc("Join", request)
        except CoordinatorRejected as e:
            if e.code is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            raise CoordinatorRejected(f"{e}; {upgrade_hint(_minimum_named(str(e)))}", e.code) from None

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return self._rpc("Heartbeat", request)

    def heartbeat_stream(self) -> HeartbeatStream:
        return HeartbeatStream(self._stub, self.address, self.rpc_timeout_s)

    def leave(self, session_id: str, session_token: str, reason: str) -> None:
        request = pb.LeaveRequest(session_id=session_id, session_token=session_token, reason=reason)
        self._rpc("Leave", request, timeout_s=3.0)

    def list_checkpoints(self) -> pb.ListCheckpointsResponse:
        return self._rpc("ListCheckpoints", pb.ListCheckpointsRequest())

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
        return self._rpc("GetStatus", pb.GetStatusRequest())

    def check_reachability(
        self, session_id: str, session_token: str, maddrs: list[str]
    ) -> pb.ReachabilityResponse:
        request = pb.ReachabilityRequest(
            session_id=session_id, session_token=session_token, maddrs=maddrs[:16]
        )
        return self._rpc("CheckReachability", request, timeout_s=max(self.rpc_timeout_s, 30.0))


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


def _minimum_named(refusal: str) -> str:
    """The version a version refusal names ("needs crowdtrain >= X"), normalized ("" if none): it
    goes into a command the volunteer may paste, so only a well-formed version number is kept."""
    from packaging.version import InvalidVersion, Version

    found = re.search(r"needs crowdtrain >= ([0-9][0-9A-Za-z.!+-]{0,31})", refusal)
    try:
        return str(Version(found.group(1).rstrip("."))) if found else ""
    except InvalidVersion:
        return ""


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
