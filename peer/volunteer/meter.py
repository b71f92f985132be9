"""The training loop's numbers, its epoch log line, "am I contributing?", and the live status line
of `crowdtrain peer` (peer/volunteer/trainer.py).

The live line is drawn on a terminal only (`StatusLine`); its text is `status_text`, a pure
function of the numbers and the terminal's width: never wider than the terminal (the least
important fields are left out first, so it never wraps), never a non-finite or absurd number
(hivemind's next-averaging estimate can be infinite or 1e22 s away: "waiting for peers"), and
`PAUSED (reason)` while the peer is paused. On a file or a pipe there is no live line, only log
lines. The epoch log line is shown at most every `EPOCH_LINE_EVERY_S` in the text format (the
others at DEBUG: `--log-level debug` shows all) and every time under `--log-format json`
(`EpochLines`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable

from crowdtrain.peer.events import emit, progress_shown, terminal_width, writes_json

logger = logging.getLogger(__name__)

EPOCH_LINE_EVERY_S = 30.0  # text logs: at most one epoch line at INFO this often (the rest at DEBUG)
ETA_SHOWN_MAX_S = 24 * 3600.0  # a next-averaging estimate beyond this means nobody to average with yet
SEPARATOR = " | "


def _number(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "-" for a missing or non-finite one."""
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def eta_text(eta_s: float | None) -> str:
    """When this peer averages next, from hivemind's estimate (seconds from now): "in 25s", "in
    4min", or "waiting for peers" when the estimate is missing, non-finite or absurdly far."""
    if eta_s is None or not math.isfinite(eta_s) or eta_s > ETA_SHOWN_MAX_S:
        return "next averaging: waiting for peers"
    eta_s = max(0.0, eta_s)
    if eta_s < 100:
        return f"next averaging in {eta_s:.0f}s"
    if eta_s < 100 * 60:
        return f"next averaging in {eta_s / 60:.0f}min"
    return f"next averaging in {eta_s / 3600:.0f}h"


def fit_fields(fields: list[tuple[str, int]], width: int) -> str:
    """`fields` (text, importance), in the order shown, joined by " | " within `width - 1` columns
    (writing the last column makes some terminals wrap): the most important first, each one kept
    if it still fits, so the least important are left out first; the most important alone is cut
    short ("...") when even it does not fit. Empty texts are skipped."""
    room = max(1, width - 1)
    kept: set[int] = set()
    used = 0
    for i, (text, _) in sorted(enumerate(fields), key=lambda item: -item[1][1]):
        if not text:
            continue
        cost = len(text) + (len(SEPARATOR) if kept else 0)
        if used + cost <= room:
            kept.add(i)
            used += cost
        elif not kept:  # the most important field alone is too wide: cut it
            return text[: room - 3] + "..." if room > 3 else text[:room]
    return SEPARATOR.join(text for i, (text, _) in enumerate(fields) if i in kept)


def status_text(
    *,
    epoch: int,
    loss: float | None = None,
    samples_per_s: float | None = None,
    swarm_peers: int = 0,
    eta_s: float | None = None,
    standing: str = "",
    paused_reason: str = "",
    width: int = 80,
) -> str:
    """The live line's text, at most `width - 1` columns. Paused (`paused_reason` set): `PAUSED
    (reason)` first, and no loss, throughput or next averaging (nothing is computed meanwhile)."""
    if paused_reason:
        fields = [
            (f"PAUSED ({paused_reason.removeprefix('paused ')})", 10),
            (f"epoch {epoch}", 8),
            (standing, 6),
            (f"swarm {swarm_peers} peers", 3),
        ]
        return fit_fields(fields, width)
    rate = samples_per_s if samples_per_s is None or samples_per_s < 1e9 else math.inf  # absurd
    fields = [
        (f"epoch {epoch}", 9),
        (f"loss {_number(loss, '.3f')}", 7),
        (f"{_number(rate, '.1f')} samples/s", 5),
        (f"swarm {swarm_peers} peers", 3),
        (eta_text(eta_s), 2),
        (standing, 6),
    ]
    return fit_fields(fields, width)


class _ClearStatusLine(logging.Filter):
    """On the handler that writes to the live line's terminal: clear the live line before each log
    record, so the record starts at the left margin; the line is drawn again at the next step."""

    def __init__(self, status: StatusLine):
        super().__init__()
        self.status = status

    def filter(self, record: logging.LogRecord) -> bool:
        self.status.clear()
        return True


class StatusLine:
    """One live line on a terminal, redrawn at most every `interval_s`; nothing when stderr is a
    file or a pipe, or under `--log-format json` (the log lines say it all there). Used as a
    context manager, it also clears itself before every log line written to the same terminal
    (until the `with` ends)."""

    def __init__(self, interval_s: float = 0.5, width: Callable[[], int] = terminal_width):
        self.live = sys.stderr.isatty() and not writes_json(logger)  # JSON lines are for programs
        self.interval_s = interval_s
        self.width = width
        self._drawn = 0.0
        self._shown = False  # whether a live line is on the screen now
        self._filter = _ClearStatusLine(self)
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> StatusLine:
        if self.live:
            self._handlers = [
                h for h in logging.getLogger().handlers if getattr(h, "stream", None) is sys.stderr
            ]
            for handler in self._handlers:
                handler.addFilter(self._filter)
        return self

    def __exit__(self, *exc) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._filter)
        self._handlers = []
        self.clear()

    def draw(self, opt, loss: float, samples_per_s: float, swarm_peers: int, standing: str = "") -> None:
        if not self._due():
            return
        from hivemind.utils import get_dht_time

        eta_s = opt.tracker.estimated_next_update_time - get_dht_time()
        self._write(
            status_text(
                epoch=opt.local_epoch,
                loss=loss,
                samples_per_s=samples_per_s,
                swarm_peers=swarm_peers,
                eta_s=eta_s,
                standing=standing,
                width=self.width(),
            )
        )

    def draw_paused(self, reason: str, epoch: int, swarm_peers: int, standing: str = "") -> None:
        """While paused: `PAUSED (reason)` stays on the line (called from the pause gate's waits)."""
        if not self._due():
            return
        self._write(
            status_text(
                epoch=epoch,
                swarm_peers=swarm_peers,
                standing=standing,
                paused_reason=reason or "no reason given",
                width=self.width(),
            )
        )

    def _due(self) -> bool:
        """Time to draw again, and no progress bar (a shard's download: peer/events.py) holds the line."""
        return self.live and time.monotonic() - self._drawn >= self.interval_s and not progress_shown()

    def _write(self, text: str) -> None:
        self._drawn = time.monotonic()
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        """Before a log line, which then takes the status line's place."""
        if self.live and self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False


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


def standing_text(answer, short: bool = False) -> str:
    """ "accepted 12,400 samples (31.0% of the run, rank 2 of 5)" from a heartbeat answer, or with
    `short` (the live line) "accepted 12,400 samples (31.0%, rank 2/5)"; "" before the coordinator
    credited anything (its numbers are its word: shown, never acted on)."""
    if answer is None or answer.accepted_samples <= 0:
        return ""
    share = min(max(answer.share, 0.0), 1.0)
    if short:
        return f"accepted {answer.accepted_samples:,} samples ({share:.1%}, rank {answer.rank}/{answer.ranked_peers})"
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


class EpochLines:
    """At which level each epoch's line is logged. Text logs: INFO at most every `every_s` (the
    first one included), DEBUG in between (`--log-level debug` shows every one), so a fast swarm's
    epochs do not drown the rest. `--log-format json`: INFO always, since programs (harnesses,
    benchmarks, tests) wait for every `epoch` event."""

    def __init__(self, every_s: float = EPOCH_LINE_EVERY_S, clock=time.monotonic, json_logs=None):
        self.every_s = every_s
        self.clock = clock
        self.json_logs = json_logs if json_logs is not None else (lambda: writes_json(logger))
        self._shown: float | None = None  # when the last INFO line was logged

    def level(self) -> int:
        if self.json_logs():
            return logging.INFO
        now = self.clock()
        if self._shown is not None and now - self._shown < self.every_s:
            return logging.DEBUG
        self._shown = now
        return logging.INFO


def log_epoch(opt, inner, dht, meter: EpochMeter, swarm_peers: int, level: int = logging.INFO) -> None:
    """The epoch's log line (and `epoch` event) at `level` (`EpochLines`); `inner`: DiLoCo's local
    optimizer, or None."""
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
        level=level,
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
