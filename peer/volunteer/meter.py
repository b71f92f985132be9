"""The training loop's numbers, its epoch log line, "am I contributing?", and the live status line
of `crowdtrain peer` (peer/volunteer/trainer.py)."""

from __future__ import annotations

import hashlib
import logging
import sys
import time

from crowdtrain.peer.events import emit

logger = logging.getLogger(__name__)


class StatusLine:
    """One live line on a terminal, redrawn at most every `interval_s`; nothing when stderr is a
    file or a pipe (the epoch log lines say it all there)."""

    def __init__(self, interval_s: float = 0.5):
        self.live = sys.stderr.isatty()
        self.interval_s = interval_s
        self._drawn = 0.0

    def draw(self, opt, loss: float, samples_per_s: float, swarm_peers: int, standing: str = "") -> None:
        if not self.live or time.monotonic() - self._drawn < self.interval_s:
            return
        from hivemind.utils import get_dht_time

        self._drawn = time.monotonic()
        eta_s = max(0.0, opt.tracker.estimated_next_update_time - get_dht_time())
        sys.stderr.write(
            f"\r\033[Kepoch {opt.local_epoch} | loss {loss:.3f} | {samples_per_s:.1f} samples/s | "
            f"swarm {swarm_peers} peers | next averaging in {eta_s:.0f}s"
            + (f" | {standing}" if standing else "")
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
        self.clock = clock
        self.samples_total = 0
        self.ema_rate = 0.0
        self.start_epoch(epoch)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.losses = []
        self.samples = 0
        self.t0 = self.clock()
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


def group_fingerprint(group: tuple[str, ...]) -> str:
    """8 hex digits naming a group of peers: two peers that averaged together log the same one."""
    return hashlib.sha256("\n".join(group).encode()).hexdigest()[:8]


def standing_text(answer) -> str:
    """ "accepted 12,400 samples (31.0% of the run, rank 2 of 5)" from a heartbeat answer; "" before
    the coordinator credited anything (its numbers are its word: shown, never acted on)."""
    if answer is None or answer.accepted_samples <= 0:
        return ""
    share = min(max(answer.share, 0.0), 1.0)
    return (
        f"accepted {answer.accepted_samples:,} samples ({share:.1%} of the run, "
        f"rank {answer.rank} of {answer.ranked_peers})"
    )


class ContributionSummary:
    """Every `every_s` (and when asked, at the end): one line saying how much of this peer's work
    the swarm accepted, its share of the run and its rank: "am I contributing?"."""

    def __init__(self, every_s: float = 300.0, clock=time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._logged = clock()

    def maybe_log(self, answer, force: bool = False) -> None:
        if not force and self.clock() - self._logged < self.every_s:
            return
        self._logged = self.clock()
        text = standing_text(answer)
        if not text:
            logger.info(
                "contribution: none of this peer's samples is credited yet (it needs a finished round)"
            )
            return
        emit(
            logger,
            "contribution",
            "contribution: %s",
            text,
            accepted_samples=answer.accepted_samples,
            share=round(min(max(answer.share, 0.0), 1.0), 6),
            rank=answer.rank,
            ranked_peers=answer.ranked_peers,
        )


def log_epoch(opt, inner, dht, meter: EpochMeter, swarm_peers: int) -> None:
    """The epoch's log line (and `epoch` event); `inner`: DiLoCo's local optimizer, or None."""
    mean_loss, rate = sum(meter.losses) / max(1, len(meter.losses)), meter.epoch_rate()
    lr = (inner.optimizer if inner is not None else opt.opt).param_groups[0]["lr"]
    # the round that ended this epoch; none (it caught up by loading the state): alone
    group, opt.last_group = opt.last_group or (str(dht.peer_id),), ()
    emit(
        logger,
        "epoch",
        "epoch=%d loss=%.3f samples_per_s=%.1f swarm_peers=%d lr=%.1e samples_total=%d compute_share=%.2f "
        "averaged_with=%d group=%s",
        opt.local_epoch,
        mean_loss,
        rate,
        swarm_peers,
        lr,
        meter.samples_total,
        meter.compute_share(),
        len(group),
        group_fingerprint(group),
        epoch=opt.local_epoch,
        loss=round(mean_loss, 5),
        samples_per_s=round(rate, 3),
        swarm_peers=swarm_peers,
        lr=lr,
        samples_total=meter.samples_total,
        compute_share=round(meter.compute_share(), 4),
        averaged_with=len(group),  # the last gradient round's group, this peer included
        group=group_fingerprint(group),  # peers that averaged together log the same fingerprint
    )
