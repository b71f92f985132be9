"""What a paused peer does between two steps (peer/volunteer/pause_gate.py), against a stand-in for hivemind's
optimizer and progress tracker (the real ones need a swarm: tests/test_volunteer.py runs those).
The stand-in keeps hivemind's rules that matter here: a step joins the epoch's round once the swarm
is ready, with the samples accumulated; the tracker fetches when woken."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from crowdtrain.peer.link.heartbeat import StatsBox
from crowdtrain.peer.machine.pause import Decision
from crowdtrain.peer.volunteer.pause_gate import PauseGate


@dataclass
class Progress:
    epoch: int = 0
    samples_accumulated: int = 0
    next_fetch_time: float = 0.0


class Tracker:
    """hivemind's ProgressTracker as far as pausing uses it: a fetch (on `global_state_updated`)
    copies what the swarm's records say now into `global_progress`."""

    def __init__(self, swarm_epoch: int):
        self.swarm_epoch, self.fetches = swarm_epoch, 0
        self.local_progress, self.global_progress = Progress(), Progress(epoch=swarm_epoch)
        self.fetched_global_progress_this_epoch = threading.Event()
        self.global_state_updated = _Fetching(self)

    @property
    def global_epoch(self) -> int:
        return self.global_progress.epoch


class _Fetching(threading.Event):
    def __init__(self, tracker: Tracker):
        super().__init__()
        self.tracker = tracker

    def set(self) -> None:  # the fetch loop wakes and reads the records at once
        self.tracker.fetches += 1
        self.tracker.global_progress.epoch = self.tracker.swarm_epoch
        self.tracker.fetched_global_progress_this_epoch.set()


class Optimizer:
    def __init__(self, epoch: int, pending: int, tracker: Tracker, round_after_steps: int):
        self.local_epoch, self.tracker = epoch, tracker
        tracker.local_progress = Progress(epoch, pending)
        self.steps, self.round_after_steps, self.samples_in_round = [], round_after_steps, None

    def step(self, batch_size: int) -> None:
        self.steps.append(batch_size)
        if len(self.steps) >= self.round_after_steps:  # the swarm reached its target: our round
            self.samples_in_round = self.tracker.local_progress.samples_accumulated
            self.local_epoch += 1
            self.tracker.local_progress = Progress(self.local_epoch, 0)


class Monitor:
    def __init__(self):
        self.decision = Decision(True, "paused by SIGUSR1 (send SIGUSR2 to resume)")
        self.waits = 0

    def wait_until_resumed(self, stop_event, timeout_s=None) -> bool:
        self.waits += 1
        if self.waits >= 3:  # SIGUSR2 after a while
            self.decision = Decision(False, "running")
        return not self.decision.paused


def run_pause(opt: Optimizer) -> tuple[list, StatsBox]:
    stats, resyncs = StatsBox(), []
    gate = PauseGate(Monitor(), stats, threading.Event())
    gate.wait(opt, resync=lambda: resyncs.append(opt.local_epoch))
    return resyncs, stats


def test_a_paused_peer_hands_in_its_samples_without_computing_then_idles(monkeypatch):
    monkeypatch.setattr("crowdtrain.peer.volunteer.pause_gate.HAND_IN_POLL_S", 0.0)
    tracker = Tracker(swarm_epoch=5)
    opt = Optimizer(epoch=5, pending=48, tracker=tracker, round_after_steps=3)
    resyncs, stats = run_pause(opt)
    assert opt.steps == [0, 0, 0] and opt.samples_in_round == 48  # its 48 samples joined the round
    assert opt.local_epoch == 6 and resyncs == []  # the swarm is not ahead: nothing to load
    assert tracker.fetches == 1 and stats.get().phase == "training" and stats.get().pause_reason == ""


def test_a_peer_the_swarm_left_behind_loads_its_state_before_contributing(monkeypatch):
    monkeypatch.setattr("crowdtrain.peer.volunteer.pause_gate.HAND_IN_POLL_S", 0.0)
    tracker = Tracker(swarm_epoch=5)
    opt = Optimizer(epoch=5, pending=0, tracker=tracker, round_after_steps=99)
    tracker.swarm_epoch = 8  # the swarm went on while it idled; its tracker has not fetched since
    resyncs, _ = run_pause(opt)
    assert opt.steps == [] and resyncs == [5]  # nothing to hand in: no step at all, then a re-sync


def test_samples_the_swarm_went_on_without_are_not_stepped_on(monkeypatch):
    monkeypatch.setattr("crowdtrain.peer.volunteer.pause_gate.HAND_IN_POLL_S", 0.0)
    tracker = Tracker(swarm_epoch=6)  # the round for epoch 5 already happened without it
    opt = Optimizer(epoch=5, pending=48, tracker=tracker, round_after_steps=1)
    resyncs, _ = run_pause(opt)
    assert opt.steps == [] and resyncs == [5]  # stale samples: no step (hivemind would load state in it)
