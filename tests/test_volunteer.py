"""A volunteer's real machine and an operator's own data, in a real swarm of `crowdtrain` processes.

The coordinator trains on a local JSONL file (its text in a chosen field, with corrupted records
mixed in). Peer A is an ordinary full peer. Peer B announces an address nobody can dial, as a peer
behind NAT does: the coordinator tells it so, and it trains in client mode. Then B is paused with
`crowdtrain ctl pause` (as SIGUSR1: PAUSED in the coordinator's status and in `ctl status --json`,
no samples while paused) and resumed with `crowdtrain ctl resume` (it loads the swarm's state
before contributing again), and at last stopped and restarted: it
continues in its shard where it stopped. Throughout, no two peers read the same shard.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest
from crowdtrain.coordinator.demo import cli_command
from crowdtrain.peer.data.reader import PlaceFile
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorUnavailable

from scripts.harness import events_named, index_after

pytestmark = pytest.mark.swarm


def write_corpus(path: Path) -> int:
    """A JSONL corpus from stdlib sources, text in field "content", plus corrupted records."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    lines = [json.dumps({"content": f.read_text(encoding="utf-8", errors="replace")}) for f in files]
    lines[5:5] = ["{not json", json.dumps({"text": "the wrong field"}), json.dumps({"content": 42})]
    path.write_text("\n".join(lines) + "\n")
    return 3


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class ShardWatch:
    """Polls the coordinator's status; records any moment two live peers read one shard."""

    def __init__(self, address: str):
        self.client, self.stop = CoordinatorClient(address, rpc_timeout_s=5), threading.Event()
        self.overlaps: list[tuple[str, ...]] = []
        self.samples = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                peers = self.client.get_status().peers
            except CoordinatorUnavailable:
                continue
            live = [p for p in peers if p.state in ("ONLINE", "PAUSED") and p.shard_position > 0]
            shards = [p.shard_index for p in live]
            self.samples += 1
            if len(shards) != len(set(shards)):
                self.overlaps.append(tuple(f"{p.name}:{p.shard_index}" for p in live))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.client.close()


def cap_for(manifest_json: str, micro_batch: float) -> str:
    """--max-memory-gb under which the run's model fits `micro_batch` sequences, as a peer measures
    it (peer/machine/fit.py: 10% of the cap is kept spare)."""
    from crowdtrain.peer.machine.fit import measure_memory
    from crowdtrain.peer.run.manifest import RunManifest
    from crowdtrain.peer.run.model import build_model

    manifest = RunManifest.from_json(manifest_json)
    needs = measure_memory(build_model(manifest), manifest.data.seq_len, "cpu", mode=manifest.swarm.mode)
    fixed = needs.static_bytes + needs.activation_base_bytes
    return repr((fixed + micro_batch * needs.per_sequence_bytes) / 0.9 / 1e9)


def peer_view(client: CoordinatorClient, name: str):
    views = [p for p in client.get_status().peers if p.name == name and p.state not in ("LEFT", "DEAD")]
    return views[0] if views else None


def ctl(pid: int, *args: str) -> str:
    """`crowdtrain ctl ARGS --pid PID`, as a volunteer types it; its output."""
    command = cli_command("ctl", *args, "--pid", str(pid))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_client_mode_pause_resume_restart_and_disjoint_shards_over_jsonl(launcher, tmp_path: Path):
    corrupted = write_corpus(tmp_path / "corpus.jsonl")
    data_dir = tmp_path / "coordinator"
    coordinator = launcher.start_coordinator(
        data_dir,
        "--data",
        str(tmp_path / "corpus.jsonl"),
        "--data-field",
        "content",
        "--heartbeat-interval-s",
        "1",
        "--checkpoint-interval-s",
        "0",
    )
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    import urllib.request

    with urllib.request.urlopen(f"{endpoints['http']}/api/v1/run", timeout=10) as response:
        manifest_json = response.read().decode()
    manifest = json.loads(manifest_json)
    source = manifest["data"]["source"]
    assert f"{corrupted} corrupted records skipped" in source, source
    batch_size = manifest["swarm"]["batch_size_per_step"]
    watch = ShardWatch(endpoints["grpc"])
    status = CoordinatorClient(endpoints["grpc"], rpc_timeout_s=10)
    cache = tmp_path / "cache"
    try:
        # a machine that cannot hold the model is refused before it joins the swarm, with the numbers
        small = launcher.start_peer("peer-small", endpoints["grpc"], cache, "--max-memory-gb", "0.001")
        a = launcher.start_peer("peer-a", endpoints["grpc"], cache, "--max-upload-mbps", "100")
        # B: behind NAT, and with memory for about 4 of the run's 16 sequences per step
        nat = ("--announce-host", "192.0.2.1", "--listen-port", str(free_port()))
        b = launcher.start_peer(
            "peer-b", endpoints["grpc"], cache, *nat, "--max-memory-gb", cap_for(manifest_json, 4.5)
        )
        assert small.proc.wait(timeout=240) == 1
        assert any("the model needs" in line for line in small.lines), "\n".join(small.lines[-10:])
        assert not events_named(small, "reachability")
        plan = launcher.wait_for_event(b, "memory_plan", timeout_s=240)
        assert plan["batch_size"] == batch_size and 2 <= plan["micro_batch"] <= 6, plan

        # --- reachable, or told why and switched to client mode
        assert launcher.wait_for_event(a, "reachability", timeout_s=240)["reachable"] is True
        told = launcher.wait_for_event(b, "reachability", timeout_s=240)
        assert told["reachable"] is False and "--announce-host 127.0.0.1" in told["advice"], told
        for peer in (a, b):
            launcher.wait_for_event(peer, "epoch", timeout_s=300, where=lambda e: e["epoch"] >= 2)
        view = peer_view(status, "peer-b")
        assert view.client_mode and view.reachability == "unreachable"
        assert peer_view(status, "peer-a").reachability == "reachable"

        # --- pause (`crowdtrain ctl pause`, as SIGUSR1): PAUSED with its reason, nothing computed while paused
        assert "computing stops now" in ctl(b.proc.pid, "pause")
        assert "ctl pause" in launcher.wait_for_event(b, "paused", timeout_s=30)["reason"]
        local = json.loads(ctl(b.proc.pid, "status", "--json"))
        assert (local["phase"], local["name"]) == ("paused", "peer-b") and "ctl pause" in local[
            "pause_reason"
        ]
        assert local["live_settings"]["threads"] == 1, local
        paused = wait_until(
            lambda: (v := peer_view(status, "peer-b")) and v.state == "PAUSED" and v, 30, "PAUSED in status"
        )
        assert "ctl pause" in paused.reason
        since = index_after(b, events_named(b, "paused")[-1])
        epoch_a = events_named(a, "epoch")[-1]["epoch"]
        # the swarm goes on: B handed its samples to at most the round ending epoch_a + 1, and the
        # progress records B reads lag A's own epoch by up to one (stored at most every 2 s)
        launcher.wait_for_event(a, "epoch", timeout_s=240, where=lambda e: e["epoch"] >= epoch_a + 3)
        time.sleep(4.0)  # more heartbeats, and A's record stored again
        still = peer_view(status, "peer-b")
        assert still.state == "PAUSED" and still.computed_samples == paused.computed_samples
        assert not events_named(b, "epoch", since) or all(
            e["samples_total"] == paused.computed_samples for e in events_named(b, "epoch", since)
        )

        # --- resume (`crowdtrain ctl resume`, as SIGUSR2): the swarm went on, so B loads its state first
        assert ctl(b.proc.pid, "resume").startswith("resumed")
        resumed = launcher.wait_for_event(b, "resumed", timeout_s=240, start=since)
        assert resumed["resynced"] is True, resumed
        after = launcher.wait_for_event(b, "epoch", timeout_s=240, start=index_after(b, resumed))
        assert after["samples_total"] > paused.computed_samples

        # --- stopped and restarted: it continues in its shard where it stopped
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(timeout=120) == 0, "\n".join(b.lines[-30:])
        assert any("contribution: " in line for line in b.lines)  # leaving: what the swarm accepted
        stopped = PlaceFile(cache, endpoints["grpc"], "peer-b").read()
        assert stopped is not None
        _, place = stopped
        b2 = launcher.start_peer("peer-b", endpoints["grpc"], cache, *nat, label="peer-b-again")
        start = launcher.wait_for_event(b2, "data_start", timeout_s=240)
        assert (start["shard"], start["passes"], start["position"]) == (
            place.shard,
            place.passes,
            place.position,
        )
        launcher.wait_for_event(b2, "epoch", timeout_s=300)
    finally:
        watch.close()
        status.close()
    assert watch.samples >= 20 and not watch.overlaps, watch.overlaps
