"""Chaos run: a local swarm under random, replayable faults; prints what it survived.

    .venv/bin/python -m scripts.chaos --peers 4 --minutes 10 --seed 7
    .venv/bin/python -m scripts.chaos --peers 3 --minutes 4 --wan    # as root: peers behind netem links
    .venv/bin/python -m scripts.chaos --swarm mode=diloco target_batch_size=1024   # the low-communication mode

See scripts/chaos_harness.py for the faults and how each figure is measured (from the processes'
progress events and the coordinator's HTTP API). The report is printed and
written to WORK/chaos.json (the fault plan to WORK/plan.json, every process's log beside them).
Exits 1 when a target is missed: a lost or unverifiable checkpoint, an orphan process, a dead peer
detected later than 2 heartbeat timeouts, a joiner slower than 60 s, eval loss not lower at the
end, or fewer than 80% of computed samples accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from scripts.chaos_harness import ChaosConfig, missed_targets, run_chaos
from scripts.harness import add_swarm_option
from scripts.wan import WanUnavailable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mean-fault-interval-s", type=float, default=30.0)
    parser.add_argument(
        "--wan", action="store_true", help="peers in network namespaces behind tc netem links"
    )
    add_swarm_option(parser)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = ChaosConfig(
        peers=args.peers,
        duration_s=args.minutes * 60,
        seed=args.seed,
        mean_fault_interval_s=args.mean_fault_interval_s,
        wan=args.wan,
        swarm=tuple(args.swarm),
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="crowdtrain-chaos-"))
    try:
        report = run_chaos(config, work)
    except WanUnavailable as e:
        print(f"WAN simulation skipped: {e}")
        return 0
    print(report.summary())
    missed = missed_targets(report, config)
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
