"""Progress events: one call logs a line for people and, with `--log-format json`, a record for programs.

    emit(logger, "epoch", "epoch=%d loss=%.3f", epoch, loss, epoch=epoch, loss=loss)

The human line stays exactly as written; under `--log-format json` every log record becomes one
JSON object per line, and records made by `emit` carry `event` and their fields. Harnesses, the
benchmarks and the tests read those objects (never the human text). The schema is stable and
documented in docs/events.md: keys `ts` (unix seconds), `level`, `logger`,
`msg` (the human line), and for events `event` plus that event's fields, listed in `EVENTS`.
"""

from __future__ import annotations

import json
import logging
import math

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


def quiet_expected_averaging_failures() -> None:
    """Install ExpectedAveragingFailures on hivemind's averager logger (before hivemind forks, so its
    averager processes inherit it). hivemind 1.1.12 logs them in `DecentralizedAverager._step`."""
    averager_logger = logging.getLogger("hivemind.averaging.averager")
    if not any(isinstance(f, ExpectedAveragingFailures) for f in averager_logger.filters):
        averager_logger.addFilter(ExpectedAveragingFailures())
