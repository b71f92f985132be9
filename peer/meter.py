"""The training loop's numbers and the live status line of `crowdtrain peer` (peer/trainer.py)."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time


class StatusLine:
    """One live line on a terminal, redrawn at most every `interval_s`; nothing when stderr is a
    file or a pipe (the epoch log lines say it all there)."""

    def __init__(self, interval_s: float = 0.5):
        self.live, self.interval_s, self._drawn = sys.stderr.isatty(), interval_s, 0.0

    def draw(self, opt, loss: float, samples_per_s: float, swarm_peers: int) -> None:
        if not self.live or time.monotonic() - self._drawn < self.interval_s:
            return
        from hivemind.utils import get_dht_time

        self._drawn = time.monotonic()
        eta_s = max(0.0, opt.tracker.estimated_next_update_time - get_dht_time())
        sys.stderr.write(
            f"\r\033[Kepoch {opt.local_epoch} | loss {loss:.3f} | {samples_per_s:.1f} samples/s | "
            f"swarm {swarm_peers} peers | next averaging in {eta_s:.0f}s"
        )
        sys.stderr.flush()

    def clear(self) -> None:
        """Before a log line, which then takes the status line's place."""
        if self.live:
            sys.stderr.write("\r\033[K")


class EpochMeter:
    """The training loop's numbers: a throughput average for heartbeats and the status line, and
    the mean loss and throughput of the current epoch for its log line."""

    def __init__(self, epoch: int, clock=time.monotonic):
        self.clock, self.samples_total, self.ema_rate = clock, 0, 0.0
        self.start_epoch(epoch)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.losses, self.samples, self.t0 = epoch, [], 0, self.clock()
        self.compute_s = 0.0

    def add(self, samples: int, loss: float, seconds: float, compute_s: float = 0.0) -> None:
        """One micro-batch: `seconds` in all, `compute_s` of them computing (not waiting)."""
        rate = samples / max(seconds, 1e-6)
        self.ema_rate = rate if self.ema_rate == 0 else 0.9 * self.ema_rate + 0.1 * rate
        self.samples_total += samples
        self.samples += samples
        self.losses.append(loss)
        self.compute_s += compute_s

    def epoch_rate(self) -> float:
        return self.samples / max(self.clock() - self.t0, 1e-6)

    def compute_share(self) -> float:
        """The share of this epoch's wall time spent computing (forward, backward, local steps)
        rather than waiting for the swarm or for data: the utilization of this peer's hardware."""
        return min(1.0, self.compute_s / max(self.clock() - self.t0, 1e-6))


def round_group(control, own_peer_id) -> tuple[str, ...]:
    """Who averaged together in a finished hivemind round (`control`, hivemind's StepControl, whose
    result maps each member's peer id to what it gathered): their sorted peer ids; just this peer's
    when the round failed, was skipped (no partner) or has not finished."""
    try:
        if control is not None and control.done() and not control.cancelled():
            return tuple(sorted(str(peer_id) for peer_id in control.result(0)))
    except (Exception, asyncio.CancelledError):  # the round failed: this peer stepped alone
        pass
    return (str(own_peer_id),)


def group_fingerprint(group: tuple[str, ...]) -> str:
    """8 hex digits naming a group of peers: two peers that averaged together log the same one."""
    return hashlib.sha256("\n".join(group).encode()).hexdigest()[:8]
