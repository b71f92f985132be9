"""Coordinator capacity: sustained heartbeats/s and latency, from a separate process over loopback.

    .venv/bin/python scripts/bench_coordinator.py                       # 20,000 peers, 2,000 heartbeats/s, 20 s
    .venv/bin/python scripts/bench_coordinator.py --rates 1000 2000 4000 --duration-s 15

Starts a real `crowdtrain coordinator` (tiny preset, no publisher) as its own process, joins
--peers simulated peers, then for each rate sends heartbeats open-loop (on a fixed schedule, so a
slow server cannot slow the load down) round-robin over the peers, and prints achieved throughput
and latency percentiles side by side. Target on 2 cores: 2,000 heartbeats/s with p99 < 50 ms
(20,000 peers at a 10 s interval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from coordinator.demo import cli_command, spawn, stop_children, wait_for_endpoints  # noqa: E402
from protos import coordinator_pb2 as pb  # noqa: E402
from protos import coordinator_pb2_grpc as pb_grpc  # noqa: E402


async def join_all(stub, peers: int, concurrency: int = 64) -> list[str]:
    sessions: list[str] = [""] * peers
    queue = iter(range(peers))

    async def worker():
        for i in queue:
            response = await stub.Join(
                pb.JoinRequest(name=f"sim-{i}", version="bench", device="cpu"), timeout=30
            )
            sessions[i] = response.session_id

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sessions


async def drive(stub, sessions: list[str], rate: float, duration_s: float) -> dict:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    requests = [
        pb.HeartbeatRequest(
            session_id=s, phase="training", samples_per_s=40.0, local_epoch=3, loss=5.0, swarm_size=8
        )
        for s in sessions
    ]

    async def one(i: int):
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await stub.Heartbeat(requests[i % len(requests)], timeout=10)
            latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError:
            errors += 1

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
        "target_per_s": rate,
        "achieved_per_s": round(len(latencies) / elapsed, 1),
        "sent": n,
        "errors": errors,
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(1000 * latencies[-1], 2) if latencies else None,
        "mean_ms": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
    }


async def bench(address: str, peers: int, rates: list[float], duration_s: float) -> list[dict]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        t0 = time.perf_counter()
        sessions = await join_all(stub, peers)
        print(f"joined {peers} simulated peers in {time.perf_counter() - t0:.1f}s", flush=True)
        await drive(stub, sessions, min(rates), 3.0)  # warm-up
        results = []
        for rate in rates:
            result = await drive(stub, sessions, rate, duration_s)
            print(json.dumps(result), flush=True)
            results.append(result)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[2000.0])
    parser.add_argument("--duration-s", type=float, default=20.0)
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
            "--heartbeat-interval-s",
            "10",
        ),
        work,
        echo=False,
    )
    try:
        endpoints = wait_for_endpoints(work / "coord" / "endpoints.json", coordinator, timeout_s=300)
        results = asyncio.run(bench(endpoints["grpc"], args.peers, args.rates, args.duration_s))
    finally:
        stop_children([coordinator])
    print(f"\n{'target/s':>10} {'achieved/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}")
    for r in results:
        print(
            f"{r['target_per_s']:>10.0f} {r['achieved_per_s']:>11.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f} {r['errors']:>7d}"
        )
    print(f"(target: >= 2000/s with p99 < 50 ms; {args.peers} simulated peers; logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
