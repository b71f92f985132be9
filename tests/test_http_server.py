"""Slow and idle clients: the HTTP server holds nothing for a client that does nothing, and status
readers cannot starve the peers' heartbeats. Short `HttpLimits` keep each test a few seconds."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.api.grpcserver import GrpcLimits, create_server
from crowdtrain.coordinator.api.httpfiles import Span, byte_span
from crowdtrain.coordinator.api.loopthread import favour_event_loops
from crowdtrain.coordinator.api.servicer import AbuseLimits, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import HttpLimits, WebContext, WebServer
from crowdtrain.coordinator.flood.connections import address_key, admit
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checkpoints.format import CheckpointMeta, list_checkpoints
from crowdtrain.peer.link.client import CoordinatorClient
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.identities import signed_join

BIG_FILE_BYTES = 32 << 20  # far more than loopback socket buffers hold


@pytest.fixture(autouse=True)
def like_the_coordinator_process():
    """`crowdtrain coordinator` hands the GIL over every millisecond (loopthread.favour_event_loops)."""
    old = favour_event_loops()
    yield
    sys.setswitchinterval(old)


class Site:
    def __init__(self, tmp_path: Path, limits: HttpLimits, peers: int = 0):
        self.store = Store(tmp_path / "s.sqlite3")
        self.health = HealthSettings(2.0, 10.0, 20.0)
        self.root = tmp_path / "ckpt"
        staging = archive.new_staging_dir(self.root, 1)
        (staging / "model.safetensors").write_bytes(b"w" * BIG_FILE_BYTES)
        archive.finalize(staging, self.root, CheckpointMeta("ct_test", 1, 768, 4.0, 1.0, "m", None, ()))
        now = time.time()
        for i in range(peers):
            self.store.upsert_peer(
                PeerRecord(
                    session_id=f"s{i:05d}",
                    peer_id=f"p{i:05d}",
                    joined_unix_s=now,
                    last_seen_unix_s=now,
                    name=f"volunteer {i}",
                    phase="training",
                    device="cuda:0 (NVIDIA H100 80GB HBM3)",
                ),
                durable=False,
            )
        self.store.flush()
        self.status_builds = 0
        self.ctx = WebContext(tmp_path, frozenset(), self.root, "{}", self.store, self.status)
        self.web = WebServer(self.ctx, "127.0.0.1", 0, limits).start()
        self.base = f"http://127.0.0.1:{self.web.port}"
        servicer = CoordinatorServicer(
            RunInfo("{}", "x", "{}", 2, self.base, self.root),
            self.store,
            self.health,
            initial_peers=list,
            status=self.status,
            downloads=self.ctx.downloads,
            abuse=AbuseLimits(heartbeat_burst=100_000, heartbeats_per_interval=100_000.0),
        )
        self.grpc, port = create_server(servicer, "127.0.0.1", 0, GrpcLimits(stall_timeout_s=1.0))
        self.grpc.start()
        self.address = f"127.0.0.1:{port}"

    def status(self):
        self.status_builds += 1
        return build_status(
            time.time(),
            "ct_test",
            self.store.list_peers(),
            self.store.contribution_totals(),
            self.health,
            SwarmProgress(),
            list_checkpoints(self.root),
            self.store.rejections(),
        )

    def close(self) -> None:
        self.grpc.stop(0)
        self.web.shutdown()
        self.store.close()


@contextmanager
def site(tmp_path: Path, peers: int = 0, **limits) -> Iterator[Site]:
    s = Site(tmp_path, HttpLimits(**limits), peers)
    try:
        yield s
    finally:
        s.close()


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset); reads and discards anything sent first."""
    sock.setblocking(False)  # not select(): these tests hold more than FD_SETSIZE descriptors
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> float:
    """Seconds until predicate() held; AssertionError after timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s}s")


def heartbeat_latencies_ms(address: str, seconds: float) -> list[float]:
    with CoordinatorClient(address) as client:
        joined = client.join(signed_join(name="good peer", device="cpu"))
        request = pb.HeartbeatRequest(
            session_id=joined.session_id, session_token=joined.session_token, phase="training"
        )
        latencies = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.heartbeat(request)
            latencies.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)
    return sorted(latencies)


def assert_heartbeats_fast(latencies: list[float], baseline: list[float], figures: str) -> None:
    """p50 under 20 ms and p99 under 50 ms, or, on a test machine so busy that heartbeats alone
    have a long tail, under three times that tail (before the fix: p50 101 ms, p99 360 ms)."""
    assert median(latencies) < 20 and p99(latencies) < max(50.0, 3 * p99(baseline)), figures


def median(values: list[float]) -> float:
    return values[len(values) // 2]


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def test_idle_connections_are_closed_within_the_idle_timeout(tmp_path: Path):
    """Before: 500 idle sockets were still held after 90 s (a thread each). Half of them send only
    blank lines, which a server skips before a request line (RFC 9112 2.2): still no request."""
    with site(tmp_path, idle_timeout_s=1.0) as s:
        socks = [socket.create_connection(("127.0.0.1", s.web.port), timeout=10) for _ in range(500)]
        for sock in socks[::2]:
            sock.sendall(b"\n\r\n\r\n")
        try:
            t = wait_for(lambda: all(closed_by_server(sock) for sock in socks), 6, interval_s=0.2)
            assert t < 4.0, f"idle sockets closed only after {t:.1f}s"
            wait_for(lambda: s.web.connections == 0, 3)
        finally:
            for sock in socks:
                sock.close()


def test_slowloris_headers_are_dropped(tmp_path: Path):
    """Headers trickled in forever: before, the connection stayed open as long as bytes came."""
    with site(tmp_path, idle_timeout_s=1.0) as s, socket.create_connection(("127.0.0.1", s.web.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 5 and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
            closed = closed or closed_by_server(sock)
            time.sleep(0.1)
        assert closed and time.monotonic() - start < 3.0


def test_oversized_request_lines_and_headers_and_other_methods_are_refused(tmp_path: Path):
    with site(tmp_path, max_line_bytes=1024, max_headers=10) as s:
        for raw, status in (
            (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", b" 400 "),  # 414 in spirit; aiohttp says 400
            (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", b" 400 "),
            (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n", b" 400 "),
            (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b" 405 "),
            (b"DELETE /checkpoints/1/model.safetensors HTTP/1.1\r\nHost: x\r\n\r\n", b" 405 "),
        ):
            with socket.create_connection(("127.0.0.1", s.web.port), timeout=5) as sock:
                sock.sendall(raw)
                assert status in sock.recv(200).split(b"\r\n")[0], raw[:40]
        head = urllib.request.Request(f"{s.base}/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.headers["Content-Length"] == "3" and response.read() == b""


def test_a_download_never_read_is_dropped_and_releases_retention(tmp_path: Path):
    """Before: a client that stopped reading pinned the checkpoint (and a thread) forever."""
    with site(tmp_path, stall_timeout_s=1.0) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.web.port))
        with sock:
            sock.sendall(b"GET /checkpoints/1/model.safetensors HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_for(lambda: s.ctx.downloads.in_use() == {1}, 5)
            t = wait_for(lambda: s.ctx.downloads.in_use() == set(), 6)
            assert t < 4.0, f"retention released only after {t:.1f}s"
            received = 0
            with pytest.raises(OSError):  # aborted: reset, or EOF long before the whole file
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
                raise ConnectionResetError(f"EOF after {received} bytes")
            assert received < BIG_FILE_BYTES
        with urllib.request.urlopen(f"{s.base}/checkpoints/1/model.safetensors", timeout=30) as r:
            assert len(r.read()) == BIG_FILE_BYTES  # a reader that reads still gets everything


def test_a_grpc_download_never_read_is_cancelled_and_releases_retention(tmp_path: Path):
    with site(tmp_path) as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        call = stub.DownloadCheckpointFile(
            pb.DownloadCheckpointFileRequest(step=1, name="model.safetensors"), timeout=60
        )
        next(call)  # then read nothing more
        wait_for(lambda: s.ctx.downloads.in_use() == {1}, 5)
        t = wait_for(lambda: s.ctx.downloads.in_use() == set(), 10)
        assert t < 5.0, f"retention released only after {t:.1f}s"
        call.cancel()


def test_connections_beyond_the_limit_get_503_and_heartbeats_keep_flowing(tmp_path: Path):
    with site(tmp_path, max_connections=20, idle_timeout_s=30.0) as s:
        held = [socket.create_connection(("127.0.0.1", s.web.port), timeout=5) for _ in range(20)]
        try:
            wait_for(lambda: s.web.connections == 20, 5)
            with socket.create_connection(("127.0.0.1", s.web.port), timeout=5) as extra:
                assert extra.recv(100).startswith(b"HTTP/1.1 503 ")
            baseline = heartbeat_latencies_ms(s.address, 1.0)
            flood = [socket.create_connection(("127.0.0.1", s.web.port), timeout=5) for _ in range(200)]
            latencies = heartbeat_latencies_ms(s.address, 1.0)
            assert_heartbeats_fast(latencies, baseline, f"p99 {p99(baseline):.1f} -> {p99(latencies):.1f} ms")
            for sock in flood:
                sock.close()
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: s.web.connections == 0, 5)
        with urllib.request.urlopen(f"{s.base}/healthz", timeout=5) as response:
            assert response.read() == b"ok\n"


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to the test server from `source` (Linux routes all of 127/8 to loopback)."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def answer(sock: socket.socket, path: str) -> http.client.HTTPResponse:
    """GET `path` on a kept-alive connection; the response, read whole."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def test_connections_are_capped_per_address_ipv6_by_its_64_and_this_machine_by_the_global_cap():
    uncapped = ("127.0.0.1", "::1")
    assert admit(15, "198.51.100.7", 16, uncapped) == (True, "")
    allowed, why = admit(16, "2001:db8::1", 16, uncapped)
    assert not allowed and "2001:db8::/64 holds 16 connections" in why
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert admit(10_000, "::ffff:127.0.0.1", 16, uncapped)[0] and admit(10_000, "::1", 16, uncapped)[0]


def test_one_address_holding_connections_cannot_lock_out_another(tmp_path: Path):
    """Before: the connection cap (512) was global: one address holding 520 connections made
    every other client's request a 503 (dashboard, API, shards, HTTP pulls)."""
    with site(tmp_path, idle_timeout_s=30.0) as s:
        attacker = [connect_from("127.0.0.2", s.web.port) for _ in range(520)]
        try:
            per_address = HttpLimits().max_connections_per_address

            def settled() -> bool:
                for sock in [sock for sock in attacker if closed_by_server(sock)]:
                    attacker.remove(sock)  # answered 503 and closed at once
                    sock.close()
                return len(attacker) <= per_address

            wait_for(settled, 10)
            assert len(attacker) == per_address and s.web.connections == per_address
            for sock in attacker:  # what the attacker holds still works, one request at a time
                assert answer(sock, "/healthz").status == 200
            with connect_from("127.0.0.3", s.web.port) as other:
                assert answer(other, "/api/v1/state").status == 200
            with connect_from("127.0.0.2", s.web.port) as more:
                refusal = more.recv(300)
                assert refusal.startswith(b"HTTP/1.1 503 ") and b"from your address" in refusal
        finally:
            for sock in attacker:
                sock.close()


def test_a_request_refused_with_429_closes_its_connection(tmp_path: Path):
    """Before: a 429 was kept alive like any answer, so refusals alone held a connection open."""
    with site(tmp_path, requests_burst=2, requests_per_s_per_address=0.01, idle_timeout_s=30.0) as s:
        with connect_from("127.0.0.2", s.web.port) as sock:
            assert [answer(sock, "/healthz").status for _ in range(2)] == [200, 200]
            assert not closed_by_server(sock)
            refused = answer(sock, "/healthz")
            assert refused.status == 429 and refused.getheader("Connection") == "close"
            wait_for(lambda: closed_by_server(sock), 3)
        with connect_from("127.0.0.3", s.web.port) as other:  # another address has its own budget
            assert answer(other, "/healthz").status == 200


def test_heartbeats_stay_fast_while_status_readers_hammer_the_api(tmp_path: Path):
    """Before: two readers of /api/v1/peers over a large peer table pushed heartbeat p50 over 1 s
    (4 readers and 2,000 peers: p50 101 ms, p99 360 ms)."""
    with site(tmp_path, peers=2000) as s:
        # readers in other processes, as on the internet: their own parsing takes no GIL from us
        baseline = heartbeat_latencies_ms(s.address, 1.5)  # this machine's own noise
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER, f"{s.base}/api/v1/peers", "4.0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(3)
        ]
        try:
            time.sleep(0.5)
            start, builds = time.monotonic(), s.status_builds
            latencies = heartbeat_latencies_ms(s.address, 3.0)
            elapsed, builds = time.monotonic() - start, s.status_builds - builds
            outputs = [r.communicate(timeout=60) for r in readers]
            assert all(r.returncode == 0 for r in readers), [err.decode()[-2000:] for _, err in outputs]
            counts = [out.split() for out, _ in outputs]
            reads, refused = sum(int(c[0]) for c in counts), sum(int(c[1]) for c in counts)
        finally:
            for r in readers:
                r.kill()
        figures = (
            f"heartbeat p50/p99 {median(baseline):.1f}/{p99(baseline):.1f} ms alone, "
            f"{median(latencies):.1f}/{p99(latencies):.1f} ms with {reads} reads of the peer table "
            f"({refused} more refused with 429)"
        )
        print(figures)
        assert reads >= 8 and refused > reads, "the readers were served, up to their address's share"
        assert builds <= elapsed / 1.0 + 2, f"{builds} status builds in {elapsed:.1f}s: not shared"
        assert_heartbeats_fast(latencies, baseline, figures)


READER = """
import sys, time, urllib.error, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
reads, refused, end = 0, 0, time.monotonic() + seconds
while time.monotonic() < end:  # as fast as it can, ignoring Retry-After
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and len(response.read()) > 100_000
        reads += 1
    except urllib.error.HTTPError as e:
        assert e.code == 429, e.code
        refused += 1
print(reads, refused)
"""


def test_grpc_refuses_oversized_requests(tmp_path: Path):
    """Before: a 1 MiB JoinRequest was accepted (and parsed) as any other."""
    with site(tmp_path) as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Join(signed_join(name="n" * (100 << 10), device="cpu"), timeout=10)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Join(signed_join(name="small", device="cpu"), timeout=10).session_id


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, Span(0, 99, False)),
        ("bytes=10-", Span(10, 99, True)),
        ("bytes=10-19", Span(10, 19, True)),
        ("bytes=90-500", Span(90, 99, True)),
        ("bytes=-5", Span(95, 99, True)),
        ("bytes=-500", Span(0, 99, True)),
        ("bytes=100-", None),
        ("bytes=20-10", None),
        ("bytes=-", None),
        ("bytes=1-2,4-5", None),
        ("bytes=\u00b2-", None),  # a superscript two is a digit to str.isdigit, not to us
        ("bytes=" + "9" * 4300 + "-", None),  # would raise ValueError in int()
        ("items=1-2", None),
    ],
)
def test_byte_span_accepts_one_plain_range(header, span):
    assert byte_span(header, 100)[0] == span


def test_range_edge_cases_over_http(tmp_path: Path):
    with site(tmp_path) as s:
        url = f"{s.base}/checkpoints/1/model.safetensors"
        for header in ("bytes=" + "9" * 4300 + "-", f"bytes={BIG_FILE_BYTES}-"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url, headers={"Range": header}), timeout=10)
            assert e.value.code == 416 and e.value.headers["Content-Range"] == f"bytes */{BIG_FILE_BYTES}"
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"Range": "bytes=-4"}), timeout=10
        ) as r:
            assert r.status == 206 and r.read() == b"wwww"
            assert (
                r.headers["Content-Range"]
                == f"bytes {BIG_FILE_BYTES - 4}-{BIG_FILE_BYTES - 1}/{BIG_FILE_BYTES}"
            )
        for bad in ("/checkpoints/" + "9" * 5000 + "/x", "/checkpoints/\u00b2/x", "/data/..%2Fs.sqlite3"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(s.base + urllib.parse.quote(bad), timeout=10)
            assert e.value.code == 404
