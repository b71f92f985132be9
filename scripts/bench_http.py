"""Heartbeat latency while anonymous readers hammer the status API, and what the HTTP server holds
for clients that do nothing (the slow-client attack). In process: servicer + gRPC + HTTP, no peers.

    .venv/bin/python -m scripts.bench_http --peers 2000 --readers 4 --seconds 5 [--no-rate-limit]

Prints heartbeat p50/p99 alone and with the readers, how many status builds served them, and how
long 500 idle sockets and one never-read download stay held (with the default limits).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.loopthread import favour_event_loops
from crowdtrain.coordinator.api.servicer import AbuseLimits, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import HttpLimits, WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.admission.identity import throwaway_identity
from crowdtrain.peer.checkpoints.format import CheckpointMeta, list_checkpoints
from crowdtrain.peer.link.client import CoordinatorClient
from crowdtrain.protos import coordinator_pb2 as pb

READER = """
import sys, time, urllib.error, urllib.request
reads, refused, end = 0, 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=60).read()
        reads += 1
    except urllib.error.HTTPError as e:
        assert e.code == 429, e.code
        refused += 1
print(reads, refused)
"""


def heartbeats(address: str, seconds: float) -> tuple[float, float]:
    with CoordinatorClient(address) as client:
        joined = client.join(throwaway_identity().signed_join(pb.JoinRequest(name="bench", device="cpu")))
        request = pb.HeartbeatRequest(session_id=joined.session_id, session_token=joined.session_token)
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.heartbeat(request)
            out.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)
    out.sort()
    return out[len(out) // 2], out[int(len(out) * 0.99)]


def held_for(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < timeout_s:
        time.sleep(0.1)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2000)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-rate-limit", action="store_true", help="no per-address limit: caching alone")
    args = parser.parse_args()
    favour_event_loops()  # as `crowdtrain coordinator` does
    limits = (
        HttpLimits(requests_burst=10**9, requests_per_s_per_address=1e9)
        if args.no_rate_limit
        else HttpLimits()
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    store, health, root = Store(tmp / "s.sqlite3"), HealthSettings(2.0, 10.0, 20.0), tmp / "ckpt"
    staging = archive.new_staging_dir(root, 1)
    (staging / "model.safetensors").write_bytes(b"w" * (64 << 20))
    archive.finalize(staging, root, CheckpointMeta("ct_bench", 1, 768, 4.0, 1.0, "m", None, ()))
    now = time.time()
    for i in range(args.peers):
        store.upsert_peer(
            PeerRecord(
                session_id=f"s{i}", peer_id=f"p{i}", joined_unix_s=now, last_seen_unix_s=now, name=f"v{i}"
            ),
            durable=False,
        )
    builds = [0]

    def status():
        builds[0] += 1
        peers, totals = store.list_peers(), store.contribution_totals()
        return build_status(
            time.time(), "ct_bench", peers, totals, health, SwarmProgress(), list_checkpoints(root)
        )

    ctx = WebContext(tmp, frozenset(), root, "{}", store, status)
    web = WebServer(ctx, "127.0.0.1", 0, limits).start()
    abuse = AbuseLimits(heartbeat_burst=1_000_000, heartbeats_per_interval=1_000_000.0)
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 1, "", root), store, health, initial_peers=list, status=status, abuse=abuse
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{web.port}/api/v1/peers"
    try:
        p50, p99 = heartbeats(address, args.seconds)
        print(f"heartbeat p50/p99 alone: {p50:.1f} / {p99:.1f} ms")
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER, url, str(args.seconds + 1)], stdout=subprocess.PIPE
            )
            for _ in range(args.readers)
        ]
        time.sleep(0.5)
        before = builds[0]
        p50, p99 = heartbeats(address, args.seconds)
        counts = [r.communicate()[0].split() for r in readers]
        reads, refused = sum(int(c[0]) for c in counts), sum(int(c[1]) for c in counts)
        print(
            f"heartbeat p50/p99 with {args.readers} readers: {p50:.1f} / {p99:.1f} ms ({reads} reads of "
            f"{args.peers} peers served by {builds[0] - before} status builds, {refused} refused with 429)"
        )
        socks = [socket.create_connection(("127.0.0.1", web.port)) for _ in range(500)]
        print(f"500 idle sockets held for {held_for(lambda: web.connections == 0, 120):.1f} s")
        for s in socks:
            s.close()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", web.port))
        stalled.sendall(b"GET /checkpoints/1/model.safetensors HTTP/1.1\r\nHost: x\r\n\r\n")
        held_for(lambda: ctx.downloads.in_use() == {1}, 10)
        pinned_s = held_for(lambda: not ctx.downloads.in_use(), 120)
        print(f"a never-read download pinned retention for {pinned_s:.1f} s")
        stalled.close()
    finally:
        server.stop(0)
        web.shutdown()
        store.close()


if __name__ == "__main__":
    main()
