"""Checkpoint publishing latency and pull throughput, measured on a real local swarm.

    .venv/bin/python -m scripts.bench_checkpoints                       # tiny, 2 CPU peers, 3 minutes
    python -m scripts.bench_checkpoints --preset base125m --device cuda --peers 2 --minutes 4   # on a GPU

Publish latency is "epoch reached -> checkpoint downloadable": from the moment the first peer logs
its `epoch` event for epoch S (the peers run with `--log-format json`) to the moment /api/v1/checkpoints lists step S (it includes waiting for the publisher's
next round, --checkpoint-interval-s). Pull throughput compares `crowdtrain pull` (download +
signature + sha256 of every file + atomic rename), over the gRPC stream and over HTTP, with plain
`curl` of the same files, in the same run, and prints the ratios (`scripts.bench_pull`, which
measures the same without training: a run's initial weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from crowdtrain.coordinator.demo import (
    coordinator_command,
    local_peer_command,
    spawn,
    stop_children,
    wait_for_endpoints,
)

from scripts.bench_pull import compare_with_curl, format_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--checkpoint-interval-s", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crowdtrain-bench-ckpt-"))
    children = []
    try:
        coord = spawn(
            "coordinator",
            coordinator_command(
                work / "coord",
                "--preset",
                args.preset,
                "--device",
                args.device,
                "--checkpoint-interval-s",
                str(args.checkpoint_interval_s),
                "--keep-last-checkpoints",
                "1000",
            ),
            work,
            echo=False,
        )
        children.append(coord)
        endpoints = wait_for_endpoints(work / "coord" / "endpoints.json", coord, timeout_s=600)
        for i in range(args.peers):
            children.append(
                spawn(
                    f"peer-{i}",
                    local_peer_command(
                        endpoints["grpc"],
                        work / "cache",
                        "--device",
                        args.device,
                        "--threads",
                        "1" if args.device == "cpu" else "0",
                    ),
                    work,
                    echo=False,
                )
            )
        epoch_seen: dict[int, float] = {}
        ckpt_seen: dict[int, float] = {}
        scanned = [0] * len(children)
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            now = time.monotonic()
            for k, child in enumerate(children[1:], start=1):
                events = child.events
                for event in events[scanned[k] :]:
                    if event["event"] == "epoch":
                        epoch_seen.setdefault(event["epoch"], now)
                scanned[k] = len(events)
            with urllib.request.urlopen(f"{endpoints['http']}/api/v1/checkpoints", timeout=10) as response:
                for meta in json.loads(response.read()):
                    ckpt_seen.setdefault(meta["step"], now)
            time.sleep(0.2)
        latencies = {s: ckpt_seen[s] - epoch_seen[s] for s in ckpt_seen if s in epoch_seen}
        print(f"publish latency (epoch reached -> downloadable), {len(latencies)} checkpoints:")
        for step, lat in sorted(latencies.items()):
            print(f"  step {step:>5}: {lat:6.1f}s")
        if latencies:
            values = sorted(latencies.values())
            print(
                f"  median {statistics.median(values):.1f}s, max {values[-1]:.1f}s "
                f"(interval {args.checkpoint_interval_s:.0f}s)"
            )

        size_mb, rows = compare_with_curl(endpoints, work)
        print()
        print(format_table(size_mb, rows))
    finally:
        stop_children(children)
        if os.environ.get("OUT"):  # the device machine sends $OUT back
            for child in children:
                shutil.copy(child.log_path, Path(os.environ["OUT"], child.log_path.name))
    print(f"(logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
