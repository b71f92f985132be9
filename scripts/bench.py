"""The benchmark suite: the swarm vs plain PyTorch and centralized training, all-reduce vs TCP.

Everything runs side by side on this machine and is printed as one table, each figure
with its goal; the table goes to docs/benchmarks.md.

    python -m scripts.bench                                        # every figure (~45 minutes, 2 cores)
    python -m scripts.bench --figures swarm --presets tiny --profile \
        --variants '' overlap_communication=true,grad_compression=float16   # compare swarm settings
    python -m scripts.bench --figures allreduce --sizes-mb 100 500 --group-sizes 2 4
    python -m scripts.bench --figures wan --rates-mbit 20 --wan-runs wan30m   # as root
    python -m scripts.bench --figures codec --out ''                  # bytes per round, seconds

Figures:
- swarm (one run per preset in `--presets`, default `tiny` and the 30M-parameter `small30m`, and per
  swarm-settings variant in `--variants`, each a `crowdtrain coordinator --swarm` list; each run
  gives four figures): a coordinator (publishing off) and 2 `crowdtrain peer`s with 1 thread each
  train for `--settle-s`, then for `--seconds`; afterwards two plain PyTorch loops (`python -m
  scripts.bench plain`: the same model, micro-batch, optimizer, thread count and data shards, no
  hivemind) run at the same time for as long.
  * utilization: the swarm's aggregate samples/s over the plain loops'. Goal >= 0.90.
  * join: seconds from `crowdtrain peer` start to the end of its first swarm epoch (its first
    samples in an optimizer step).
  * traffic: bytes a peer's process group sent over TCP (`ss`: its p2pd carries averaging, state
    and DHT traffic) per 1,000 samples it computed.
  * memory: a peer's peak PSS (the peer, its forked averagers and its p2pd; shared pages counted
    once) over a plain loop's. Goal <= 2x.
  With `--profile`, py-spy records peer-0's main thread in the window and the shares of its wall
  time (forward, backward, hivemind's step, the optimizer update, waiting for data) are printed.
- quality: held-out loss after `--epochs` swarm epochs (the same samples) of a 2-peer and a 4-peer
  swarm (each peer's saved model, mean) over one centralized process with the same global batch,
  optimizer and learning-rate schedule (gradients of target_batch_size samples accumulated per
  step), per variant. Goal <= 1.02. The training-loss curves go to docs/benchmarks-loss*.png when
  matplotlib is installed.
- allreduce: one all-reduce of `--sizes-mb` among `--group-sizes` in-process averagers on
  127.0.0.1: ours (peer/swarm/averaging.py's guarded averager with the peers' part size and
  `--compression`) vs stock hivemind 1.1.12 defaults vs raw loopback TCP (one connection moving the
  same bytes), with the CPU seconds per round of the averagers (python) and the p2pd daemons. MB/s
  is the tensor's size over the round's time (matchmaking excluded). Goal: ours >= 5x stock.
- pull: `crowdtrain pull` vs `curl` of the same published checkpoint (scripts/bench_pull.py).
- wan (needs root; skipped with the reason elsewhere): scripts/bench_wan.py. For each of
  `--wan-runs` and each of `--rates-mbit`, 2 peers in network namespaces behind links shaped to that
  rate: the share of wall time computing and the bytes sent per 1,000 samples. Goal >= 0.90 at 20.
- codec (seconds): bytes per round per peer for `base125m`'s parameter count with fp32, fp16,
  hivemind's 8-bit and the sparse codec (`topk2bit`, peer/robust/sparsecodec.py), each measured by
  encoding a real part of 2^24 values (protobuf message included) and scaled: in hivemind's butterfly
  all-reduce a peer of N sends (N-1)/N of its vector as parts and as many values back as averages.
  topk2bit's parts travel at 2 bits, its averages re-sparsified at 4; the alternative, a denser
  return (the union of the N supports at 8 bits), is measured too. Goal: topk2bit >= 250x below fp32.
- gpu: only where CUDA is available (`scripts/gpu_smoke.sh` measures MFU there); elsewhere the
  table says why it is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("swarm", "quality", "allreduce", "pull", "gpu", "wan", "codec")


@dataclass
class Row:
    figure: str
    measured: str
    goal: str
    met: bool | None  # None: no goal, or not measured here

    def cells(self) -> list[str]:
        verdict = "-" if self.met is None else ("yes" if self.met else "NO")
        return [self.figure, self.measured, self.goal, verdict]


# --- the plain loop and the centralized baseline --------------------------------------------------


def load_run(data_dir: Path):
    """(manifest, tokenizer, load_blocks(shard index)) of a prepared run's data directory."""
    from crowdtrain.coordinator.peers.store import Store
    from crowdtrain.peer.data.shards import read_shard, tokenize_blocks
    from crowdtrain.peer.run.manifest import RunManifest
    from tokenizers import Tokenizer

    store = Store(data_dir / "state.sqlite3")
    try:
        manifest = RunManifest.from_json(store.get_meta("manifest_json"))
        tokenizer = Tokenizer.from_str(store.get_meta("tokenizer_json"))
    finally:
        store.close()

    def load_blocks(i: int | None) -> list[list[int]]:
        name = manifest.data.eval.name if i is None else manifest.data.shards[i].name
        return tokenize_blocks(tokenizer, read_shard(data_dir / "data" / name), manifest.data.seq_len)

    return manifest, tokenizer, load_blocks


def make_adamw(manifest, model):
    from crowdtrain.peer.swarm.optimizers import adamw

    return adamw(model.parameters(), optim=manifest.optim)


def centralized(data_dir: Path, epochs: int, target_batch_size: int | None = None) -> dict:
    """One process, the swarm's math without the swarm: per epoch, gradients of target_batch_size
    samples (micro-batches of batch_size_per_step, averaged), clipped AdamW, the same warm-up.
    `target_batch_size` replaces the run's (a low-communication run is compared with centralized
    training at the synchronous preset's batch, on as many samples)."""
    import torch
    from crowdtrain.peer.data.reader import Place, ShardReader
    from crowdtrain.peer.run.model import as_batch, build_model, evaluate

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest, _, load_blocks = load_run(data_dir)
    model = build_model(manifest)
    opt = make_adamw(manifest, model)
    warmup = max(1, manifest.optim.warmup_epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / warmup))
    micro, target = manifest.swarm.batch_size_per_step, target_batch_size or manifest.swarm.target_batch_size
    accumulate = max(1, target // micro)
    batches = iter(
        ShardReader(load_blocks, len(manifest.data.shards), Place(0, 0, 0), micro, manifest.run_id)
    )
    curve = []
    model.train()
    for epoch in range(1, epochs + 1):
        losses = []
        for _ in range(accumulate):
            batch = as_batch(next(batches)[0], "cpu")
            loss = model(input_ids=batch, labels=batch).loss
            (loss / accumulate).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        schedule.step()
        curve.append((epoch * accumulate * micro, sum(losses) / len(losses)))
    blocks = load_blocks(None)[: manifest.data.eval_max_sequences]
    return {"eval_loss": evaluate(model, blocks), "curve": curve}


def plain_loop(data_dir: Path, shard: int, seconds: float, warmup_s: float, peers: int) -> dict:
    """Train the run's model alone, as one of `peers` swarm peers would compute: the same micro-batch
    and optimizer, a step every target_batch_size / peers samples. One thread."""
    import torch
    from crowdtrain.peer.data.reader import Place, ShardReader
    from crowdtrain.peer.run.model import as_batch, build_model

    torch.set_num_threads(1)
    manifest, _, load = load_run(data_dir)
    model = build_model(manifest)
    opt = make_adamw(manifest, model)
    swarm = manifest.swarm
    micro = swarm.batch_size_per_step
    step_every = max(1, swarm.target_batch_size // peers // micro)
    batches = iter(ShardReader(load, len(manifest.data.shards), Place(shard, 0, 0), micro, manifest.run_id))
    model.train()
    samples, micro_steps, started = 0, 0, time.monotonic()
    window_start, window_samples = None, 0
    peak_pss_kb, sampled = 0, 0.0
    while True:
        now = time.monotonic()
        if now - sampled >= 1.0:
            peak_pss_kb, sampled = max(peak_pss_kb, pss_kb(os.getpid())), now
        if window_start is None and now - started >= warmup_s:
            window_start, window_samples, window_cpu_s = now, samples, time.process_time()
        if window_start is not None and now - window_start >= seconds:
            break
        batch = as_batch(next(batches)[0], "cpu")
        model(input_ids=batch, labels=batch).loss.backward()
        samples += batch.shape[0]
        micro_steps += 1
        if micro_steps % step_every == 0:
            opt.step()
            opt.zero_grad()
    elapsed = time.monotonic() - window_start
    cpu_s = time.process_time() - window_cpu_s
    return {
        "cpu_cores": cpu_s / elapsed,
        "samples_per_s": (samples - window_samples) / elapsed,
        "peak_pss_mb": max(peak_pss_kb, pss_kb(os.getpid())) / 1024,
        "seconds": elapsed,
    }


# --- process memory -------------------------------------------------------------------------------


# --- traffic ---------------------------------------------------------------------------------------


def tcp_bytes_acked(pids: set[int], netns: str | None = None) -> dict[tuple[str, str, int], int]:
    """bytes_acked of every established TCP socket the processes `pids` own, by (local, remote, pid),
    from `ss -tinp` (a peer's p2pd carries all of its swarm traffic: averaging, state, DHT), run in
    network namespace `netns` when given."""
    import re
    import subprocess

    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = subprocess.run(
        [*prefix, "ss", "-tinpH", "state", "established"], capture_output=True, text=True, timeout=30
    ).stdout
    counts, key = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields, owner = line.split(), re.search(r"pid=(\d+)", line)
            key = None
            if owner and int(owner.group(1)) in pids and len(fields) >= 4:
                key = (fields[2], fields[3], int(owner.group(1)))
        elif key is not None and (acked := re.search(r"bytes_acked:(\d+)", line)):
            counts[key] = int(acked.group(1))
            key = None
    return counts


def pss_kb(pid: int) -> int:
    """Proportional set size of one process: its resident memory with pages shared among N processes
    counted 1/N (hivemind's forked averagers share most of their pages with the peer). 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeerMeter:
    """What one peer's process group (the peer, its forked averagers, its p2pd) does between
    `start()` and `stop()`, sampled every `interval_s`: bytes it sent over TCP, and the peak of its
    summed PSS. Sockets that open and close between two samples are missed; libp2p keeps its
    connections open, so they are few."""

    def __init__(self, pgid: int, interval_s: float = 1.0, netns: str | None = None):
        self.pgid, self.interval_s, self.netns = pgid, interval_s, netns
        self.peak_pss_mb = 0.0
        self._first: dict = {}
        self._last: dict = {}
        self.timeline: list[tuple[float, int]] = []  # (unix time, bytes sent since start) per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeerMeter:
        self._first = self._sample()
        self._last = dict(self._first)
        self._thread.start()
        return self

    def _sample(self) -> dict:
        pids = group_pids(self.pgid)
        self.peak_pss_mb = max(self.peak_pss_mb, sum(pss_kb(pid) for pid in pids) / 1024)
        return tcp_bytes_acked(pids, self.netns)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._last.update(self._sample())
            self.timeline.append((time.time(), self.sent()))

    def sent(self) -> int:
        return sum(v - self._first.get(k, 0) for k, v in self._last.items())

    def stop(self) -> int:
        """Bytes sent since start()."""
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        return self.sent()


def group_pids(pgid: int) -> set[int]:
    """The live processes of a process group (a peer and its p2pd)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


# --- where a peer's time goes ----------------------------------------------------------------------

# (category, a substring of a frame that puts a main-thread sample in it), first match wins
PROFILE_RULES = (
    ("waiting for the next batch", "Prefetcher.__next__"),
    ("loading state from peers", "load_state_from_peers"),
    ("optimizer update (AdamW)", "AdamW.step"),
    ("hivemind step: other (waiting for the group, all-reduce, bookkeeping)", "Optimizer.step (hivemind/"),
    ("backward", "backward (torch"),
    ("forward", "_call_impl"),
)


def profile_shares(raw: str) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """From `py-spy record --idle --threads --format raw` output: the share of the main thread's
    samples (wall time, waiting included) in each PROFILE_RULES category ("other" for the rest), and
    the most frequent last three frames under hivemind's Optimizer.step."""
    counts: dict[str, int] = {}
    under_step: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or not frames[0].endswith(": MainThread") or not n.isdigit():
            continue
        total += int(n)
        category = next((c for c, frame in PROFILE_RULES if any(frame in f for f in frames)), "other")
        counts[category] = counts.get(category, 0) + int(n)
        step = next((i for i, f in enumerate(frames) if "Optimizer.step (hivemind/" in f), None)
        if step is not None:
            tail = " <- ".join(f.split(" (")[0] for f in reversed(frames[step + 1 :][-3:])) or "(itself)"
            under_step[tail] = under_step.get(tail, 0) + int(n)
    if not total:
        return {}, []
    shares = {c: n / total for c, n in sorted(counts.items(), key=lambda kv: -kv[1])}
    top = sorted(under_step.items(), key=lambda kv: -kv[1])[:6]
    return shares, [(frames, n / total) for frames, n in top]


def start_profile(pid: int, seconds: float, out: Path):
    """py-spy recording `pid` (main thread wall time, waits included) for `seconds`; None (and a
    printed reason) when py-spy is not installed (`pip install py-spy`) or may not attach."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("no profile: py-spy is not installed (pip install py-spy)")
        return None
    command = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "--idle", "--threads"]
    command += ["--format", "raw", "--rate", "50", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def print_profile(proc, out: Path, label: str) -> None:
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not out.exists():
        print(f"no profile of {label}: py-spy exited {proc.returncode}: {err.strip()[-300:]}")
        return
    shares, top = profile_shares(out.read_text())
    print(f"where peer-0's main thread spends its time ({label}; py-spy, waits included):")
    for category, share in shares.items():
        print(f"  {share:6.1%}  {category}")
    print("  under hivemind's Optimizer.step, the most frequent innermost frames:")
    for frames, share in top:
        print(f"  {share:6.1%}  {frames}")


# --- the swarm figures ----------------------------------------------------------------------------


def _rate_between(events: list[dict], t0: float, t1: float) -> float | None:
    """A peer's samples/s between its last epoch events at or before t0 and t1 (event `ts`)."""
    before = [e for e in events if e.get("event") == "epoch" and e["ts"] <= t0]
    until = [e for e in events if e.get("event") == "epoch" and e["ts"] <= t1]
    if not before or not until or until[-1]["ts"] <= before[-1]["ts"]:
        return None
    return (until[-1]["samples_total"] - before[-1]["samples_total"]) / (until[-1]["ts"] - before[-1]["ts"])


def swarm_figures(
    preset: str,
    seconds: float,
    settle_s: float,
    work: Path,
    variant: tuple[str, ...] = (),
    peers: int = 2,
    profile: bool = False,
) -> list[Row]:
    """Utilization, joining, traffic and memory of a `peers`-peer swarm of `preset` with the swarm
    settings `variant` (`crowdtrain coordinator --swarm KEY=VALUE`; empty: the preset's own)."""
    from crowdtrain.coordinator.demo import coordinator_command, local_peer_command, spawn, stop_children

    from scripts.attacks import prepare_run
    from scripts.harness import events_named, wait_for_event

    swarm_flags = ("--swarm", *variant) if variant else ()
    data_dir = prepare_run(work / "coordinator", "--preset", preset, *swarm_flags)
    children, peer_children = [], []
    try:
        coordinator = spawn(
            "coordinator", coordinator_command(data_dir, "--checkpoint-interval-s", "0"), work, echo=False
        )
        children.append(coordinator)
        grpc = wait_for_event(coordinator, "coordinator_ready", timeout_s=600)["grpc"]
        started = {}
        for i in range(peers):
            name = f"peer-{i}"
            args = ("--name", name, "--threads", "1", "--device", "cpu")
            started[name] = time.time()
            peer_children.append(
                spawn(name, local_peer_command(grpc, work / f"cache-{i}", *args), work, echo=False)
            )
        children += peer_children
        joins = []
        for child in peer_children:
            first = wait_for_event(child, "epoch", timeout_s=600)
            joins.append(first["ts"] - started[child.name])
        settle_until = min(started.values()) + settle_s
        time.sleep(max(0.0, settle_until - time.time()))
        meters = [PeerMeter(child.proc.pid).start() for child in peer_children]
        cpu_before = [process_tree_cpu_s(child.proc.pid) for child in children]
        spy = start_profile(peer_children[0].proc.pid, seconds, work / "profile.txt") if profile else None
        t0 = time.time()
        time.sleep(seconds)
        t1 = time.time()
        cpu = [
            cpu_between(b, process_tree_cpu_s(c.proc.pid), t1 - t0)
            for b, c in zip(cpu_before, children, strict=True)
        ]
        if spy is not None:
            print_profile(spy, work / "profile.txt", f"{preset} {' '.join(variant)}".strip())
        sent = [meter.stop() for meter in meters]
        rates = [_rate_between(events_named(child, "epoch"), t0, t1) for child in peer_children]
    finally:
        stop_children(children)
    if any(r is None for r in rates):
        raise RuntimeError(f"a peer logged no two epochs within the {seconds:.0f} s window: {rates}")
    plain = run_plain_loops(data_dir, peers, seconds)
    swarm_rate, plain_rate = sum(rates), sum(p["samples_per_s"] for p in plain)
    ratio = swarm_rate / plain_rate
    peer_mb, plain_mb = max(m.peak_pss_mb for m in meters), max(p["peak_pss_mb"] for p in plain)
    per_1000 = [b / (r * (t1 - t0)) for b, r in zip(sent, rates, strict=True)]  # bytes per sample
    label = f"{preset}" + (f", {' '.join(variant)}" if variant else "")
    peer_cpu = {role: statistics.mean(c[role] for c in cpu[1:]) for role in cpu[1]}
    cpu_text = (
        f"per peer: training process {peer_cpu['main']:.2f}, its DHT and averager processes "
        f"{peer_cpu['python']:.2f}, p2pd {peer_cpu['p2pd']:.2f}; coordinator {sum(cpu[0].values()):.2f}; "
        f"plain loop {statistics.mean(p['cpu_cores'] for p in plain):.2f}"
    )
    return [
        Row(
            f"utilization ({label}; 2 peers x 1 thread)",
            f"{ratio:.2f} ({swarm_rate:.1f} vs {plain_rate:.1f} samples/s)",
            ">= 0.90",
            ratio >= 0.90,
        ),
        Row(
            f"joining ({label}): start -> first epoch",
            f"{statistics.median(joins):.1f} s median, {max(joins):.1f} s max",
            "-",
            None,
        ),
        Row(
            f"traffic ({label}): sent per peer per 1,000 samples",
            f"{statistics.mean(per_1000) * 1000 / 1e6:.1f} MB (all TCP of the peer's p2pd)",
            "-",
            None,
        ),
        Row(f"CPU cores used ({label})", cpu_text, "-", None),
        Row(
            f"memory ({label}): peer peak PSS / plain loop",
            f"{peer_mb / plain_mb:.2f}x ({peer_mb:.0f} vs {plain_mb:.0f} MB)",
            "<= 2x",
            peer_mb / plain_mb <= 2.0,
        ),
    ]


def run_plain_loops(data_dir: Path, peers: int, seconds: float, warmup_s: float = 15.0) -> list[dict]:
    """`peers` plain loops at the same time, each on the shard a peer would start from."""
    import subprocess

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "scripts.bench", "plain", "--data-dir", str(data_dir), "--shard", str(i)]
            + ["--peers", str(peers), "--seconds", str(seconds), "--warmup-s", str(warmup_s)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(peers)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + warmup_s + 600)
        if proc.returncode != 0:
            raise RuntimeError(f"a plain loop failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- statistical efficiency -----------------------------------------------------------------------


def swarm_to_epochs(prepared: Path, peers: int, epochs: int, work: Path) -> dict:
    """A fresh swarm of `peers` (1 thread each) on a copy of the prepared run, to `epochs` epochs;
    the mean held-out loss of the peers' saved models and peer 0's training-loss curve."""
    import shutil

    from crowdtrain.coordinator.demo import coordinator_command, local_peer_command, spawn, stop_children
    from crowdtrain.peer.run.model import evaluate
    from transformers import AutoModelForCausalLM

    from scripts.harness import events_named, wait_for_event

    work.mkdir(parents=True)
    data_dir = work / "coordinator"
    shutil.copytree(prepared, data_dir, ignore=shutil.ignore_patterns("endpoints.json"))
    manifest, _, load_blocks = load_run(data_dir)
    children = []
    try:
        coordinator = spawn(
            "coordinator", coordinator_command(data_dir, "--checkpoint-interval-s", "0"), work, echo=False
        )
        children.append(coordinator)
        grpc = wait_for_event(coordinator, "coordinator_ready", timeout_s=600)["grpc"]
        honest = []
        for i in range(peers):
            args = ("--name", f"peer-{i}", "--threads", "1", "--device", "cpu", "--max-epochs", str(epochs))
            args += ("--save-dir", str(work / f"saved-{i}"))
            honest.append(
                spawn(f"peer-{i}", local_peer_command(grpc, work / f"cache-{i}", *args), work, echo=False)
            )
        children += honest
        deadline = time.monotonic() + 60 * epochs * max(1, manifest.swarm.target_batch_size // 256)
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in honest):
            time.sleep(1)
        if any(c.proc.poll() != 0 for c in honest):
            raise RuntimeError(f"a peer of the {peers}-peer swarm did not finish: see {work}")
        curve = [
            (e["epoch"] * manifest.swarm.target_batch_size, e["loss"])
            for e in events_named(honest[0], "epoch")
        ]
    finally:
        stop_children(children)
    blocks = load_blocks(None)[: manifest.data.eval_max_sequences]
    losses = [
        evaluate(AutoModelForCausalLM.from_pretrained(work / f"saved-{i}"), blocks) for i in range(peers)
    ]
    return {"eval_loss": sum(losses) / len(losses), "curve": curve}


def quality_figures(
    epochs: int, work: Path, plot_path: Path | None, variant: tuple[str, ...] = ()
) -> list[Row]:
    from crowdtrain.peer.run.manifest import get_preset

    from scripts.attacks import prepare_run

    prepared = prepare_run(work / "prepared" / "coordinator", *(("--swarm", *variant) if variant else ()))
    # the same samples as the swarm's `epochs`, at the synchronous preset's batch and schedule
    preset_batch = get_preset("tiny").swarm.target_batch_size
    manifest = load_run(prepared)[0]
    samples = epochs * manifest.swarm.target_batch_size
    central = centralized(prepared, samples // preset_batch, target_batch_size=preset_batch)
    runs = {n: swarm_to_epochs(prepared, n, epochs, work / f"swarm-{n}") for n in (2, 4)}
    label = f"quality (tiny{', ' + ' '.join(variant) if variant else ''}; {epochs} epochs)"
    goal = 1.05 if manifest.swarm.mode == "diloco" else 1.02  # the goal for the low-communication mode
    rows = []
    for n, run in runs.items():
        baselines = {f"centralized, batch {preset_batch}": central}
        if manifest.swarm.mode == "diloco":  # as many optimizer steps as a peer takes: the stronger baseline
            batch = n * manifest.swarm.batch_size_per_step
            baselines[f"centralized, batch {batch}"] = centralized(
                prepared, samples // batch, target_batch_size=batch
            )
        for name, base in baselines.items():
            ratio = run["eval_loss"] / base["eval_loss"]
            rows.append(
                Row(
                    f"{label}: {n}-peer swarm / {name} held-out loss",
                    f"{ratio:.3f} ({run['eval_loss']:.3f} vs {base['eval_loss']:.3f})",
                    f"<= {goal}",
                    ratio <= goal,
                )
            )
    if plot_path is not None:
        curves = {"centralized": central["curve"]} | {f"{n}-peer swarm": r["curve"] for n, r in runs.items()}
        settings = f" ({', '.join(variant)})" if variant else ""
        plot_curves(curves, plot_path, f"tiny{settings}: training loss vs samples, {epochs} epochs")
    return rows


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot ({path.name}): matplotlib is not installed (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], label=label)
    ax.set_xlabel("samples")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


# --- all-reduce throughput ------------------------------------------------------------------------


def tcp_loopback_mb_s(size_mb: float) -> float:
    """Raw TCP: one loopback connection moving size_mb from one thread to another."""
    payload = memoryview(bytearray(int(size_mb * 1e6)))
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray(1 << 20)

    def receive():
        conn, _ = server.accept()
        with conn:
            left = len(payload)
            while left > 0:
                n = conn.recv_into(received)
                if n == 0:
                    break
                left -= n

    reader = threading.Thread(target=receive)
    reader.start()
    started = time.perf_counter()
    with socket.create_connection(server.getsockname()) as conn:
        conn.sendall(payload)
    reader.join()
    elapsed = time.perf_counter() - started
    server.close()
    return size_mb / elapsed


def process_tree_cpu_s(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `root_pid` and its descendants: "p2pd" (the
    daemons), "main" (`root_pid` itself) and "python" (every other descendant: hivemind's DHT and
    averager processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(entry.name)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (_, ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    out = {"main": 0.0, "python": 0.0, "p2pd": 0.0}
    for pid in tree & set(stats):
        comm, _, cpu = stats[pid]
        out["main" if pid == root_pid else "p2pd" if comm == "p2pd" else "python"] += cpu
    return out


def cpu_between(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used (CPU seconds per second) per role between two process_tree_cpu_s readings."""
    return {role: (after[role] - before.get(role, 0.0)) / seconds for role in after}


def allreduce_figures(
    sizes_mb: list[float], group_sizes: list[int], rounds: int, compression: str
) -> list[Row]:
    """Stock hivemind defaults against ours: the guarded averager with the part size the peers use
    and `compression` (a manifest's grad_compression)."""
    import hivemind
    from crowdtrain.peer.robust.evidence import EvidenceSink
    from crowdtrain.peer.swarm.averaging import GRAD_PART_SIZE_BYTES, GuardedAverager, grad_compression
    from hivemind.averaging import DecentralizedAverager

    from scripts.bench_robust import LOCAL, group, one_round

    ours = {"evidence": EvidenceSink(), "part_size_bytes": GRAD_PART_SIZE_BYTES}
    ours["compression"] = grad_compression(compression)
    rows = []
    for n in group_sizes:
        root = hivemind.DHT(start=True, **LOCAL)
        dhts = [root] + [
            hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True, **LOCAL) for _ in range(n - 1)
        ]
        try:
            for size_mb in sizes_mb:
                values = int(size_mb * 1e6 / 4)
                speeds, cpu = {}, {}
                for name, cls, extra in (
                    ("stock", DecentralizedAverager, {}),
                    ("ours", GuardedAverager, ours),
                ):
                    with group(cls, dhts, values, f"bench_{name}_{n}_{size_mb:g}", **extra) as averagers:
                        before = process_tree_cpu_s(os.getpid())
                        times = [one_round(averagers, timeout_s=600) for _ in range(rounds)]
                        after = process_tree_cpu_s(os.getpid())
                    speeds[name] = size_mb / statistics.median(times)
                    used = {k: (after[k] - before[k]) / rounds for k in after}
                    cpu[name] = {"python": used["main"] + used["python"], "p2pd": used["p2pd"]}
                tcp = tcp_loopback_mb_s(size_mb)
                ratio = speeds["ours"] / speeds["stock"]
                rows.append(
                    Row(
                        f"all-reduce {size_mb:g} MB, {n} peers (MB/s; ours = guarded, {compression})",
                        f"ours {speeds['ours']:.0f}, stock {speeds['stock']:.0f}, raw TCP {tcp:.0f}: "
                        f"ours/stock {ratio:.2f}x; CPU s per round python/p2pd: ours "
                        f"{cpu['ours']['python']:.1f}/{cpu['ours']['p2pd']:.1f}, stock "
                        f"{cpu['stock']['python']:.1f}/{cpu['stock']['p2pd']:.1f}",
                        "ours >= 5x stock",
                        ratio >= 5.0,
                    )
                )
                print(" | ".join(rows[-1].cells()), flush=True)
        finally:
            for dht in dhts:
                dht.shutdown()
    return rows


def codec_bytes_per_value(codec, values) -> tuple[float, float]:
    """(bytes per value of `codec`'s protobuf message for `values`, seconds to encode it)."""
    from hivemind.compression import CompressionInfo

    started = time.perf_counter()
    message = codec.compress(values, CompressionInfo.from_tensor(values))
    return len(message.SerializeToString()) / values.numel(), time.perf_counter() - started


def codec_figures(preset: str = "base125m", group_sizes: tuple[int, ...] = (2, 4)) -> list[Row]:
    """Bytes per round per peer for `preset`'s parameter count, each codec measured on a real part."""
    import torch
    from crowdtrain.peer.robust.sparsecodec import MAX_PART_VALUES, TopKCodec
    from crowdtrain.peer.run.manifest import get_preset
    from crowdtrain.peer.swarm.averaging import grad_compression

    parameters = get_preset(preset).num_parameters()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(MAX_PART_VALUES, generator=g) * 1e-3  # a pseudo-gradient's scale
    ours = grad_compression("topk2bit")
    per_value = {
        name: codec_bytes_per_value(grad_compression(name), sample) for name in ("none", "float16", "uint8")
    }
    up, up_s = codec_bytes_per_value(ours, ours.sparsify(sample))
    back = codec_bytes_per_value(ours.for_returns(), ours.for_returns().sparsify(sample))[0]
    per_value["topk2bit"] = ((up + back) / 2, up_s)  # parts at 2 bits, averages at 4
    fp32 = per_value["none"][0]
    rows = []
    for n in group_sizes:
        share = (n - 1) / n * parameters  # values a peer sends as parts, and as many as averages
        union = torch.stack(
            [ours.sparsify(torch.randn(MAX_PART_VALUES, generator=g)) for _ in range(n)]
        ).mean(0)
        denser = TopKCodec(fraction=min(1.0, n * ours.fraction), chunk=ours.chunk, bits=8)
        dense_return = codec_bytes_per_value(denser, union)[0]
        options = [(name, 2 * b, s) for name, (b, s) in per_value.items()]
        options.append(("topk2bit parts, union of supports returned at 8 bits", up + dense_return, 0.0))
        for name, both, seconds in options:
            ratio = 2 * fp32 / both
            sparse = name == "topk2bit"
            rows.append(
                Row(
                    f"bytes per round per peer, {preset} ({parameters / 1e6:.1f}M), {n} peers, {name}",
                    f"{share * both / 1e6:.1f} MB sent and as many received ({both * 4:.3f} bits per value each way), "
                    f"{ratio:.0f}x below fp32"
                    + (f"; encode {seconds:.2f} s per 2^24 values" if seconds else ""),
                    ">= 250x below fp32" if sparse else "-",
                    ratio >= 250 if sparse else None,
                )
            )
    return rows


def pull_rows(size_mb: float, work: Path, rounds: int) -> list[Row]:
    from scripts.bench_pull import pull_figures

    work.mkdir(parents=True)
    return [
        Row(
            f"pull ({transport}) / curl, {size_mb:g} MB checkpoint",
            f"{ratio:.2f}x ({pull_mb_s:.0f} vs {curl_mb_s:.0f} MB/s; download + signature + sha256 + rename)",
            ">= 0.9x",
            ratio >= 0.9,
        )
        for transport, pull_mb_s, curl_mb_s, ratio in pull_figures(size_mb, work, rounds)
    ]


def gpu_figures() -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        return [Row("GPU MFU (base125m)", "skipped: no CUDA device on this machine", ">= 40%", None)]
    return [
        Row(
            "GPU MFU (base125m)",
            "run `bash scripts/gpu_smoke.sh` on this machine: it reports tokens/s and MFU",
            ">= 40%",
            None,
        )
    ]


# --- the table ------------------------------------------------------------------------------------


def markdown(rows: list[Row], command: str, images: list[Path]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"`{command}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Regenerate with the same command.",
        "",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    for image in images:
        lines += ["", f"![{image.stem}]({image.name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plain"]:
        parser = argparse.ArgumentParser(prog="scripts.bench plain")
        parser.add_argument("--data-dir", type=Path, required=True)
        parser.add_argument("--shard", type=int, default=0)
        parser.add_argument("--peers", type=int, default=2)
        parser.add_argument("--seconds", type=float, default=120.0)
        parser.add_argument("--warmup-s", type=float, default=15.0)
        a = parser.parse_args(argv[1:])
        print(json.dumps(plain_loop(a.data_dir, a.shard, a.seconds, a.warmup_s, a.peers)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--presets", nargs="+", default=["tiny", "small30m"], help="of the swarm figures")
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window of the swarm figures")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help="swarm settings to compare, one comma-separated KEY=VALUE list each ('' = the preset's), "
        "e.g. '' overlap_communication=true,grad_compression=float16",
    )
    parser.add_argument(
        "--profile", action="store_true", help="record peer-0 with py-spy in each swarm window, print shares"
    )
    parser.add_argument("--settle-s", type=float, default=60.0, help="swarm start-up left out of the window")
    parser.add_argument("--epochs", type=int, default=20, help="swarm epochs of the quality figure")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100.0, 500.0])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--compression", default="float16", help="gradient compression of ours in the all-reduce figure"
    )
    parser.add_argument("--pull-mb", type=float, default=500.0, help="checkpoint size of the pull figure")
    parser.add_argument("--pull-rounds", type=int, default=3, help="pull figure: best of this many")
    parser.add_argument("--rounds", type=int, default=2, help="all-reduce rounds per size (median)")
    parser.add_argument(
        "--rates-mbit", type=float, nargs="+", default=[20.0, 100.0], help="of the wan figure"
    )
    parser.add_argument("--wan-epochs", type=int, default=2, help="wan figure: epochs measured per peer")
    parser.add_argument(
        "--wan-runs",
        nargs="+",
        default=["small30m:averaging_timeout_s=300", "wan30m"],
        help="wan figure: PRESET[:KEY=VALUE,...] each (swarm settings; the synchronous preset's round "
        "timeout is raised so that its 120 MB fp32 exchange can finish at 20 Mbit/s)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to write nothing")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as tmp:
        if "swarm" in args.figures:
            for preset in args.presets:
                for k, variant in enumerate(args.variants):
                    settings = tuple(a for a in variant.split(",") if a.strip())
                    work = Path(tmp) / f"swarm-{preset}-{k}"
                    rows += swarm_figures(
                        preset, args.seconds, args.settle_s, work, settings, profile=args.profile
                    )
                    print(*(" | ".join(r.cells()) for r in rows[-5:]), sep="\n", flush=True)
        if "quality" in args.figures:
            for k, variant in enumerate(args.variants):
                settings = tuple(a for a in variant.split(",") if a.strip())
                name = "benchmarks-loss.png" if k == 0 else f"benchmarks-loss-{k}.png"
                plot = Path(args.out).with_name(name) if args.out else None
                rows += quality_figures(args.epochs, Path(tmp) / f"quality-{k}", plot, settings)
        if "allreduce" in args.figures:
            rows += allreduce_figures(args.sizes_mb, args.group_sizes, args.rounds, args.compression)
        if "pull" in args.figures:
            rows += pull_rows(args.pull_mb, Path(tmp) / "pull", args.pull_rounds)
        if "gpu" in args.figures:
            rows += gpu_figures()
        if "codec" in args.figures:
            rows += codec_figures()
        if "wan" in args.figures:
            from scripts.bench_wan import wan_rows

            rows += wan_rows(args.wan_runs, args.rates_mbit, args.wan_epochs, Path(tmp))
    width = [max(len(r.cells()[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row.cells(), width, strict=True)))
    if args.out:
        command = "python -m scripts.bench " + " ".join(argv)
        images = sorted(Path(args.out).parent.glob("benchmarks-loss*.png"))
        Path(args.out).write_text(markdown(rows, command.strip(), images))
        print(f"written to {args.out}")
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
