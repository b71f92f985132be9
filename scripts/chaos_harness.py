"""Chaos harness: a local swarm of real processes under random, replayable faults.

    python -m scripts.chaos --peers 4 --minutes 10 --seed 7      # the long run behind docs/figures.md
    python -m scripts.chaos --peers 3 --minutes 3 --wan          # peers behind simulated WAN links

Starts a coordinator and N volunteers (each `crowdtrain` processes in its own process group), then
follows a fault plan drawn from `--seed` (`plan_faults`, pure: the same seed replays the same
faults): `kill` (kill -9 a peer, restart it later as a newcomer), `stop` (SIGSTOP the peer's
whole process group - a closed laptop lid - then SIGCONT), `leave` (SIGTERM, restart later) and
`coordinator` (kill -9 the coordinator's process group, restart it later on the same data dir).
At the end every process gets SIGTERM and the report says what the swarm survived (`Report`).

What is measured, and how:
- dead-peer detection: kill (or stop longer than the heartbeat timeout) -> the coordinator's
  /api/v1/peers shows the process's name DEAD (polled every 0.5 s); when the coordinator itself
  was down meanwhile, counted from when it was back;
- joiner contribution: process start -> its first `epoch` event (it took part in an epoch);
- stop/continue: SIGCONT -> the stopped process's next `epoch` event;
- stall: kill or SIGSTOP of a peer -> the next `epoch` event of any other peer;
- samples: computed = what each process reports (its epoch events' samples_total and its
  heartbeats, the larger); accepted >=
  epochs completed x the run's target batch (each epoch averages at least that many);
- coordinator outages: samples/s of the peers untouched by other faults while it is down, vs
  their own average over the run; outages with a peer fault within 30 s plus twice their length
  before them are left out (a frozen or killed peer stalls the others' averaging round too);
- checkpoints: every one listed during the run must still be listed and verify at the end;
- orphans: after the last SIGTERM, any process left in any process group the harness created.

Every process runs with `--log-format json`; the harness reads their progress events
(crowdtrain.peer.events) and the coordinator's HTTP API, never their human log text.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crowdtrain.coordinator.demo import Child, coordinator_command, local_peer_command, spawn

from scripts.harness import processes_in_groups
from scripts.wan import HUB_IP, WanLab

logger = logging.getLogger(__name__)

FAULT_WEIGHTS = {"kill": 0.35, "stop": 0.3, "leave": 0.15, "coordinator": 0.2}
WAN_FAULT_WEIGHTS = {"kill": 0.3, "stop": 0.2, "leave": 0.1, "coordinator": 0.15, "partition": 0.25}


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the swarm started training
    kind: str  # "kill" | "stop" | "leave" | "coordinator" | "partition" (WAN only)
    slot: int  # which peer slot (-1: the coordinator)
    duration_s: float  # how long the peer stays down or stopped, or the coordinator stays down


@dataclass(frozen=True)
class ChaosConfig:
    peers: int = 4
    duration_s: float = 600.0
    seed: int = 1
    mean_fault_interval_s: float = 30.0
    warmup_s: float = 30.0  # no faults while the swarm forms
    cooldown_s: float = 60.0  # no faults at the end: the swarm settles and publishes
    peer_down_s: tuple[float, float] = (5.0, 30.0)
    stop_s: tuple[float, float] = (5.0, 45.0)
    coordinator_down_s: tuple[float, float] = (5.0, 30.0)
    min_running_peers: int = 1  # never fault the last running peer
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 6.0
    checkpoint_interval_s: float = 10.0
    min_voter_age_s: float = 120.0  # --min-voter-age-s: a peer's state counts for publishing after this
    faults: tuple[Fault, ...] | None = None  # an explicit plan instead of one drawn from the seed
    wan: bool = False  # peers in their own network namespaces behind netem links (see wan.py)
    swarm: tuple[str, ...] = ()  # the coordinator's --swarm KEY=VALUE settings (e.g. mode=diloco)


def plan_faults(config: ChaosConfig) -> list[Fault]:
    """The fault plan: exponential gaps, kinds by FAULT_WEIGHTS, uniform durations. Pure."""
    if config.faults is not None:
        return sorted(config.faults, key=lambda f: f.at_s)
    rng = random.Random(config.seed)
    ranges = {
        "kill": config.peer_down_s,
        "leave": config.peer_down_s,
        "stop": config.stop_s,
        "partition": config.stop_s,
        "coordinator": config.coordinator_down_s,
    }
    weights = WAN_FAULT_WEIGHTS if config.wan else FAULT_WEIGHTS
    faults, t = [], config.warmup_s
    while True:
        t += rng.expovariate(1.0 / config.mean_fault_interval_s)
        if t > config.duration_s - config.cooldown_s:
            return faults
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        slot = -1 if kind == "coordinator" else rng.randrange(config.peers)
        faults.append(Fault(round(t, 1), kind, slot, round(rng.uniform(*ranges[kind]), 1)))


@dataclass
class Incarnation:
    """One process of a peer slot (a restart is a new incarnation with a new name)."""

    name: str
    child: Child
    started: float
    scanned: int = 0  # how many of child.events were read
    first_epoch_at: float | None = None
    ended: float | None = None  # when the harness killed or stopped it for good
    samples_logged: int = 0
    samples_reported: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, samples_total)


@dataclass
class Report:
    seed: int
    peers: int
    duration_s: float
    swarm: tuple[str, ...] = ()
    faults_planned: int = 0
    faults_injected: dict = field(default_factory=dict)
    faults_skipped: int = 0
    end_epoch: int = 0
    initial_eval_loss: float = float("nan")
    final_eval_loss: float = float("nan")
    samples_computed: int = 0
    samples_accepted_lower_bound: int = 0
    accepted_fraction: float = 0.0
    checkpoints_published: int = 0
    checkpoints_verified: int = 0
    checkpoints_lost: list = field(default_factory=list)
    checkpoint_errors: list = field(default_factory=list)
    detect_dead_s: list = field(default_factory=list)
    undetected: list = field(default_factory=list)
    joiner_first_epoch_s: list = field(default_factory=list)
    joiners_never_contributed: list = field(default_factory=list)
    resumed_after_stop_s: list = field(default_factory=list)
    stall_after_fault_s: list = field(default_factory=list)
    outage_throughput_ratio: list = field(default_factory=list)
    exit_codes: dict = field(default_factory=dict)
    orphans: list = field(default_factory=list)
    network: str = "127.0.0.1"
    resumed_after_partition_s: list = field(default_factory=list)
    publisher_notes: list = field(default_factory=list)  # each coordinator's last publisher decisions
    published_per_coordinator: list = field(default_factory=list)  # checkpoints each incarnation published
    rejoins: list = field(default_factory=list)  # peers re-pinging the restarted coordinator's DHT node
    work_dir: str = ""

    def summary(self) -> str:
        def stats(values: list[float]) -> str:
            if not values:
                return "none"
            return f"n={len(values)} median {statistics.median(values):.1f}s max {max(values):.1f}s"

        injected = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items())) or "none"
        ratios = ", ".join(f"{r:.2f}" for r in self.outage_throughput_ratio) or "none"
        return "\n".join(
            [
                f"chaos run: seed {self.seed}, {self.peers} peers, {self.duration_s:.0f}s, "
                f"swarm settings: {' '.join(self.swarm) or 'the preset'}",
                f"  faults injected          {injected} (planned {self.faults_planned}, skipped {self.faults_skipped})",
                f"  epochs                   0 -> {self.end_epoch}",
                f"  eval loss                {self.initial_eval_loss:.3f} -> {self.final_eval_loss:.3f}",
                f"  samples                  computed {self.samples_computed}, accepted >= "
                f"{self.samples_accepted_lower_bound} ({self.accepted_fraction:.0%})",
                f"  checkpoints              {self.checkpoints_published} published, {self.checkpoints_verified} "
                f"verify, lost {self.checkpoints_lost or 'none'}, errors {self.checkpoint_errors or 'none'}",
                f"  dead peer detected in    {stats(self.detect_dead_s)}; undetected {self.undetected or 'none'}",
                f"  joiner first epoch after {stats(self.joiner_first_epoch_s)}; never {self.joiners_never_contributed or 'none'}",
                f"  network                  {self.network}",
                f"  stopped peer back after  {stats(self.resumed_after_stop_s)}",
                f"  partitioned peer back    {stats(self.resumed_after_partition_s)}",
                f"  survivors' next epoch    {stats(self.stall_after_fault_s)} after a kill or stop",
                f"  coordinator outage       steady peers' samples/s during / usual: {ratios}",
                f"  orphan processes         {len(self.orphans)} {self.orphans or ''}",
                f"  DHT re-joins             {', '.join(self.rejoins) or 'none'}",
                *(f"  publisher                {note}" for note in self.publisher_notes),
                f"  logs                     {self.work_dir}",
            ]
        )


PUBLISHER_EVENTS = frozenset(
    {"checkpoint_published", "checkpoint_refused", "state_disagreement", "publish_waiting", "publish_failed"}
)


def publisher_notes(coordinators: list[Child], last: int = 3) -> list[str]:
    """Each coordinator incarnation's last few publisher decisions, so that a run that published
    too little says why (no donors, disagreement, a refusal, an error)."""
    notes = []
    for child in coordinators:
        decisions = [e for e in child.events if e["event"] in PUBLISHER_EVENTS]
        published = sum(e["event"] == "checkpoint_published" for e in decisions)
        tail = (
            "; ".join(f"{e['event']}: {e.get('msg', '')[:160]}" for e in decisions[-last:]) or "no decision"
        )
        notes.append(f"{child.name}: {published} published; last: {tail}")
    return notes


def _get_json(url: str, timeout_s: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def samples_at(timeline: list[tuple[float, int]], t: float) -> float:
    """Samples processed by time `t`, interpolated between logged points."""
    if not timeline or t <= timeline[0][0]:
        return float(timeline[0][1]) if timeline and t >= timeline[0][0] else 0.0
    for (t0, s0), (t1, s1) in zip(timeline, timeline[1:], strict=False):
        if t0 <= t <= t1:
            return s0 + (s1 - s0) * (t - t0) / max(t1 - t0, 1e-9)
    return float(timeline[-1][1])


class Chaos:
    """Runs one chaos experiment; `run()` returns its Report. Always reaps what it started."""

    def __init__(self, config: ChaosConfig, work_dir: Path, peer_args: tuple[str, ...] = ()):
        self.config, self.work = config, work_dir
        self.peer_args = peer_args
        self.data_dir = work_dir / "coordinator"
        self.report = Report(
            seed=config.seed, peers=config.peers, duration_s=config.duration_s, swarm=config.swarm
        )
        self.report.work_dir = str(work_dir)
        self.coordinator: Child | None = None
        self.coordinators: list[Child] = []  # every incarnation, for the publisher's decisions
        self.coordinator_restarts = 0
        self.endpoints: dict = {}
        self.slots: dict[int, Incarnation | None] = {}
        self.down_until: dict[int, float] = {}  # slot -> when to restart it
        self.stopped_until: dict[int, float] = {}  # slot -> when to SIGCONT it
        self.coordinator_down_until: float | None = None
        self.coordinator_ready = False
        self.coordinator_up_since = 0.0
        self.pgids: set[int] = set()
        self.all_incarnations: list[Incarnation] = []
        self.pending_dead: dict[str, float] = {}  # name -> when it was killed/stopped
        self.awaiting_epoch_after_cont: dict[str, tuple[float, int]] = {}
        self.awaiting_survivor_epoch: list[tuple[float, str]] = []  # (kill or stop time, victim)
        self.outages: list[tuple[float, float]] = []
        self.fault_log: list[tuple[float, str]] = []  # (when, kind) of every injected fault
        self.steps_seen: set[int] = set()
        self.public_key, self.target_batch = "", 0
        self.joiner_limit_s = 60.0
        self.t0 = 0.0
        self.lab = None  # WanLab when config.wan
        self.partitioned_until: dict[int, float] = {}
        self.awaiting_epoch_after_heal: dict[str, tuple[float, int]] = {}
        self.stopped_at: dict[int, float] = {}  # slot -> when it was stopped or partitioned
        self.faulted: dict[str, list[tuple[float, float]]] = {}  # name -> intervals it was stopped/cut off
        self.swarm_epoch = 0  # the highest epoch of any peer's epoch events so far

    # ------------------------------------------------------------------ processes

    def _start_coordinator(self) -> None:
        (self.data_dir / "endpoints.json").unlink(missing_ok=True)
        c = self.config
        name = f"coordinator-{self.coordinator_restarts}" if self.coordinator_restarts else "coordinator"
        args = coordinator_command(
            self.data_dir,
            "--checkpoint-interval-s",
            str(c.checkpoint_interval_s),
            "--keep-last-checkpoints",
            "100000",
            "--heartbeat-interval-s",
            str(c.heartbeat_interval_s),
            "--heartbeat-timeout-s",
            str(c.heartbeat_timeout_s),
            "--min-voter-age-s",
            str(c.min_voter_age_s),
            *(("--host", HUB_IP) if self.lab else ()),
            *(("--swarm", *c.swarm) if c.swarm else ()),
        )
        self.coordinator = spawn(name, args, self.work, echo=False)
        self.coordinators.append(self.coordinator)
        self.pgids.add(self.coordinator.proc.pid)

    def _wait_coordinator_ready(self, timeout_s: float = 300.0) -> dict:
        path = self.data_dir / "endpoints.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if self.coordinator.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited; see {self.coordinator.log_path}")
            time.sleep(0.2)
        raise TimeoutError(
            f"the coordinator was not ready in {timeout_s:.0f}s; see {self.coordinator.log_path}"
        )

    def _start_peer(self, slot: int) -> None:
        previous = sum(1 for inc in self.all_incarnations if inc.name.startswith(f"p{slot}."))
        name = f"p{slot}.{previous}"
        args = local_peer_command(
            self.endpoints["grpc"],
            self.work / f"cache-{slot}",
            "--name",
            name,
            "--threads",
            "1",
            "--device",
            "cpu",
            "--join-timeout-s",
            "600",
            *self.peer_args,
        )
        if self.lab is not None:  # inside the slot's namespace, listening on its address
            args = self.lab.command_prefix(slot) + args + ["--listen-host", self.lab.peer_ip(slot)]
        child = spawn(name, args, self.work, echo=False)
        self.pgids.add(child.proc.pid)
        inc = Incarnation(name=name, child=child, started=time.monotonic())
        self.faulted[name] = []
        self.slots[slot] = inc
        self.all_incarnations.append(inc)

    def _running_slots(self) -> list[int]:
        return [
            s
            for s, inc in self.slots.items()
            if inc is not None
            and inc.child.proc.poll() is None
            and s not in self.stopped_until
            and s not in self.partitioned_until
        ]

    # ------------------------------------------------------------------ faults

    def _inject(self, fault: Fault, now: float) -> bool:
        injected = self.report.faults_injected
        if fault.kind == "coordinator":
            if self.coordinator_down_until is not None:
                return False
            os.killpg(self.coordinator.proc.pid, signal.SIGKILL)
            self.coordinator.proc.wait()
            self.coordinator_down_until = now + fault.duration_s
            self.coordinator_ready = False
            self.outages.append((now, now + fault.duration_s))
        else:
            inc = self.slots.get(fault.slot)
            running = self._running_slots()
            if inc is None or fault.slot not in running or len(running) <= self.config.min_running_peers:
                return False
            if fault.kind == "kill":
                inc.child.proc.kill()  # the main process only: what it leaves behind counts as orphans
                inc.ended = now
                self.pending_dead[inc.name] = now
                self.awaiting_survivor_epoch.append((now, inc.name))
                self.down_until[fault.slot] = now + fault.duration_s
                self.slots[fault.slot] = None
            elif fault.kind == "leave":
                inc.child.proc.send_signal(signal.SIGTERM)
                inc.ended = now
                self.down_until[fault.slot] = now + fault.duration_s
                self.slots[fault.slot] = None
            elif fault.kind == "partition":
                self.lab.partition(fault.slot)
                self.stopped_at[fault.slot] = now
                self.partitioned_until[fault.slot] = now + fault.duration_s
                if fault.duration_s > self.config.heartbeat_timeout_s:
                    self.pending_dead[inc.name] = now
            elif fault.kind == "stop":
                os.killpg(inc.child.proc.pid, signal.SIGSTOP)
                self.stopped_at[fault.slot] = now
                self.awaiting_survivor_epoch.append((now, inc.name))
                self.stopped_until[fault.slot] = now + fault.duration_s
                if fault.duration_s > self.config.heartbeat_timeout_s:
                    self.pending_dead[inc.name] = now
        injected[fault.kind] = injected.get(fault.kind, 0) + 1
        self.fault_log.append((now, fault.kind))
        logger.info("t=%.0fs fault: %s", now - self.t0, fault)
        return True

    def _timers(self, now: float) -> None:
        for slot, until in list(self.down_until.items()):
            if now >= until and self.coordinator_ready:
                del self.down_until[slot]
                self._start_peer(slot)
        for slot, until in list(self.stopped_until.items()):
            if now >= until:
                del self.stopped_until[slot]
                inc = self.slots[slot]
                os.killpg(inc.child.proc.pid, signal.SIGCONT)
                self.awaiting_epoch_after_cont[inc.name] = (now, self.swarm_epoch)
                self.faulted[inc.name].append((self.stopped_at.pop(slot), now))
        for slot, until in list(self.partitioned_until.items()):
            if now >= until:
                del self.partitioned_until[slot]
                self.lab.heal(slot)
                if self.slots.get(slot) is not None:
                    name = self.slots[slot].name
                    self.awaiting_epoch_after_heal[name] = (now, self.swarm_epoch)
                    self.faulted[name].append((self.stopped_at.pop(slot), now))
        if self.coordinator_down_until is not None and now >= self.coordinator_down_until:
            self.coordinator_down_until = None
            self.coordinator_restarts += 1
            self.coordinator_ready = False
            self._start_coordinator()
        if not self.coordinator_ready and (self.data_dir / "endpoints.json").exists():
            self.coordinator_ready = True
            self.coordinator_up_since = now

    # ------------------------------------------------------------------ observation

    def _scan_events(self, now: float) -> None:
        for inc in self.all_incarnations:
            events = inc.child.events
            for event in events[inc.scanned :]:
                if event["event"] != "epoch":
                    continue
                samples = int(event["samples_total"])
                inc.samples_logged = max(inc.samples_logged, samples)
                inc.timeline.append((now, samples))
                if inc.first_epoch_at is None:
                    inc.first_epoch_at = now
                epoch = int(event["epoch"])
                self.swarm_epoch = max(self.swarm_epoch, epoch)
                # back = trains again at (at least) the epoch the swarm had when it was released
                for waiting, figures in (
                    (self.awaiting_epoch_after_heal, self.report.resumed_after_partition_s),
                    (self.awaiting_epoch_after_cont, self.report.resumed_after_stop_s),
                ):
                    if inc.name in waiting and epoch >= waiting[inc.name][1]:
                        figures.append(round(now - waiting.pop(inc.name)[0], 1))
                for faulted_at, victim in list(self.awaiting_survivor_epoch):
                    if victim != inc.name:
                        self.report.stall_after_fault_s.append(round(now - faulted_at, 1))
                        self.awaiting_survivor_epoch.remove((faulted_at, victim))
            inc.scanned = len(events)

    def _poll_coordinator(self, now: float) -> None:
        if not self.coordinator_ready:
            return
        base = self.endpoints["http"]
        try:
            peers = _get_json(f"{base}/api/v1/peers")
            listed = _get_json(f"{base}/api/v1/checkpoints")
        except (urllib.error.URLError, OSError, ValueError):
            return
        by_name = {}
        for p in peers:  # a name can appear twice (a rejoin); DEAD wins for detection
            by_name.setdefault(p["name"], []).append(p)
        for name, killed_at in list(self.pending_dead.items()):
            if any(p["state"] == "DEAD" for p in by_name.get(name, [])):
                # a coordinator that was down cannot notice anything: count from when it was back
                self.report.detect_dead_s.append(round(now - max(killed_at, self.coordinator_up_since), 1))
                del self.pending_dead[name]
        for inc in self.all_incarnations:
            for p in by_name.get(inc.name, []):
                inc.samples_reported = max(inc.samples_reported, int(p.get("computed_samples", 0)))
        self.steps_seen.update(m["step"] for m in listed)

    # ------------------------------------------------------------------ the run

    def run(self) -> Report:
        self.work.mkdir(parents=True, exist_ok=True)
        for var in ("no_proxy", "NO_PROXY"):  # the harness and its children talk only to local hosts
            os.environ[var] = ",".join(filter(None, (os.environ.get(var), "127.0.0.1", "localhost", HUB_IP)))
        plan = plan_faults(self.config)
        self.report.faults_planned = len(plan)
        (self.work / "plan.json").write_text(json.dumps([asdict(f) for f in plan], indent=1))
        try:
            if self.config.wan:
                self.lab = WanLab(self.config.peers).setup()  # raises WanUnavailable with the reason
                self.report.network = self.lab.describe()
            self._start_coordinator()
            self.endpoints = self._wait_coordinator_ready()
            self.coordinator_ready = True
            self.report.initial_eval_loss = self.endpoints["initial_eval_loss"]
            run = _get_json(f"{self.endpoints['http']}/api/v1/run")
            self.public_key, self.target_batch = run["signing_public_key"], run["swarm"]["target_batch_size"]
            for slot in range(self.config.peers):
                self._start_peer(slot)
            self.t0 = time.monotonic()
            end = self.t0 + self.config.duration_s
            pending = list(plan)
            last_poll = 0.0
            while time.monotonic() < end:
                now = time.monotonic()
                while pending and now - self.t0 >= pending[0].at_s:
                    if not self._inject(pending.pop(0), now):
                        self.report.faults_skipped += 1
                self._timers(now)
                self._scan_events(now)
                if now - last_poll >= 0.5:
                    last_poll = now
                    self._poll_coordinator(now)
                time.sleep(0.2)
            self._finish()
        finally:
            self._reap()
        return self.report

    def _finish(self) -> None:
        r, now = self.report, time.monotonic()
        for slot in list(self.partitioned_until):
            self.lab.heal(slot)
        for slot in list(self.stopped_until):
            os.killpg(self.slots[slot].child.proc.pid, signal.SIGCONT)
        if self.coordinator_down_until is not None:
            self.coordinator_down_until = now
            self._timers(now)
        if not self.coordinator_ready:
            self._wait_coordinator_ready()
            self.coordinator_ready = True
        self._poll_coordinator(now)
        state = _get_json(f"{self.endpoints['http']}/api/v1/state")
        r.end_epoch = int(state["global_epoch"])
        self._scan_events(time.monotonic())
        # stop every peer the way a user does (SIGTERM to the main process), then the coordinator
        alive = [inc for inc in self.all_incarnations if inc.child.proc.poll() is None]
        for inc in alive:
            inc.child.proc.send_signal(signal.SIGTERM)
            inc.ended = time.monotonic()
        self._poll_coordinator(time.monotonic())  # heartbeats' last samples counts
        for inc in alive:
            try:
                inc.child.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        self._scan_events(time.monotonic())
        for inc in alive:  # exit codes of the final, clean stop (killed ones are -9 by design)
            r.exit_codes[inc.name] = inc.child.proc.poll()
        self.coordinator.proc.send_signal(signal.SIGTERM)
        try:
            self.coordinator.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        r.exit_codes[self.coordinator.name] = self.coordinator.proc.poll()
        time.sleep(2.0)  # let exiting children finish
        r.orphans = [f"{pid} {cmd}" for pid, cmd in processes_in_groups(self.pgids)]

        from crowdtrain.peer.checkpoints import format as checkpoint

        root = self.data_dir / "checkpoints"
        metas = checkpoint.list_checkpoints(root)
        r.checkpoints_published = len(metas)
        r.publisher_notes = publisher_notes(self.coordinators)
        r.published_per_coordinator = [
            sum(e["event"] == "checkpoint_published" for e in c.events) for c in self.coordinators
        ]
        r.rejoins = [
            f"{inc.name} reached {e['reached']}/{e['bootstrap_peers']}"
            for inc in self.all_incarnations
            for e in inc.child.events
            if e["event"] == "swarm_rejoined"
        ]
        r.checkpoints_lost = sorted(self.steps_seen - {m.step for m in metas})
        for meta in metas:
            try:
                checkpoint.verify_dir(root / checkpoint.step_dirname(meta.step), public_key=self.public_key)
                r.checkpoints_verified += 1
            except checkpoint.CheckpointError as e:
                r.checkpoint_errors.append(f"step {meta.step}: {e}")
        if metas:
            r.final_eval_loss = metas[-1].eval_loss
        r.samples_computed = sum(max(i.samples_logged, i.samples_reported) for i in self.all_incarnations)
        r.samples_accepted_lower_bound = r.end_epoch * self.target_batch  # every run starts at epoch 0
        r.accepted_fraction = r.samples_accepted_lower_bound / max(r.samples_computed, 1)
        r.undetected = sorted(self.pending_dead)
        for inc in self.all_incarnations:
            if inc.first_epoch_at is not None:
                r.joiner_first_epoch_s.append(round(inc.first_epoch_at - inc.started, 1))
            elif (inc.ended or time.monotonic()) - inc.started > self.joiner_limit_s:
                r.joiners_never_contributed.append(inc.name)
        peer_faults = [t for t, _ in self.fault_log if _ != "coordinator"]
        for start, stop in self.outages:
            if any(start - 2 * (stop - start) - 30 <= t <= stop for t in peer_faults):
                continue  # a peer fault nearby stalls the others too: not the coordinator's doing
            # peers that trained through the outage and the same time before it, untouched by other
            # faults: their samples/s during the outage vs over their whole life
            length = stop - start
            steady = [
                i
                for i in self.all_incarnations
                if i.timeline
                and i.timeline[0][0] <= start - length
                and i.timeline[-1][0] >= stop
                and (i.ended is None or i.ended >= stop)
                and not any(a < stop and b > start - length for a, b in self.faulted[i.name])
            ]
            during = (
                sum(samples_at(i.timeline, stop) - samples_at(i.timeline, start) for i in steady) / length
            )
            usual = sum(
                (i.timeline[-1][1] - i.timeline[0][1]) / (i.timeline[-1][0] - i.timeline[0][0])
                for i in steady
            )
            if usual > 0:
                r.outage_throughput_ratio.append(round(during / usual, 2))

    def _reap(self) -> None:
        for pgid in self.pgids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
        for inc in self.all_incarnations:
            inc.child.proc.wait()
        if self.coordinator is not None:
            self.coordinator.proc.wait()
        if self.lab is not None:
            self.lab.teardown()


def run_chaos(config: ChaosConfig, work_dir: Path, peer_args: tuple[str, ...] = ()) -> Report:
    report = Chaos(config, work_dir, peer_args).run()
    (work_dir / "chaos.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def missed_targets(
    report: Report, config: ChaosConfig, joiner_limit_s: float = 60.0, min_accepted: float = 0.8
) -> list[str]:
    """The issue's targets this run missed (empty: all met)."""
    r, missed = report, []
    if r.checkpoints_lost or r.checkpoint_errors or r.checkpoints_verified != r.checkpoints_published:
        missed.append(f"checkpoints lost {r.checkpoints_lost} or not verifying {r.checkpoint_errors}")
    if not r.checkpoints_published:
        missed.append("no checkpoint was published")
    if r.orphans:
        missed.append(f"{len(r.orphans)} orphan processes: {r.orphans}")
    if r.undetected:
        missed.append(f"dead peers never shown DEAD: {r.undetected}")
    if r.detect_dead_s and max(r.detect_dead_s) > 2 * config.heartbeat_timeout_s:
        missed.append(
            f"a dead peer took {max(r.detect_dead_s)}s to detect (> 2 x {config.heartbeat_timeout_s}s)"
        )
    if r.joiner_first_epoch_s and max(r.joiner_first_epoch_s) > joiner_limit_s:
        missed.append(
            f"a joiner took {max(r.joiner_first_epoch_s)}s to its first epoch (> {joiner_limit_s}s)"
        )
    if r.joiners_never_contributed:
        missed.append(f"joiners never contributed: {r.joiners_never_contributed}")
    if not r.final_eval_loss < r.initial_eval_loss:
        missed.append(f"eval loss did not fall: {r.initial_eval_loss} -> {r.final_eval_loss}")
    if r.outage_throughput_ratio and min(r.outage_throughput_ratio) < 0.9:
        missed.append(
            f"training slowed to {min(r.outage_throughput_ratio):.0%} of usual while the coordinator was down"
        )
    if r.accepted_fraction < min_accepted:
        missed.append(f"only {r.accepted_fraction:.0%} of computed samples accepted")
    return missed
