"""Fuzz a live coordinator: every RPC and HTTP route, with hypothesis-made requests.

    python -m scripts.fuzz --requests 200000           # the long run; prints a summary
    python -m scripts.fuzz --requests 2000 --seed 7    # a quick one (tests/test_fuzz.py runs 4,000)

Requests come from scripts/fuzz_inputs.py (built from the protobuf descriptors and the route list in
webserver's docstring) and go, one at a time in a fast loop, to a coordinator in this process
(scripts/fuzz_target.py) while a well-behaved peer heartbeats every 50 ms. A fuzzed call that picks
a session (`GrpcCall.credentials`) gets what a real peer would send, so it reaches the code behind
the checks: a Join is signed by one of a few identities, a heartbeat carries its session's
credentials and claims (and, for an even pick, proves) the identity its session joined with. A run
fails when
- a gRPC call ends with a code outside ALLOWED_CODES (UNKNOWN or INTERNAL mean an unhandled
  exception; UNIMPLEMENTED is allowed only as the coordinator's own answer, `NotServedError`, e.g.
  a reachability check it cannot do for a caller on its own machine, never gRPC's unknown method), or an HTTP request gets a 5xx other than 503 (load shedding), 501 (a method other
  than GET/HEAD: RFC 9110 15.6.2) or 505 (a malformed version), no answer within HTTP_TIMEOUT_S
  (bytes that are only blank lines are no request at all: RFC 9112 2.2 lets the server skip them,
  so the fuzzer then half-closes the connection and the server must close it within HTTP_TIMEOUT_S;
  tests/test_http_server.py checks that idle connections are closed after `idle_timeout_s`),
  or an answer that is not HTTP to a well-formed HTTP/1.x request; a connection the server closes
  or resets is fine;
- any response exceeds MAX_RESPONSE_BYTES, or anything logs at ERROR;
- SQLite fails `PRAGMA integrity_check`, a stored value is outside the request limits table
  (`field_limits`), an integer column cannot be summed (overflow), or the database outgrows MAX_DB_BYTES;
- after the fuzz, GetStatus or a GET of /api/v1/*, /metrics or / fails or exceeds MAX_RESPONSE_BYTES;
- the good peer's heartbeats fail or their p99 round trip exceeds HEARTBEAT_P99_S.
Each problem is listed with the request that caused it (repr, cut short): a reproducer.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import logging
import math
import re
import socket
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from crowdtrain.coordinator.api import webserver
from crowdtrain.coordinator.api.servicer import SERVICE_NAME
from crowdtrain.protos import coordinator_pb2 as pb
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from scripts.fuzz_inputs import (
    METHODS,
    GrpcCall,
    HttpRequest,
    grpc_call,
    http_request,
    message_class,
    route_templates,
)
from scripts.fuzz_target import (
    CHANNEL_OPTIONS,
    CoordinatorProcess,
    GoodPeerProcess,
    Identities,
    credentials,
    percentile,
)

ALLOWED_CODES = frozenset(
    grpc.StatusCode[name]
    for name in (
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ALREADY_EXISTS",
        "ABORTED",  # a session's older HeartbeatStream, ended when the session opens a newer one
    )
)
GRPC_UNKNOWN_METHOD = "Method not found!"  # grpc's details of UNIMPLEMENTED for a method not served
MAX_RESPONSE_BYTES = 1 << 20
MAX_DB_BYTES = 64 << 20
HEARTBEAT_P99_S = 0.050
GRPC_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
BATCH = 10  # requests per hypothesis example
CONCURRENCY = 4  # requests in flight at once: the coordinator's disk waits (SQLite commits) overlap
_RECORD_LOCK = threading.Lock()
_READ_CAP = 4 * MAX_RESPONSE_BYTES
_METHODS = {m.name: m for m in METHODS}
# a request line a server must answer in HTTP/1.x (others may get an HTTP/0.9-style bare body)
_WELL_FORMED = re.compile(rb"[A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r\n")
_GET_OR_HEAD = re.compile(rb"(GET|HEAD) ")


@dataclasses.dataclass
class FuzzReport:
    requests: int = 0
    duration_s: float = 0.0
    outcomes: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    max_bytes: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    violations: list[str] = dataclasses.field(default_factory=list)
    heartbeats_s: list[float] = dataclasses.field(default_factory=list)
    heartbeat_failures: list[str] = dataclasses.field(default_factory=list)
    db_bytes: int = 0
    violation_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def record(self, label: str, outcome: str, size: int, problem: str | None, request: object) -> None:
        with _RECORD_LOCK:
            self._record(label, outcome, size, problem, request)

    def _record(self, label: str, outcome: str, size: int, problem: str | None, request: object) -> None:
        self.requests += 1
        self.outcomes[label][outcome] += 1
        self.max_bytes[label] = max(self.max_bytes[label], size)
        if problem is None and size > MAX_RESPONSE_BYTES:
            problem = f"response of {size} bytes, more than {MAX_RESPONSE_BYTES}"
        if problem is not None:
            self.violate(f"{label}: {problem}; request: {_short(request)}")

    def violate(self, text: str) -> None:
        self.violation_counts[text] += 1
        if self.violation_counts[text] == 1 and len(self.violations) < 200:
            self.violations.append(text)

    def heartbeat_quantiles_ms(self) -> tuple[float, float]:
        return 1000 * percentile(self.heartbeats_s, 0.5), 1000 * percentile(self.heartbeats_s, 0.99)

    def problems(self) -> list[str]:
        found = [f"{v} ({self.violation_counts[v]}x)" for v in self.violations]
        p50, p99 = self.heartbeat_quantiles_ms()
        if not self.heartbeats_s or p99 > HEARTBEAT_P99_S * 1000:
            found.append(
                f"good peer heartbeat p99 {p99:.1f} ms (p50 {p50:.1f} ms) over {HEARTBEAT_P99_S * 1000:.0f} ms"
            )
        if self.heartbeat_failures:
            found.append(
                f"good peer heartbeats failed {len(self.heartbeat_failures)}x: {self.heartbeat_failures[:3]}"
            )
        return found

    def summary(self) -> str:
        p50, p99 = self.heartbeat_quantiles_ms()
        lines = [
            f"{self.requests} requests in {self.duration_s:.1f} s ({self.requests / max(self.duration_s, 1e-9):.0f}/s)",
            f"good peer: {len(self.heartbeats_s)} heartbeats, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"max {1000 * max(self.heartbeats_s, default=math.nan):.2f} ms, {len(self.heartbeat_failures)} failed",
            f"database: {self.db_bytes} bytes",
            "requests by RPC/route (outcomes; largest response):",
        ]
        for label in sorted(self.outcomes):
            counts = self.outcomes[label]
            seen = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            lines.append(f"  {label:45s} {sum(counts.values()):7d}  {seen}; max {self.max_bytes[label]} B")
        problems = self.problems()
        lines.append(f"{len(problems)} problems" + (":" if problems else ""))
        lines += [f"  - {p}" for p in problems]
        return "\n".join(lines)


def _short(value: object, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 40] + f"...<{len(text)} chars>"


class Fuzzer:
    """Sends GrpcCall and HttpRequest plans to `target`, recording every outcome in `report`."""

    def __init__(self, target: CoordinatorProcess, report_: FuzzReport, concurrency: int = CONCURRENCY):
        self.target, self.report = target, report_
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fuzz")
        self.channel = grpc.insecure_channel(target.grpc_address, options=CHANNEL_OPTIONS)
        self.joins: list[tuple[pb.JoinResponse, int]] = []  # sessions, each with the identity it signed
        self.identities = Identities()
        self.routes = route_templates(webserver.__doc__ or "")
        self._join_as_peers()

    def _join_as_peers(self) -> None:
        """One session per identity, joined as a real peer joins: fuzzed calls reach past the session
        check whether or not a fuzzed Join gets in (few do: a random field fails its check, and the
        joins one address may make are few)."""
        join = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Join",
            request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinResponse.FromString,
        )
        for i in range(len(self.identities)):
            request = pb.JoinRequest(name=f"fuzz-peer-{i}", version="0.1.0", device="cpu")
            self.identities.sign(request, i)
            self.joins.append((join(request, timeout=GRPC_TIMEOUT_S), i))

    def close(self) -> None:
        self.pool.shutdown()
        self.channel.close()

    def plans(self) -> st.SearchStrategy:
        hints = self.target.hints()
        return st.one_of(grpc_call(hints), http_request(self.routes, hints))

    def send(self, plan: GrpcCall | HttpRequest) -> None:
        if isinstance(plan, GrpcCall):
            self.send_grpc(plan)
        else:
            self.send_http(plan)

    def _requests(self, call: GrpcCall, method) -> list:
        cls = message_class(method.input_type)
        messages = [cls(**fields) for fields in call.requests] or [cls()]
        if call.credentials is not None and method.name == "Join":
            for m in messages:
                self.identities.sign(m, call.credentials)
        elif call.credentials is not None and self.joins:
            join, who = self.joins[call.credentials % len(self.joins)]
            for m in messages:
                for name, value in credentials(join, cls).items():
                    setattr(m, name, value)
                self.identities.as_peer(m, join, who, call.credentials)
        return messages

    def send_grpc(self, call: GrpcCall) -> None:
        method = _METHODS[call.method]
        path = f"/{SERVICE_NAME}/{method.name}"
        raw = call.raw is not None
        out_cls = message_class(method.output_type)
        serialize = None if raw else (lambda m: m.SerializeToString())
        deserialize = None if raw else out_cls.FromString
        kind = ("stream_" if method.client_streaming else "unary_") + (
            "stream" if method.server_streaming else "unary"
        )
        stub = getattr(self.channel, kind)(
            path, request_serializer=serialize, response_deserializer=deserialize
        )
        requests = [call.raw] if raw else self._requests(call, method)
        size = 0
        try:
            payload = iter(requests) if method.client_streaming else requests[0]
            result = stub(payload, timeout=GRPC_TIMEOUT_S)
            responses = list(result) if method.server_streaming else [result]
            size = sum(len(r) if raw else r.ByteSize() for r in responses)
            code, details = grpc.StatusCode.OK, ""
            if method.name == "Join" and not raw:
                self.joins = (self.joins + [(r, call.credentials or 0) for r in responses])[-256:]
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        served = code is grpc.StatusCode.UNIMPLEMENTED and details != GRPC_UNKNOWN_METHOD  # NotServedError
        problem = None if code in ALLOWED_CODES or served else f"{code.name} ({_short(details, 200)})"
        label = f"gRPC {method.name}" + (" (raw bytes)" if raw else "")
        self.report.record(label, code.name, size, problem, call.raw if raw else requests)

    def send_http(self, request: HttpRequest) -> None:
        blank = not request.wire.strip(b"\r\n")
        outcome, size = http_exchange(self.target.http_port, request.wire, half_close=blank)
        problem = None
        well_formed = _WELL_FORMED.match(request.wire)
        if outcome.startswith("HTTP "):
            status = outcome.split()[1]
            refused = (status == "501" and not _GET_OR_HEAD.match(request.wire)) or (
                status == "505" and not well_formed
            )
            if status.startswith("5") and status != "503" and not refused:
                problem = f"status {status}"
        elif outcome == "timeout":
            problem = f"no answer within {HTTP_TIMEOUT_S} s" + (
                " (nor a close after our EOF)" if blank else ""
            )
        elif outcome == "not HTTP" and well_formed:
            problem = "an answer that is not HTTP to an HTTP/1.x request"
        self.report.record(f"HTTP {request.route}", outcome, size, problem, request.wire)

    def run(self, requests: int, seed: int) -> None:
        """Send at least `requests` requests: hypothesis examples of BATCH plans each, seeded."""
        batch = st.lists(self.plans(), min_size=BATCH, max_size=BATCH)
        start = self.report.requests
        for round_ in range(1000):
            left = requests - (self.report.requests - start)
            if left <= 0:
                return

            @hypothesis_seed(seed + round_)
            @settings(
                max_examples=math.ceil(left / BATCH),
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                derandomize=False,
            )
            @given(batch)
            def send_batch(plans):
                list(self.pool.map(self.send, plans))
                if not self.target.alive():
                    raise RuntimeError("the coordinator's process died")

            send_batch()
        raise RuntimeError(f"hypothesis produced too few examples for {requests} requests")


def _head_complete(data: bytes, is_head: bool) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = data[:end].decode("latin-1").split("\r\n")
    status = head[0].split(" ")
    if len(status) > 1 and status[1].startswith("1"):  # 100 Continue: the real answer follows
        return _head_complete(data[end + 4 :], is_head)
    if is_head or (len(status) > 1 and status[1] in ("204", "304")):
        return True
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        return data.endswith(b"0\r\n\r\n")
    if "content-length" in fields and fields["content-length"].isdigit():
        return len(data) - end - 4 >= int(fields["content-length"])
    return False  # read to the end of the connection


def http_exchange(port: int, wire: bytes, half_close: bool = False) -> tuple[str, int]:
    """Send `wire` on a new connection (then, with `half_close`, our EOF); ("HTTP <status>" | "closed" | "reset" | "timeout" |
    "not HTTP", bytes received)."""
    data = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S) as s:
            try:
                s.sendall(wire)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it refused the rest: its answer, if any, is still to be read
            while len(data) < _READ_CAP and not _head_complete(bytes(data), wire.startswith(b"HEAD ")):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return "timeout", len(data)
    except ConnectionResetError:
        if not data:
            return "reset", 0
    if not data:
        return "closed", 0
    if not data.startswith(b"HTTP/"):
        return "not HTTP", len(data)
    return f"HTTP {data.split(b' ', 2)[1].decode('latin-1')}", len(data)


def field_limits() -> tuple[dict[str, int], dict[str, tuple[float, float]]]:
    """(longest text, numeric range) by field name, from whichever limits table the code has:
    crowdtrain.coordinator.limits.REQUEST_LIMITS (per message and field), else
    crowdtrain.peer.run.report.LIMITS (text lengths only). The loosest over messages wins."""
    lengths: dict[str, int] = {}
    ranges: dict[str, tuple[float, float]] = {}
    try:
        table = importlib.import_module("crowdtrain.coordinator.limits").REQUEST_LIMITS
    except (ImportError, AttributeError):
        old = importlib.import_module("crowdtrain.peer.run.report").LIMITS
        return {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}, {}
    for fields in table.values():
        for name, limit in fields.items():
            if limit.kind in ("display", "id", "bytes"):
                lengths[name] = max(lengths.get(name, 0), limit.max_len)
            elif limit.kind == "enum":
                lengths[name] = max(lengths.get(name, 0), *map(len, limit.choices))
            elif limit.kind in ("int", "float"):
                low, high = ranges.get(name, (limit.low, limit.high))
                ranges[name] = (min(low, limit.low), max(high, limit.high))
    return lengths, ranges


def check_database(path: Path, report_: FuzzReport) -> None:
    """Integrity, stored text within LIMITS, summable integer columns, size."""
    report_.db_bytes = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    if report_.db_bytes > MAX_DB_BYTES:
        report_.violate(f"database is {report_.db_bytes} bytes, more than {MAX_DB_BYTES}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        result = db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            report_.violate(f"integrity_check: {result[:5]}")
        cursor = db.execute("SELECT * FROM peers")
        names = [d[0] for d in cursor.description]
        lengths, ranges = field_limits()
        outside = collections.Counter()
        for row in cursor:
            for name, value in zip(names, row, strict=True):
                if isinstance(value, str | bytes) and name in lengths and len(value) > lengths[name]:
                    outside[f"peers.{name} longer than {lengths[name]}"] += 1
                if isinstance(value, int | float) and name in ranges:
                    low, high = ranges[name]
                    if not low <= value <= high:
                        outside[f"peers.{name} outside [{low}, {high}]"] += 1
        for what, n in outside.items():
            report_.violate(f"{n} stored values: {what}")
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in db.execute(f"PRAGMA table_info({table})").fetchall():
                if kind.upper() == "INTEGER":
                    try:
                        db.execute(f"SELECT SUM({column}) FROM {table}").fetchone()
                    except (sqlite3.OperationalError, OverflowError) as e:
                        report_.violate(f"SUM({table}.{column}) fails: {e}")
    finally:
        db.close()


def final_sweep(fuzzer: Fuzzer) -> None:
    """After the fuzz: GetStatus and every /api/v1/*, /metrics and / answer, each bounded."""
    try:
        status = fuzzer.channel.unary_unary(
            f"/{SERVICE_NAME}/GetStatus",
            request_serializer=pb.GetStatusRequest.SerializeToString,
            response_deserializer=pb.GetStatusResponse.FromString,
        )(pb.GetStatusRequest(), timeout=GRPC_TIMEOUT_S)
        fuzzer.report.record("final GetStatus", "OK", status.ByteSize(), None, "GetStatus()")
    except grpc.RpcError as e:
        fuzzer.report.record(
            "final GetStatus", e.code().name, 0, f"{e.code().name}: {e.details()}", "GetStatus()"
        )
    for route in fuzzer.routes:
        if "<" in route:
            continue
        wire = f"GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        for _ in range(5):  # the fuzz drained this address's request budget: wait as 429 asks
            outcome, size = http_exchange(fuzzer.target.http_port, wire)
            if outcome != "HTTP 429":
                break
            time.sleep(1.0)
        problem = None if outcome == "HTTP 200" else f"answered {outcome}"
        fuzzer.report.record(f"final GET {route}", outcome, size, problem, route)


def fuzz(
    requests: int, seed: int = 0, directory: Path | None = None, concurrency: int = CONCURRENCY
) -> FuzzReport:
    """Fuzz a fresh live coordinator with `requests` requests; the report holds every problem."""
    report_ = FuzzReport()
    target = CoordinatorProcess(directory)
    try:
        # the fuzzer first: loading its identities (hivemind) would slow the good peer's heartbeats
        fuzzer = Fuzzer(target, report_, concurrency)
        peer = GoodPeerProcess(target.grpc_address)
        t0 = time.monotonic()
        try:
            fuzzer.run(requests, seed)
        except RuntimeError as e:
            report_.violate(str(e))
        finally:
            report_.duration_s = time.monotonic() - t0
            report_.heartbeats_s, report_.heartbeat_failures = peer.stop()
        try:
            if target.alive():
                final_sweep(fuzzer)
        finally:
            fuzzer.close()
        if target.alive():
            for line in target.stop():
                report_.violate(f"logged at ERROR: {line}")
        check_database(target.db_path, report_)
    finally:
        target.close()
    return report_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="how many requests to send")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (a run is reproducible)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="requests in flight at once")
    parser.add_argument("--dir", type=Path, default=None, help="keep the coordinator's files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = fuzz(args.requests, args.seed, args.dir, args.concurrency)
    print(result.summary())
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
