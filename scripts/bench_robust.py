"""Honest-case cost of robust aggregation: one all-reduce among in-process averagers, stock vs guarded.

    .venv/bin/python -m scripts.bench_robust                      # 4 averagers, 10M floats, 5 rounds each
    .venv/bin/python -m scripts.bench_robust --values 1000000 --rounds 3   # a quick look
    .venv/bin/python -m scripts.bench_robust --spread             # the honest spreads behind peer/robust/reduce.py
    .venv/bin/python -m scripts.bench_robust --reducer            # CPU per part: robust vs stock sum

Every averager holds `--values` float32 values (honest: signal + noise); each round all of them
call `step()` together and the round's time is the slowest member's. Stock is hivemind 1.1.12's
DecentralizedAverager, guarded is peer/swarm/averaging.py's GuardedAverager (robust reducer, returned
averages checked, gate that admits everyone). Rounds alternate stock/guarded so that load on the
machine hits both alike; the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import hivemind
import torch
from crowdtrain.peer.robust.evidence import EvidenceSink
from crowdtrain.peer.swarm.averaging import GuardedAverager
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

LOCAL = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])


@contextlib.contextmanager
def group(cls, dhts, values: int, prefix: str, **extra):
    averagers = []
    try:
        for i, dht in enumerate(dhts):
            g = torch.Generator().manual_seed(i)
            tensors = [torch.randn(values, generator=g)]
            averagers.append(
                cls(
                    tensors,
                    dht=dht,
                    prefix=prefix,
                    target_group_size=len(dhts),
                    min_group_size=len(dhts),
                    min_matchmaking_time=1.0,
                    request_timeout=1.0,
                    start=True,
                    **extra,
                )
            )
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()


def one_round(averagers, timeout_s: float = 120.0) -> float:
    """Seconds from trigger to the last member's result (matchmaking excluded)."""
    controls = [a.step(wait=False, require_trigger=True, timeout=timeout_s) for a in averagers]
    deadline = time.monotonic() + timeout_s
    while any(c.stage != AveragingStage.AWAITING_TRIGGER for c in controls):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no group formed: {[c.stage.name for c in controls]}")
        time.sleep(0.01)
    started = time.perf_counter()
    for control in controls:
        control.allow_allreduce()
    for control in controls:
        control.result(timeout=timeout_s)
    return time.perf_counter() - started


def reducer_cost(senders: int, values: int = 2**17, repeats: int = 30) -> int:
    """CPU time to reduce one hivemind part (131,072 float32 from each sender), one thread."""
    from crowdtrain.peer.robust.reduce import robust_reduce

    torch.set_num_threads(1)
    parts, weights = [torch.randn(values) for _ in range(senders)], [1.0] * senders

    def stock():  # what TensorPartReducer does: accumulate weighted parts, divide
        acc = torch.zeros(values)
        for part, weight in zip(parts, weights, strict=True):
            acc.add_(part, alpha=weight)
        return acc.div_(sum(weights))

    timings = {}
    for name, reduce in (("stock", stock), ("robust", lambda: robust_reduce(parts, weights))):
        reduce()
        started = time.perf_counter()
        for _ in range(repeats):
            reduce()
        timings[name] = (time.perf_counter() - started) / repeats
    per_value = {name: seconds / (values * senders) * 1e9 for name, seconds in timings.items()}
    print(
        f"one part of {values:,} values from {senders} senders: stock {timings['stock'] * 1e3:.2f} ms, "
        f"robust {timings['robust'] * 1e3:.2f} ms ({per_value['robust']:.1f} ns per value received)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--values", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spread", action="store_true", help="print the honest spreads instead")
    parser.add_argument("--reducer", action="store_true", help="time one part's reduction instead")
    args = parser.parse_args()
    if args.reducer:
        return reducer_cost(args.peers)
    if args.spread:
        from scripts.robust_spread import run_spread

        run_spread()
        return 0
    root = hivemind.DHT(start=True, **LOCAL)
    dhts = [root] + [
        hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True, **LOCAL)
        for _ in range(args.peers - 1)
    ]
    times: dict[str, list[float]] = {"stock": [], "guarded": []}
    try:
        with (
            group(DecentralizedAverager, dhts, args.values, "bench_stock") as stock,
            group(GuardedAverager, dhts, args.values, "bench_guarded", evidence=EvidenceSink()) as guarded,
        ):
            for round_index in range(args.rounds):
                for name, averagers in (("stock", stock), ("guarded", guarded)):
                    seconds = one_round(averagers)
                    times[name].append(seconds)
                    print(f"round {round_index} {name}: {seconds:.3f}s", flush=True)
    finally:
        for dht in dhts:
            dht.shutdown()
    stock_s, guarded_s = statistics.median(times["stock"]), statistics.median(times["guarded"])
    print(
        f"{args.peers} averagers x {args.values:,} float32: all-reduce median stock {stock_s:.3f}s, "
        f"guarded {guarded_s:.3f}s, ratio {guarded_s / stock_s:.3f} (+{(guarded_s / stock_s - 1) * 100:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
