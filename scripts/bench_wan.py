"""The WAN figure (`python -m scripts.bench --figures wan`): a 2-peer swarm whose peers
each sit in their own network namespace behind a link shaped to RATE Mbit/s each way
(scripts/wan.py; needs root), the synchronous preset against low-communication settings.

Per peer, over the `epochs` epochs after its first (joining and loading excluded):
- utilization: the share of wall time spent computing (forward, backward, local steps), the
  duration-weighted `compute_share` of its epoch events (peer/volunteer/meter.py measures it in-process);
- traffic: the bytes its processes sent (`ss` inside its namespace) per 1,000 samples it computed.

Both are ratios on whatever machine runs them; on 2 CPU cores a 30M model computes so slowly that
an epoch long enough to hide a 20 Mbit/s exchange takes minutes, so the defaults measure 2 epochs.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def compute_share_between(events: list[dict], t0: float, t1: float) -> float | None:
    """Duration-weighted mean `compute_share` of the epochs that ended within [t0, t1]; each epoch
    lasts from the epoch event before it (which may precede t0) to its own. None without one."""
    epochs = [e for e in events if e.get("event") == "epoch"]
    weighted = total = 0.0
    for before, after in zip(epochs, epochs[1:], strict=False):
        if t0 <= after["ts"] <= t1:
            duration = after["ts"] - before["ts"]
            weighted += after["compute_share"] * duration
            total += duration
    return weighted / total if total > 0 else None


def samples_between(events: list[dict], t0: float, t1: float) -> int:
    """Samples a peer computed in the epochs that ended within [t0, t1] (as compute_share_between)."""
    epochs = [e for e in events if e.get("event") == "epoch"]
    before = [e for e in epochs if e["ts"] < t0]
    inside = [e for e in epochs if t0 <= e["ts"] <= t1]
    if not before or not inside:
        return 0
    return inside[-1]["samples_total"] - before[-1]["samples_total"]


def quiet_rate(timeline: list[tuple[float, int]]) -> float:
    """Median bytes/s between a PeerMeter's samples: what a peer sends while no round runs (DHT
    progress records, heartbeats), as long as rounds fill less than half of the window."""
    rates = [
        (b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in zip(timeline, timeline[1:], strict=False) if t1 > t0
    ]
    return statistics.median(rates) if rates else 0.0


def wan_figures(
    preset: str,
    rate_mbit: float,
    variant: tuple[str, ...],
    epochs: int,
    work: Path,
    timeout_s: float = 3600.0,
) -> list:
    """Utilization and traffic rows for one link rate and one set of swarm settings."""
    from crowdtrain.coordinator.demo import coordinator_command, local_peer_command, spawn, stop_children

    from scripts.attacks import prepare_run
    from scripts.bench import PeerMeter, Row
    from scripts.harness import events_named, index_after, wait_for_event
    from scripts.wan import HUB_IP, WanLab, WanLink

    peers = 2
    label = f"{preset}, {' '.join(variant) or 'its own settings'}, {rate_mbit:g} Mbit/s"
    for var in ("no_proxy", "NO_PROXY"):  # the bench and its children talk only to the lab's hosts
        os.environ[var] = ",".join(filter(None, (os.environ.get(var), "127.0.0.1", "localhost", HUB_IP)))
    swarm_flags = ("--swarm", *variant) if variant else ()
    data_dir = prepare_run(work / "coordinator", "--preset", preset, *swarm_flags)
    link = WanLink(rate_mbit=rate_mbit, delay_ms=20.0, jitter_ms=5.0, loss_percent=0.0)
    children = []
    with WanLab(peers, link) as lab:
        try:
            args = ("--checkpoint-interval-s", "0", "--host", HUB_IP)
            coordinator = spawn("coordinator", coordinator_command(data_dir, *args), work, echo=False)
            children.append(coordinator)
            grpc = wait_for_event(coordinator, "coordinator_ready", timeout_s=600)["grpc"]
            peer_children = []
            for slot in range(peers):
                flags = ("--name", f"peer-{slot}", "--threads", "1", "--device", "cpu")
                command = local_peer_command(grpc, work / f"cache-{slot}", *flags)
                command = lab.command_prefix(slot) + command + ["--listen-host", lab.peer_ip(slot)]
                peer_children.append(spawn(f"peer-{slot}", command, work, echo=False))
            children += peer_children
            deadline = time.monotonic() + timeout_s
            for child in peer_children:  # joined, loaded, and through its first round
                wait_for_event(child, "epoch", timeout_s=max(1.0, deadline - time.monotonic()))
            meters = [
                PeerMeter(c.proc.pid, netns=lab.namespace(slot)).start()
                for slot, c in enumerate(peer_children)
            ]
            t0 = time.time()
            starts = [len(child.events) for child in peer_children]
            for child, start in zip(peer_children, starts, strict=True):
                for _ in range(epochs):
                    left_s = max(1.0, deadline - time.monotonic())
                    start = index_after(child, wait_for_event(child, "epoch", timeout_s=left_s, start=start))
            t1 = time.time()
            sent = [m.stop() for m in meters]
            events = [events_named(c, "epoch") for c in peer_children]
        finally:
            stop_children(children)
    shares = [compute_share_between(e, t0, t1) for e in events]
    samples = [samples_between(e, t0, t1) for e in events]
    if any(s is None for s in shares) or not all(samples):
        raise RuntimeError(f"{label}: a peer logged no epoch in the window; logs in {work}")
    share = statistics.mean(shares)
    per_1000 = statistics.mean(b / n * 1000 for b, n in zip(sent, samples, strict=True))
    quiet = statistics.mean(quiet_rate(m.timeline) for m in meters)
    per_round = statistics.mean(max(0.0, b - quiet * (t1 - t0)) / epochs for b in sent)
    note = (
        f"{epochs} epochs per peer in {t1 - t0:.0f} s: {per_round / 1e6:.1f} MB per round, "
        f"{quiet / 1e3:.1f} kB/s between rounds; {lab.describe()}"
    )
    return [
        Row(
            f"WAN utilization ({label}): share of wall time computing",
            f"{share:.2f}",
            ">= 0.90",
            share >= 0.90,
        ),
        Row(
            f"WAN traffic ({label}): sent per peer per 1,000 samples ({note})",
            f"{per_1000 / 1e6:.1f} MB",
            "-",
            None,
        ),
    ]


def wan_rows(runs: list[str], rates_mbit: list[float], epochs: int, tmp: Path) -> list:
    """The WAN figure for every run (PRESET[:KEY=VALUE,...]) and rate; one row saying why when the
    network namespaces cannot be used here."""
    from scripts.bench import Row
    from scripts.wan import probe

    ok, why = probe()
    if not ok:
        return [Row("WAN utilization", f"skipped: {why}", ">= 0.90", None)]
    rows = []
    for rate in rates_mbit:
        for k, run in enumerate(runs):
            preset, _, settings = run.partition(":")
            variant = tuple(a.strip() for a in settings.split(",") if a.strip())
            rows += wan_figures(preset, rate, variant, epochs, tmp / f"wan-{rate:g}-{k}")
            print(*(" | ".join(r.cells()) for r in rows[-2:]), sep="\n", flush=True)
    return rows
