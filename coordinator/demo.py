"""`crowdtrain demo`: a coordinator and N volunteers on 127.0.0.1, as separate processes.

    crowdtrain demo --peers 2 --minutes 4

Shows the swarm training (one line per peer per epoch), waits for a published checkpoint, pulls
it, verifies it, generates a sample with `transformers`, and stops every process it started (each
in its own process group, so hivemind's p2pd daemons go too).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.coordinator.config import DemoConfig

logger = logging.getLogger(__name__)
_INTERESTING = re.compile(
    r"epoch=|published|joined run|loaded the swarm|error|Traceback|ready", re.IGNORECASE
)
_EPOCH_LINE = re.compile(r"epoch=(\d+) loss=([\d.]+) samples_per_s=([\d.]+) swarm_peers=(\d+)")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    lines: list[str] = field(default_factory=list)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "crowdtrain.coordinator.cli", *args]


def coordinator_command(data_dir: Path, *extra: str) -> list[str]:
    """`crowdtrain coordinator` for a local swarm: its run in `data_dir`, free ports (see endpoints.json)."""
    return cli_command(
        "coordinator", "--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0", *extra
    )


def local_peer_command(grpc_address: str, cache_dir: Path, *extra: str) -> list[str]:
    """`crowdtrain peer` listening on 127.0.0.1 only, with its own data cache."""
    return cli_command(
        "peer",
        "--coordinator",
        grpc_address,
        "--listen-host",
        "127.0.0.1",
        "--cache-dir",
        str(cache_dir),
        *extra,
    )


def spawn(name: str, args: list[str], log_dir: Path, echo: bool) -> Child:
    """Start a crowdtrain process in its own session; tee its output to a log and, filtered, to us."""
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    child = Child(name, proc, log_path)

    def pump():
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                child.lines.append(line.rstrip())
                if echo and _INTERESTING.search(line):
                    print(f"[{name:>11}] {line.rstrip()}", flush=True)

    threading.Thread(target=pump, name=f"pump-{name}", daemon=True).start()
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


def wait_for_line(child: Child, pattern: str, timeout_s: float, start: int = 0) -> re.Match:
    """Wait until `child` prints a line matching `pattern` (searching from line index `start`)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    seen = start
    while time.monotonic() < deadline:
        exited = child.proc.poll() is not None
        lines = child.lines
        for line in lines[seen:]:
            if m := regex.search(line):
                return m
        seen = len(lines)
        if exited:
            break
        time.sleep(0.2)
    tail = "\n".join(child.lines[-30:])
    raise TimeoutError(
        f"{child.name} printed no line matching {pattern!r} in {timeout_s:.0f}s; last lines:\n{tail}"
    )


def wait_for_endpoints(path: Path, child: Child, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
        time.sleep(0.2)
    raise TimeoutError(f"{child.name} did not become ready in {timeout_s:.0f}s; see {child.log_path}")


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


def run_demo(config: DemoConfig) -> int:
    from crowdtrain.peer.checkpoint import list_checkpoints
    from crowdtrain.peer.pull import pull

    t_start = time.monotonic()
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="crowdtrain-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "coordinator"
    threads = max(1, (os.cpu_count() or 2) // config.peers)
    print(f"crowdtrain demo: {config.peers} peers, {config.minutes:g} minutes, logs in {workdir}", flush=True)
    children: list[Child] = []
    try:
        coord = spawn(
            "coordinator",
            coordinator_command(
                data_dir,
                "--preset",
                config.preset,
                "--checkpoint-interval-s",
                str(config.checkpoint_interval_s),
            ),
            workdir,
            echo=True,
        )
        children.append(coord)
        endpoints = wait_for_endpoints(data_dir / "endpoints.json", coord, timeout_s=600)
        print(
            f"coordinator ready at {endpoints['grpc']} (initial eval loss {endpoints['initial_eval_loss']:.3f})",
            flush=True,
        )
        for i in range(config.peers):
            children.append(
                spawn(
                    f"peer-{i}",
                    local_peer_command(
                        endpoints["grpc"],
                        workdir / "cache",
                        "--name",
                        f"demo-peer-{i}",
                        "--threads",
                        str(threads),
                        "--device",
                        "cpu",
                    ),
                    workdir,
                    echo=True,
                )
            )
        train_until = time.monotonic() + config.minutes * 60
        while time.monotonic() < train_until:
            for child in children:
                if child.proc.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited early with {child.proc.returncode}; see {child.log_path}"
                    )
            time.sleep(1)
        deadline = time.monotonic() + 3 * config.checkpoint_interval_s + 60
        while not list_checkpoints(data_dir / "checkpoints") and time.monotonic() < deadline:
            time.sleep(1)
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
        epochs = [m for line in child.lines if (m := _EPOCH_LINE.search(line))]
        if epochs:
            rates = [float(m.group(3)) for m in epochs]
            print(
                f"{child.name:<18} {len(epochs)} epochs, last loss {epochs[-1].group(2)}, median {sorted(rates)[len(rates) // 2]:.1f} samples/s"
            )
    print(f"checkpoint         {out} (verified; load with AutoModelForCausalLM.from_pretrained)")
    print(f"sample             {sample!r}")
    return 0
