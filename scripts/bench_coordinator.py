"""Coordinator capacity: sustained heartbeats/s and latency, from a separate process over loopback.

    .venv/bin/python -m scripts.bench_coordinator                       # 20,000 peers, 2,000 heartbeats/s, 20 s
    .venv/bin/python -m scripts.bench_coordinator --rates 1000 2000 4000 --duration-s 15

Starts a real `crowdtrain coordinator` (tiny preset, no publisher) as its own process, joins
--peers simulated peers, then for each rate sends heartbeats open-loop (on a fixed schedule, so a
slow server cannot slow the load down) round-robin over the peers, and prints achieved throughput
and latency percentiles side by side. Target on 2 cores: 2,000 heartbeats/s with p99 < 50 ms
(20,000 peers at a 10 s interval). Both heartbeat paths are measured side by side: the stream
peers use, and unary calls.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from crowdtrain.coordinator.demo import cli_command, spawn, stop_children, wait_for_endpoints
from crowdtrain.peer.admission.identity import throwaway_identity
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc


async def join_all(stub, peers: int, concurrency: int = 64) -> list[tuple[str, str]]:
    """(session id, session token) of each simulated peer."""
    sessions: list[tuple[str, str]] = [("", "")] * peers
    queue = iter(range(peers))

    async def worker():
        for i in queue:
            response = await stub.Join(
                throwaway_identity().signed_join(
                    pb.JoinRequest(name=f"sim-{i}", version="bench", device="cpu")
                ),
                timeout=30,
            )
            sessions[i] = (response.session_id, response.session_token)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sessions


STREAMS_PER_CONNECTION = 90


class Streams:
    """One HeartbeatStream call per simulated peer, opened lazily, used one message at a time."""

    def __init__(self, stubs: list, n: int):
        self.stubs, self.calls, self.locks = stubs, [None] * n, [asyncio.Lock() for _ in range(n)]

    async def send(self, i: int, request) -> None:
        async with self.locks[i]:
            if self.calls[i] is None:
                self.calls[i] = self.stubs[i % len(self.stubs)].HeartbeatStream()
            try:
                await self.calls[i].write(request)
                await self.calls[i].read()
            except BaseException:
                self.calls[i].cancel()
                self.calls[i] = None  # a peer reconnects after an error
                raise

    async def close(self) -> None:
        for call in self.calls:
            if call is not None:
                call.cancel()


async def join_all_streams(streams: Streams, sessions: list[tuple[str, str]], concurrency: int = 64) -> None:
    queue = iter(range(len(sessions)))

    async def worker():
        for i in queue:
            sid, token = sessions[i]
            await streams.send(i, pb.HeartbeatRequest(session_id=sid, session_token=token, phase="training"))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def drive(
    stub, sessions: list[tuple[str, str]], rate: float, duration_s: float, streams: Streams | None
) -> dict:
    # this process holds 20,000 calls: its own garbage collector would pause it for hundreds of ms
    # and show up as server latency, so collect once and pause the collector while measuring
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return await _drive(stub, sessions, rate, duration_s, streams)
    finally:
        gc.enable()
        gc.unfreeze()


async def _drive(
    stub, sessions: list[tuple[str, str]], rate: float, duration_s: float, streams: Streams | None
) -> dict:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    requests = [
        pb.HeartbeatRequest(
            session_id=s,
            session_token=token,
            phase="training",
            samples_per_s=40.0,
            local_epoch=3,
            loss=5.0,
            swarm_size=8,
        )
        for s, token in sessions
    ]

    async def one(i: int):
        nonlocal errors
        t0 = time.perf_counter()
        k = i % len(requests)
        try:
            if streams is None:
                await stub.Heartbeat(requests[k], timeout=10)
            else:
                await asyncio.wait_for(streams.send(k, requests[k]), 10)
            latencies.append(time.perf_counter() - t0)
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as e:
            errors += 1
            if errors <= 3:
                print(f"heartbeat failed: {e!r}"[:300], flush=True)

    tasks = []
    start = loop.time()
    n = 0
    while True:
        due = start + n / rate
        if due >= start + duration_s:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
        n += 1
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    latencies.sort()

    def pct(q: float) -> float:
        return (
            1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
        )

    return {
        "mode": "unary" if streams is None else "stream",
        "target_per_s": rate,
        "achieved_per_s": round(len(latencies) / elapsed, 1),
        "sent": n,
        "errors": errors,
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(1000 * latencies[-1], 2) if latencies else None,
        "mean_ms": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
    }


async def bench(
    address: str, peers: int, rates: list[float], duration_s: float, modes: list[str]
) -> list[dict]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        t0 = time.perf_counter()
        sessions = await join_all(stub, peers)
        # the coordinator allows 100 streams per connection (GrpcLimits), as each real peer has its
        # own: spread the simulated peers' streams over connections of their own
        connections = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(-(-peers // STREAMS_PER_CONNECTION))
        ]
        stream_stubs = [pb_grpc.CoordinatorStub(c) for c in connections]
        print(f"joined {peers} simulated peers in {time.perf_counter() - t0:.1f}s", flush=True)
        results = []
        for mode in modes:
            streams = Streams(stream_stubs, peers) if mode == "stream" else None
            if streams is not None:  # open every peer's stream first, as a running swarm has them open
                t0 = time.perf_counter()
                await join_all_streams(streams, sessions)
                print(f"opened {peers} heartbeat streams in {time.perf_counter() - t0:.1f}s", flush=True)
            await drive(stub, sessions, min(rates), 3.0, streams)  # warm-up
            for rate in rates:
                result = await drive(stub, sessions, rate, duration_s, streams)
                print(json.dumps(result), flush=True)
                results.append(result)
            if streams is not None:
                await streams.close()
        for connection in connections:
            await connection.close()
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[2000.0])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["stream", "unary"],
        choices=["stream", "unary"],
        help="stream: one HeartbeatStream per peer (what peers use); unary: one Heartbeat call each",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crowdtrain-bench-"))
    coordinator = spawn(
        "coordinator",
        cli_command(
            "--log-level",
            "warning",
            "coordinator",
            "--data-dir",
            str(work / "coord"),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--checkpoint-interval-s",
            "0",
            "--join-burst",  # every simulated peer joins from this one address
            str(10 * args.peers),
            "--max-sessions-per-address",  # and holds its session and heartbeat stream from it
            str(args.peers + 100),
            "--prune-silent-joins-after-s",  # joining 20,000 takes minutes before the first heartbeats
            "3600",
            "--heartbeat-interval-s",
            "10",
        ),
        work,
        echo=False,
    )
    try:
        endpoints = wait_for_endpoints(work / "coord" / "endpoints.json", coordinator, timeout_s=300)
        results = asyncio.run(bench(endpoints["grpc"], args.peers, args.rates, args.duration_s, args.modes))
    finally:
        stop_children([coordinator])
    print(
        f"\n{'mode':>7} {'target/s':>9} {'achieved/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}"
    )
    for r in results:
        print(
            f"{r['mode']:>7} {r['target_per_s']:>9.0f} {r['achieved_per_s']:>11.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['errors']:>7d}"
        )
    by_key = {(r["mode"], r["target_per_s"]): r for r in results}
    for rate in args.rates:
        if ("stream", rate) in by_key and ("unary", rate) in by_key:
            st, un = by_key[("stream", rate)], by_key[("unary", rate)]
            print(f"at {rate:.0f}/s: p99 unary/stream = {un['p99_ms'] / st['p99_ms']:.1f}x")
    print(f"(target: >= 2000/s with p99 < 50 ms; {args.peers} simulated peers; logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
