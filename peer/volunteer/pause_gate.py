"""A volunteer that pauses: hand in what it accumulated, stay visible as PAUSED, re-sync, go on.

`peer/machine/pause.py` decides *when* (SIGUSR1/SIGUSR2, `--schedule`, `--pause-when-busy`,
`--pause-on-battery`); this is what the training loop does about it, between two steps:

    gate = PauseGate(monitor, stats, stop_event)
    if gate.paused(opt.local_epoch):
        gate.wait(opt, resync=lambda: recovery.catch_up(opt, swarm))

While paused the peer computes nothing. Samples it accumulated towards the swarm's current epoch
are not thrown away: it keeps calling hivemind's step with no new samples (no forward or
backward, only a progress report) until the swarm's epoch turns, so those samples join that
round; then it stays idle. The data place only moves for batches trained on (`peer/data/feed.py`), so
no sequence is skipped. Its heartbeats carry phase "paused" and the reason; on resume, a peer the
swarm left behind loads the swarm's state before it contributes again.

Two ways to pause by hand (`crowdtrain ctl`, peer/volunteer/control.py): `pause` (as SIGUSR1) stops
computing at once; what it accumulated is handed in without new work. `finish-and-pause` keeps
computing at full speed until the swarm's epoch turns (the round took this peer's whole share of
it), then pauses with nothing left to hand in (`round_finished` in peer/machine/pause.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from crowdtrain.peer.events import emit
from crowdtrain.peer.machine.pause import FINISHED_ROUND_REASON, round_finished

logger = logging.getLogger(__name__)

HAND_IN_POLL_S = 0.2  # while handing in: how often to look whether the swarm's round begins
IDLE_POLL_S = 1.0


class PauseGate:
    """What the training loop does when the peer should pause: between two steps it asks `paused()`,
    and if so `wait()` blocks it there, handing in, idling, then re-syncing with the swarm.

    Called from the training loop (`Volunteer._train`, the main thread) only; it reads the decision
    that `monitor` (`peer/machine/pause.py`) keeps up to date on its own thread and from signal
    handlers, and reports "paused" through `stats`, which the heartbeat thread sends.
    Lifecycle: built in `Volunteer.__init__` and kept for the volunteer's life; it owns no thread
    and nothing to close (the monitor is started and shut down by the volunteer).
    """

    def __init__(self, monitor, stats, stop_event: threading.Event):
        self.monitor = monitor  # a PauseMonitor: whether to pause now, and why
        self.stats = stats  # the heartbeat's StatsBox: phase "paused" and the reason
        self.stop_event = stop_event  # set when leaving: wait() returns within a poll
        self.pauses = 0  # how many times the loop paused
        # the epoch in which `finish-and-pause` was asked (set from the control thread); None: not asked
        self.finish_after_epoch: int | None = None

    def paused(self, local_epoch: int | None = None) -> bool:
        """Whether to pause before the next step; a `finish-and-pause` whose round turned (the
        loop's `local_epoch` moved past the one it was asked in) becomes a manual pause here."""
        asked = self.finish_after_epoch
        if local_epoch is not None and round_finished(asked, local_epoch):
            self.finish_after_epoch = None
            self.monitor.pause(FINISHED_ROUND_REASON)
            logger.info("the round of epoch %d is finished and handed in: pausing", asked)
        return self.monitor.decision.paused

    def finish_then_pause(self, local_epoch: int) -> None:
        """Keep training until the epoch `local_epoch` turns, then pause (any thread)."""
        self.finish_after_epoch = local_epoch

    def resume(self) -> None:
        """Lift a manual pause and forget a pending `finish-and-pause` (any thread)."""
        self.finish_after_epoch = None
        self.monitor.resume()

    def wait(self, opt, resync: Callable[[], None], show: Callable[[str], None] | None = None) -> None:
        """Block while paused (or until stopped): hand in, idle, then re-sync. `show(reason)` is
        called at every poll while paused (the live line keeps saying `PAUSED (reason)`)."""
        t0, reason = time.monotonic(), self.monitor.decision.reason
        self.pauses += 1
        # "paused: by SIGUSR1 ...", not "paused: paused by SIGUSR1 ..."
        emit(logger, "paused", "paused: %s; no work is lost", reason.removeprefix("paused "), reason=reason)
        self.stats.update(phase="paused", pause_reason=reason, samples_per_s=0.0)
        epoch = opt.local_epoch
        while not self.stop_event.is_set() and self.monitor.decision.paused:
            reason = self._show(reason)
            if show is not None:
                show(reason)
            if _handing_in(opt, epoch):
                opt.step(batch_size=0)  # joins the round when the swarm is ready; no compute
                self.stop_event.wait(HAND_IN_POLL_S)
            else:  # handed in (or too late for it): idle, no step, no state load until resumed
                self.monitor.wait_until_resumed(self.stop_event, timeout_s=IDLE_POLL_S)
        if self.stop_event.is_set():
            return
        local, swarm = opt.local_epoch, fresh_swarm_epoch(opt.tracker)
        behind = local < swarm
        if behind:  # the swarm went on without it: its state first, then contributions
            self.stats.update(phase="loading_state", pause_reason="")
            resync()
        self.stats.update(phase="training", pause_reason="")
        paused_s = time.monotonic() - t0
        emit(
            logger,
            "resumed",
            "resumed after %.0fs paused at epoch %d, the swarm at %d%s",
            paused_s,
            local,
            swarm,
            "; loaded the swarm's state first" if behind else "",
            paused_s=round(paused_s, 3),
            resynced=behind,
        )

    def _show(self, shown: str) -> str:
        reason = self.monitor.decision.reason
        if reason != shown and self.monitor.decision.paused:
            self.stats.update(pause_reason=reason)
        return reason


def fresh_swarm_epoch(tracker, timeout_s: float = 15.0) -> int:
    """The swarm's epoch read from its progress records now, not as hivemind's tracker last fetched
    them (up to 10 s ago, long enough to miss epochs a small swarm took meanwhile).
    hivemind 1.1.12 private: ProgressTracker's fetch loop wakes on `global_state_updated`, fetches
    when `global_progress.next_fetch_time` has passed, then sets `fetched_global_progress_this_epoch`."""
    tracker.fetched_global_progress_this_epoch.clear()
    tracker.global_progress.next_fetch_time = 0.0
    tracker.global_state_updated.set()
    if not tracker.fetched_global_progress_this_epoch.wait(timeout_s):
        logger.warning(
            "the swarm's progress records did not arrive within %.0fs; using the last ones", timeout_s
        )
        tracker.fetched_global_progress_this_epoch.set()
    return tracker.global_epoch


def _handing_in(opt, epoch: int) -> bool:
    """Whether samples this peer accumulated towards the swarm's current epoch still wait for that
    epoch's round: not once the round took them (our epoch moved), nor once the swarm moved on
    without them (they are stale; hivemind would load the swarm's state inside the step)."""
    pending = opt.tracker.local_progress.samples_accumulated > 0
    return pending and opt.local_epoch == epoch and opt.tracker.global_epoch <= epoch
