"""`crowdtrain demo`: a coordinator and N volunteers on 127.0.0.1, as separate processes.

    crowdtrain demo --peers 2 --minutes 4

Shows the swarm training (one line per peer per epoch), waits for a published checkpoint, pulls
it, verifies it, generates a sample with `transformers`, and stops every process it started (each
in its own process group, so hivemind's p2pd daemons go too).

The processes run with `--log-format json`: the demo reads their progress events (peer/events.py),
never the human text, and writes that human text to each process's log file.

How it starts, watches and stops them (`Child`, `spawn`, `stop_children`, `wait_for_endpoints`,
`cli_command`, `coordinator_command`, `local_peer_command`) is here because `crowdtrain demo` runs
on it, and the installed package never imports scripts/. The harnesses, benchmarks and tests start
their processes with the same pieces; what only they need is in scripts/harness.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.coordinator.config import DemoConfig
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import parse_record

logger = logging.getLogger(__name__)


class DemoError(CrowdtrainError):
    """A process of the local swarm exited or did not become ready; the message names its log."""


# events the demo echoes (by their human line); warnings, errors and tracebacks are echoed too
_ECHOED = {
    "coordinator_ready",
    "joined",
    "state_loaded",
    "resumed_from_checkpoint",
    "checkpoint_fallback",
    "epoch",
    "checkpoint_published",
    "checkpoint_refused",
}


@dataclass
class Child:
    """A started process. `lines`: its output as people read it (JSON records shown as text), for
    logs and failure messages; `events`: its progress events, parsed, in order (programs read these)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    lines: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    reader: threading.Thread | None = None  # fills lines and events until the output ends


def cli_command(*args: str) -> list[str]:
    """`crowdtrain ARGS` with machine-readable logs (the global flag goes before the subcommand)."""
    return [sys.executable, "-m", "crowdtrain.coordinator.cli", "--log-format", "json", *args]


def coordinator_command(data_dir: Path, *extra: str) -> list[str]:
    """`crowdtrain coordinator` for a local swarm: its run in `data_dir`, free ports (see endpoints.json),
    and reachability checks of peers on this machine (`--allow-loopback-dial`)."""
    return cli_command(
        "coordinator", "--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0",
        "--allow-loopback-dial", *extra,
    )  # fmt: skip


def local_peer_command(grpc_address: str, cache_dir: Path, *extra: str) -> list[str]:
    """`crowdtrain peer` listening on 127.0.0.1 only, with its own data cache and, unless `extra`
    names one, a new identity key of its own under `cache_dir/identities/` (a peer holds its key
    while it runs, so several peers on one machine, or a restart while the last one still exits,
    must never share the config directory's default key)."""
    identity = () if "--identity" in extra else ("--identity", str(_new_identity_path(cache_dir)))
    return cli_command(
        "peer",
        "--coordinator",
        grpc_address,
        "--listen-host",
        "127.0.0.1",
        "--cache-dir",
        str(cache_dir),
        *identity,
        *extra,
    )


def _new_identity_path(cache_dir: Path) -> Path:
    """A key path no other peer started by this process uses (the key is created by the peer)."""
    return Path(cache_dir) / "identities" / f"peer-{os.getpid()}-{os.urandom(6).hex()}.key"


def human_line(record: dict) -> str:
    """A JSON log record as the text format prints it (with its traceback, if any)."""
    when = time.strftime("%H:%M:%S", time.localtime(record.get("ts", 0)))
    text = f"{when} {record.get('level', '')} {record.get('logger', '')}: {record['msg']}"
    return f"{text}\n{record['exc']}" if record.get("exc") else text


def _echoed(record: dict | None, line: str) -> str | None:
    """What the demo shows of one output line, or None."""
    if record is None:  # not a log record: a traceback printed by Python, an `error:` line
        return line if "Traceback" in line or "error" in line.lower() else None
    if record.get("level") in ("ERROR", "CRITICAL"):
        return f"{record['msg']}\n{record['exc']}" if record.get("exc") else record["msg"]
    return record["msg"] if record.get("event") in _ECHOED else None


def spawn(name: str, args: list[str], log_dir: Path, echo: bool) -> Child:
    """Start a crowdtrain process in its own session; log its output as text and collect its events.

    With `echo`, the human line of interesting events (and errors, tracebacks) is printed too."""
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    child = Child(name, proc, log_path)

    def pump():
        with open(log_path, "w") as log:
            for raw in proc.stdout:
                line = raw.rstrip()
                record = parse_record(line)
                text = human_line(record) if record is not None else line
                log.write(text + "\n")
                log.flush()
                child.lines.append(text)
                if record is not None and "event" in record:
                    child.events.append(record)
                if echo and (shown := _echoed(record, line)) is not None:
                    print(f"[{name:>11}] {shown}", flush=True)

    child.reader = threading.Thread(target=pump, name=f"pump-{name}", daemon=True)
    child.reader.start()
    return child


def stop_children(children: list[Child], timeout_s: float = 60.0) -> None:
    """Stop the peers (children[1:]) before the coordinator (children[0]) they say goodbye to.

    Each gets SIGTERM (to its main process only, so it can shut its hivemind children down in
    order), then its whole process group is SIGKILLed: that reaps anything left, p2pd included.
    """
    for batch in (children[1:], children[:1]):  # all peers at once, then the coordinator
        for child in batch:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in batch:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", child.name, timeout_s)
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def wait_for_endpoints(path: Path, child: Child, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if child.proc.poll() is not None:
            raise DemoError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
        time.sleep(0.2)
    raise DemoError(f"{child.name} did not become ready in {timeout_s:.0f}s; see {child.log_path}")


def generate_sample(model_dir: Path, prompt: str = "def ", max_new_tokens: int = 48) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.8)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _start_swarm(config: DemoConfig, workdir: Path, children: list[Child]) -> dict:
    """The coordinator, then the peers (appended to `children` as they start); its endpoints."""
    data_dir = workdir / "coordinator"
    threads = max(1, (os.cpu_count() or 2) // config.peers)
    coordinator_args = (
        "--preset",
        config.preset,
        "--checkpoint-interval-s",
        str(config.checkpoint_interval_s),
    )
    coord = spawn("coordinator", coordinator_command(data_dir, *coordinator_args), workdir, echo=True)
    children.append(coord)
    endpoints = wait_for_endpoints(data_dir / "endpoints.json", coord, timeout_s=600)
    print(
        f"coordinator ready at {endpoints['grpc']} (initial eval loss {endpoints['initial_eval_loss']:.3f})",
        flush=True,
    )
    for i in range(config.peers):
        peer_args = ("--name", f"demo-peer-{i}", "--threads", str(threads), "--device", "cpu")
        command = local_peer_command(endpoints["grpc"], workdir / "cache", *peer_args)
        children.append(spawn(f"peer-{i}", command, workdir, echo=True))
    return endpoints


def _train(config: DemoConfig, children: list[Child], checkpoints_dir: Path) -> None:
    """Let the swarm train for the demo's minutes, then wait for a published checkpoint."""
    from crowdtrain.peer.checkpoints.format import list_checkpoints

    train_until = time.monotonic() + config.minutes * 60
    while time.monotonic() < train_until:
        for child in children:
            if child.proc.poll() is not None:
                raise DemoError(
                    f"{child.name} exited early with {child.proc.returncode}; see {child.log_path}"
                )
        time.sleep(1)
    deadline = time.monotonic() + 3 * config.checkpoint_interval_s + 60
    while not list_checkpoints(checkpoints_dir) and time.monotonic() < deadline:
        time.sleep(1)


def _peer_summary(child: Child) -> str | None:
    epochs = [e for e in child.events if e["event"] == "epoch"]
    if not epochs:
        return None
    rates = sorted(e["samples_per_s"] or 0.0 for e in epochs)
    last_loss = epochs[-1]["loss"]
    shown = f"{last_loss:.3f}" if last_loss is not None else "n/a"
    return (
        f"{child.name:<18} {len(epochs)} epochs, last loss {shown}, "
        f"median {rates[len(rates) // 2]:.1f} samples/s"
    )


def run_demo(config: DemoConfig) -> int:
    from crowdtrain.peer.checkpoints.pull import pull

    t_start = time.monotonic()
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="crowdtrain-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"crowdtrain demo: {config.peers} peers, {config.minutes:g} minutes, logs in {workdir}", flush=True)
    children: list[Child] = []
    try:
        endpoints = _start_swarm(config, workdir, children)
        _train(config, children, workdir / "coordinator" / "checkpoints")
        out = workdir / "pulled"
        meta = pull(endpoints["grpc"], out)
        sample = generate_sample(out)
    finally:
        stop_children(children)

    print("\n=== demo summary ===")
    print(f"wall time          {time.monotonic() - t_start:.0f}s")
    print(
        f"eval loss          {endpoints['initial_eval_loss']:.3f} (initial) -> {meta.eval_loss:.3f} (step {meta.step})"
    )
    for child in children[1:]:
        if (line := _peer_summary(child)) is not None:
            print(line)
    print(f"checkpoint         {out} (verified; load with AutoModelForCausalLM.from_pretrained)")
    print(f"sample             {sample!r}")
    return 0
