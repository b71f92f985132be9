"""Progress events: one call logs a line for people and, with `--log-format json`, a record for programs.

    emit(logger, "epoch", "epoch=%d loss=%.3f", epoch, loss, epoch=epoch, loss=loss)

The human line stays exactly as written; under `--log-format json` every log record becomes one
JSON object per line, and records made by `emit` carry `event` and their fields. Harnesses, the
benchmarks and the tests read those objects (never the human text). The schema is stable and
documented in docs/events.md: keys `ts` (unix seconds), `level`, `logger`,
`msg` (the human line), and for events `event` plus that event's fields, listed in `EVENTS`.

The terminal every line reaches (`TerminalHandler`, the handler `crowdtrain` logs through) and what
else is drawn on it: hivemind's records (`configure_hivemind_logging`, `route_hivemind_logs`), and
the progress of long downloads (`Progress`: a tqdm bar on a terminal, a line every 10 s elsewhere).
On a terminal a log record first clears the line it lands on (the peer's live line, drawn by
peer/volunteer/meter.py, or a forked hivemind child's leftovers) and is written above a progress
bar shown then; the live line is not drawn while a bar is (`progress_shown`). No heavy imports.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable

SCHEMA_VERSION = 1

# event name -> its fields (documentation and a check on emit; docs/events.md's table mirrors this)
EVENTS: dict[str, tuple[str, ...]] = {
    # a volunteer
    "joined": ("run_id", "name", "peer_id", "preset", "shard_index", "device"),
    "admitted": ("dht_peer_id", "expires_unix_s"),
    "state_loaded": ("epoch", "seconds"),
    "resumed_from_checkpoint": ("step", "eval_loss"),
    "checkpoint_fallback": ("step", "swarm_epoch"),
    "epoch": (
        "epoch",
        "loss",
        "samples_per_s",
        "swarm_peers",
        "lr",
        "samples_total",
        "compute_share",
        "averaged_with",
        "group",
    ),
    "data_start": ("shard", "passes", "position"),
    "memory_plan": ("micro_batch", "batch_size", "reason"),
    "reachability": ("reachable", "seen_host", "advice"),
    "paused": ("reason",),
    "resumed": ("paused_s", "resynced"),
    "contribution": ("accepted_samples", "share", "rank", "ranked_peers"),
    "coordinator_unreachable": ("what", "retry_in_s"),
    "swarm_rejoined": ("reached", "bootstrap_peers"),
    # the coordinator
    "coordinator_ready": ("grpc", "http", "run_id"),
    "state_chosen": ("epoch", "agreeing", "outvoted", "reason"),
    "state_disagreement": ("epoch", "peers", "reason"),
    "checkpoint_refused": ("epoch", "reason"),
    "checkpoint_published": ("step", "eval_loss", "seconds"),
    "publish_waiting": ("donors_listed", "reason"),
    "publish_failed": ("error",),
}


def emit(
    logger: logging.Logger,
    event: str,
    message: str,
    *args,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields,
) -> None:
    """Log `message % args` for people, tagged with `event` and `fields` for programs (with the
    current exception's traceback when `exc_info`)."""
    expected = EVENTS[event]
    if set(fields) != set(expected):
        raise TypeError(f"event {event!r} takes fields {expected}, got {sorted(fields)}")
    logger.log(level, message, *args, exc_info=exc_info, extra={"event": event, "event_fields": fields})


def _plain(value):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per log record; see the module docstring for the schema."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            obj["event"] = event
            obj.update({k: _plain(v) for k, v in record.event_fields.items()})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


def writes_json(logger: logging.Logger) -> bool:
    """Whether `logger`'s records reach a handler that writes them as JSON (`--log-format json`):
    then a program reads them, and an event must not be left out to spare a person's screen."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(h.formatter, JsonFormatter) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def parse_record(line: str) -> dict | None:
    """The object of one `--log-format json` log record, or None for anything else (other output,
    a line cut short)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "msg" in obj else None


def parse_event(line: str) -> dict | None:
    """The object of one `--log-format json` line that is an event, or None for anything else
    (other output, a plain log record, a line cut short)."""
    record = parse_record(line)
    return record if record is not None and "event" in record else None


class ExpectedAveragingFailures(logging.Filter):
    """hivemind logs a round that found no partner in time ("could not find a group") at ERROR with
    a traceback. In a swarm where volunteers come and go that is an expected outcome, not a bug: the
    peer keeps its samples for the next round. Attached to hivemind's averager logger, this turns
    those records into one WARNING line that says so; every other record passes unchanged."""

    EXPECTED = "could not find a group"
    NOTE = " (no partner was ready in time, e.g. one just left; the samples count in the next round)"

    def filter(self, record: logging.LogRecord) -> bool:
        if self.EXPECTED in str(record.msg) and record.levelno >= logging.ERROR:
            record.msg, record.args = f"{record.getMessage()}{self.NOTE}", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class PartialAveragingResults(logging.Filter):
    """hivemind logs "Averaging: received 100.0% results" at WARNING when any part of an all-reduce
    round did not arrive (a peer slow or gone mid-round), however small; the round then averages
    what arrived. Attached to hivemind's partition logger: a round that lost less than 0.05% is
    DEBUG (shown only with `--log-level debug`), a bigger loss one WARNING line that says what
    happened; every other record passes unchanged."""

    PATTERN = re.compile(r"Averaging: received (\d+(?:\.\d+)?)% results")

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.PATTERN.fullmatch(str(record.msg)) if not record.args else None
        if found is None:
            return True
        share = float(found[1])
        record.msg, record.args = (
            "averaging round: %.1f%% of the parts arrived (a peer was slow or left mid-round); "
            "what arrived was averaged",
            (share,),
        )
        if share < 99.95:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_expected_averaging_failures() -> None:
    """Install ExpectedAveragingFailures on hivemind's averager logger and PartialAveragingResults on
    its partition logger (before hivemind forks, so its averager processes inherit them). hivemind
    1.1.12 logs them in `DecentralizedAverager._step` and `TensorPartReducer.finalize`."""
    for name, kind in (
        ("hivemind.averaging.averager", ExpectedAveragingFailures),
        ("hivemind.averaging.partition", PartialAveragingResults),
    ):
        hivemind_logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in hivemind_logger.filters):
            hivemind_logger.addFilter(kind())


# ------------------------------------------------------------------ hivemind's records

# Python's level names as hivemind reads them from HIVEMIND_LOGLEVEL, and go-log's for p2pd
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING"}
_GOLOG_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN"}


def hivemind_level(level: int) -> int:
    """The level hivemind logs at when ours is `level`: DEBUG under `--log-level debug` (all of it,
    its children's and p2pd's included), else WARNING or above. Its INFO lines ("Another
    look_for_group is already in progress", identity files, relays) are notes for its developers."""
    return logging.DEBUG if level <= logging.DEBUG else max(logging.WARNING, level)


def configure_hivemind_logging(level: int) -> None:
    """hivemind at `hivemind_level(level)`, in this process and in every process it forks or starts.

    Why it takes more than `getLogger("hivemind").setLevel`: importing hivemind runs
    `hivemind.utils.logging._enable_default_handler`, which sets the "hivemind" logger's level
    from the HIVEMIND_LOGLEVEL environment variable (INFO when unset), adds its own colored stderr
    handler and stops propagation. A level set before that import is overwritten, so the peer and
    its forked DHT and averager processes (which copy the parent's loggers) logged hivemind's INFO
    lines through that handler, past ours and across the live line. So the environment says the
    level (read at hivemind's import, inherited by p2pd as GOLOG_LOG_LEVEL), the level is set now
    as well when hivemind is already imported, and the expected averaging failures are quieted
    (ExpectedAveragingFailures, inherited by forked children too). Call before hivemind starts any
    process; `route_hivemind_logs` then sends its records through our handler."""
    chosen = hivemind_level(level)
    os.environ["HIVEMIND_LOGLEVEL"] = _LEVEL_NAMES.get(chosen, logging.getLevelName(chosen))
    os.environ["GOLOG_LOG_LEVEL"] = _GOLOG_NAMES.get(chosen, "ERROR")
    hivemind_logging = sys.modules.get("hivemind.utils.logging")
    if hivemind_logging is not None:  # imported already: its handler set-up read the old level
        hivemind_logging.loglevel = os.environ["HIVEMIND_LOGLEVEL"]
        logging.getLogger("hivemind").setLevel(chosen)
    quiet_expected_averaging_failures()


def route_hivemind_logs() -> None:
    """hivemind's records through our handlers (our format, JSON under `--log-format json`,
    `TerminalHandler` on a terminal) instead of the handler it installs on import, at the level it
    has (`configure_hivemind_logging`). Idempotent; call before hivemind starts its processes (the
    DHT: peer/swarm/wiring.py), which then inherit it. Imports hivemind."""
    from hivemind.utils.logging import use_hivemind_log_handler

    hivemind_logger = logging.getLogger("hivemind")
    level = hivemind_logger.level
    use_hivemind_log_handler("nowhere")  # its handler off, propagation on, its level reset...
    hivemind_logger.setLevel(level)  # ...so restored


# ------------------------------------------------------------------ the terminal

CLEAR_LINE = "\r\033[K"  # back to the line's start and clear it


def terminal_width() -> int:
    """The columns of the terminal stderr is on ($COLUMNS, else stdout's terminal, else 80)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size().columns


class TerminalHandler(logging.StreamHandler):
    """The log handler `crowdtrain` writes through (stderr). On a terminal, in text format, each
    record first clears the line it lands on, so it starts at the left margin whatever was drawn
    there: the live line (peer/volunteer/meter.py draws it again at its next step) or the half line
    of another process. Forked hivemind children inherit this handler, so their records cannot cut
    into the parent's live line either. While a `Progress` bar of this process is shown, a record
    is written above it through tqdm, which draws the bar again below. Off a terminal, or under
    `--log-format json`: a plain StreamHandler. WARNING is called WARNING throughout, also after
    hivemind's import renamed it WARN."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelname == "WARN":  # hivemind's import renames WARNING for its own format
            record.levelname = "WARNING"
        stream = self.stream
        if isinstance(self.formatter, JsonFormatter) or not _isatty(stream):
            super().emit(record)
            return
        try:
            text = self.format(record)
            if progress_shown():
                from tqdm import tqdm

                tqdm.write(text, file=stream)
            else:
                stream.write(CLEAR_LINE + text + self.terminator)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


# ------------------------------------------------------------------ progress of long downloads

PROGRESS_LINE_EVERY_S = 10.0  # off a terminal: at most one progress line this often
_SHOWN: set = set()  # the Progress bars on the terminal now, with the process that draws each


def progress_shown() -> bool:
    """Whether this process shows a progress bar now (the live line waits for it to end)."""
    pid = os.getpid()  # a forked child's copy of a parent's bar is not shown by the child
    return any(owner == pid for owner, _ in list(_SHOWN))


def progress_text(what: str, done_bytes: int, total_bytes: int, rate_bytes_per_s: float) -> str:
    """One progress line: "data shard train-00003.jsonl: 12.0MB of 40.0MB (30%), 2.4MB/s"."""
    from tqdm import tqdm

    done = tqdm.format_sizeof(done_bytes, "B")
    rate = tqdm.format_sizeof(rate_bytes_per_s, "B/s") if math.isfinite(rate_bytes_per_s) else "-"
    if total_bytes <= 0:
        return f"{what}: {done}, {rate}"
    share = min(done_bytes / total_bytes, 1.0)
    return f"{what}: {done} of {tqdm.format_sizeof(total_bytes, 'B')} ({share:.0%}), {rate}"


def _redraw_line(stream, text: str) -> None:
    stream.write(CLEAR_LINE + text)
    stream.flush()


class Progress:
    """The progress of one long transfer of `total_bytes` (0: unknown), named `what`, for people.

    On a terminal (stderr, text logs): one tqdm bar (bytes, percent, rate), fitted to the
    terminal's width as it is now (never its last column, so it never wraps), cleared when done
    unless `leave`. Elsewhere, or under `--log-format json`: a plain INFO line on `log` at most
    every `every_s` ("12.0MB of 40.0MB (30%), 2.4MB/s", the rate since the line before). Nothing is
    shown before the first `update`, so a file found in the cache shows nothing. Used as a context
    manager or closed with `close()`; `update(n_bytes)` is all a downloader needs."""

    def __init__(
        self,
        total_bytes: int,
        what: str,
        *,
        log: logging.Logger,
        leave: bool = False,
        terminal: bool | None = None,
        every_s: float = PROGRESS_LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] = terminal_width,
    ):
        self.total_bytes, self.what, self.log, self.leave = max(0, total_bytes), what, log, leave
        self.terminal = terminal if terminal is not None else _isatty(sys.stderr) and not writes_json(log)
        self.every_s, self.clock, self.width = every_s, clock, width
        self.done_bytes = 0
        self.lines = 0  # progress lines logged (off a terminal)
        self._bar = None
        self._since: tuple[float, int] | None = None  # (time, done_bytes) of the last line or the start

    def update(self, n_bytes: int) -> None:
        if self._since is None:
            self._start()
        self.done_bytes += n_bytes
        if self._bar is not None:
            self._bar.update(n_bytes)
            return
        now = self.clock()
        then, done_then = self._since
        if now - then >= self.every_s:
            rate = (self.done_bytes - done_then) / max(now - then, 1e-9)
            self.log.info("%s", progress_text(self.what, self.done_bytes, self.total_bytes, rate))
            self.lines += 1
            self._since = (now, self.done_bytes)

    def set_description_str(self, what: str) -> None:
        """Name what is transferred now (a checkpoint's file, say)."""
        self.what = what
        if self._bar is not None:
            self._bar.set_description_str(what)

    def _start(self) -> None:
        self._since = (self.clock(), 0)
        if not self.terminal:
            return
        from tqdm import tqdm

        _SHOWN.add((os.getpid(), id(self)))  # first: the live line stops drawing
        sys.stderr.write(CLEAR_LINE)  # the live line, if drawn, gives way
        self._bar = tqdm(
            total=self.total_bytes or None,
            desc=self.what,
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            leave=self.leave,
            ncols=self._columns(),
            mininterval=0.2,
        )
        self._bar.dynamic_ncols = lambda _: (self._columns(), None)  # tqdm asks before each redraw
        # each redraw clears the line rather than padding it with spaces to the last draw's length:
        # padding to a width the terminal no longer has would wrap
        self._bar.sp = functools.partial(_redraw_line, sys.stderr)

    def _columns(self) -> int:
        return max(10, self.width() - 1)  # writing the last column makes some terminals wrap

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        _SHOWN.discard((os.getpid(), id(self)))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
