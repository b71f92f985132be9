"""A calm terminal: what a volunteer's terminal shows besides the live line.

- hivemind's records, from the peer and from the processes hivemind forks (its DHT, averagers),
  come at WARNING unless `--log-level debug`, in our format, through our handler, and each starts
  on a cleared line (a real DHT child under a pseudo-terminal);
- a long download (a data shard, the swarm's state, a checkpoint) shows one tqdm bar on a terminal,
  fitted to its width (a pseudo-terminal of 80 columns, read back through a small terminal model),
  with the live line waiting and log lines written above it; elsewhere a plain line at most every
  10 s (an injected clock).
"""

from __future__ import annotations

import fcntl
import functools
import io
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import types
from pathlib import Path

import pytest
from crowdtrain.peer.events import (
    CLEAR_LINE,
    JsonFormatter,
    Progress,
    TerminalHandler,
    configure_hivemind_logging,
    hivemind_level,
    progress_text,
    quiet_expected_averaging_failures,
)

# ------------------------------------------------------------------ a terminal, as far as we need one


def run_in_terminal(code: str, *args: str, columns: int = 80, timeout_s: float = 60.0) -> tuple[int, str]:
    """Run `python -c code args` with stdin, stdout and stderr on a pseudo-terminal `columns` wide;
    (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,  # its own group: hivemind's children and p2pd go with it on a timeout
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode, out.decode("utf-8", errors="replace")


_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")


class Screen:
    """What a terminal `columns` wide shows after `feed(text)`: printable text, \\r, \\n, ESC[K
    (clear to the end of the line), ESC[nA / ESC[nB (up, down); colors ignored. A character written
    past the last column wraps to the next row (`wrapped` counts that); a \\r on a row reached by
    wrapping redraws only that row and leaves the rest of the line above: `garbled` counts those
    (a long log line that wraps is fine, a redrawn line that wraps is not); `widest` is the most
    columns any row was written to."""

    def __init__(self, columns: int):
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.row = self.col = self.widest = self.wrapped = self.garbled = 0
        self._wrapped_row = False

    def feed(self, text: str) -> Screen:
        i = 0
        while i < len(text):
            found = _CSI.match(text, i) if text[i] == "\x1b" else None
            if found:
                self._escape(found[1], found[2])
                i = found.end()
                continue
            char = text[i]
            if char == "\r":
                self.garbled += self._wrapped_row and text[i + 1 : i + 2] != "\n"  # \r\n: a line's end
                self.col = 0
            elif char == "\n":
                self._move(1)
            elif char.isprintable():
                if self.col >= self.columns:
                    self.wrapped += 1
                    self.col = 0
                    self._move(1)
                    self._wrapped_row = True
                line = self.rows[self.row]
                line.extend(" " * (self.col + 1 - len(line)))
                line[self.col] = char
                self.col += 1
                self.widest = max(self.widest, self.col)
            i += 1
        return self

    def _move(self, rows: int) -> None:
        self._wrapped_row = False
        self.row = max(0, self.row + rows)
        while len(self.rows) <= self.row:
            self.rows.append([])

    def _escape(self, params: str, final: str) -> None:
        n = int(params) if params.isdigit() else 1
        if final == "K":
            del self.rows[self.row][self.col :]
        elif final == "A":
            self._move(-n)
        elif final == "B":
            self._move(n)

    def lines(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.rows]


def test_the_terminal_model_wraps_and_clears_like_a_terminal():
    screen = Screen(10).feed("0123456789X\r\nab\x1b[31mcd\x1b[0m\rA\x1b[K\n")
    assert screen.wrapped == 1 and screen.garbled == 0 and screen.widest == 10  # a long line, ended
    assert screen.lines() == ["0123456789", "X", "A", ""]
    redrawn = Screen(10).feed("0123456789X\r0123456789Y")  # a line too wide, drawn again
    assert redrawn.garbled == 1 and redrawn.lines() == ["0123456789", "0123456789", "Y"]


# ------------------------------------------------------------------ hivemind's children

HIVEMIND_CHILD = r"""
import logging, os, sys
from crowdtrain.peer.cli import configure_logging

configure_logging(sys.argv[1], "text")  # what `crowdtrain peer --log-level LEVEL` does first

from crowdtrain.peer.swarm.lifecycle import use_fork_start_method
from crowdtrain.peer.swarm.wiring import start_dht


async def speak(dht, node):  # runs inside the DHT's process, forked from this one
    chatter = logging.getLogger("hivemind.averaging.matchmaking")
    chatter.info("Another look_for_group is already in progress. (said by the test)")
    chatter.warning("a warning in hivemind's child (said by the test)")
    return os.getpid()


use_fork_start_method()
# a new identity file: hivemind's p2p code says "Generating new identity" at INFO, in the child
dht = start_dht([], listen_host="127.0.0.1", identity_path=sys.argv[2], nat_port_map=False)
try:
    print("pids", os.getpid(), dht.run_coroutine(speak), flush=True)
finally:
    dht.shutdown()
"""


def _hivemind_child(tmp_path: Path, level: str) -> str:
    status, out = run_in_terminal(HIVEMIND_CHILD, level, str(tmp_path / "identity.key"))
    assert status == 0, out
    [(parent, child)] = re.findall(r"pids (\d+) (\d+)", out)
    assert parent != child  # the records below were made in a forked hivemind process
    return out


def test_hivemind_children_log_warnings_only_in_our_format_on_a_cleared_line(tmp_path: Path):
    """The review saw hivemind's INFO "Another look_for_group is already in progress" 39 times in 6
    minutes, colored, across the live line: hivemind's import reset its logger to INFO with its own
    handler, in the peer and in every process forked from it."""
    out = _hivemind_child(tmp_path, "info")
    assert "look_for_group" not in out and "Generating new identity" not in out
    assert not re.search(r"\[INFO\]| INFO hivemind|\[WARN\]", out)  # nothing in hivemind's own format
    assert re.search(
        re.escape(CLEAR_LINE) + r"\d\d:\d\d:\d\d WARNING hivemind\.averaging\.matchmaking: "
        r"a warning in hivemind's child \(said by the test\)\r?\n",
        out,
    )


def test_with_log_level_debug_hivemind_children_say_everything(tmp_path: Path):
    out = _hivemind_child(tmp_path, "debug")
    assert " INFO hivemind.averaging.matchmaking: Another look_for_group is already in progress" in out
    assert re.search(r" INFO hivemind\.p2p\.p2p_daemon: Generating new identity", out)


def test_hivemind_levels_follow_ours(monkeypatch):
    assert [hivemind_level(level) for level in (10, 20, 30, 40)] == [10, 30, 30, 40]
    hivemind_logging = types.SimpleNamespace(loglevel="INFO")  # as if hivemind were imported
    monkeypatch.setitem(sys.modules, "hivemind.utils.logging", hivemind_logging)
    hivemind_logger = logging.getLogger("hivemind")
    before = hivemind_logger.level
    for name in ("HIVEMIND_LOGLEVEL", "GOLOG_LOG_LEVEL"):
        monkeypatch.setenv(name, "INFO")
    try:
        configure_hivemind_logging(logging.INFO)  # hivemind imported already: set now, and for children
        assert os.environ["HIVEMIND_LOGLEVEL"] == hivemind_logging.loglevel == "WARNING"
        assert os.environ["GOLOG_LOG_LEVEL"] == "WARN" and hivemind_logger.level == logging.WARNING
        configure_hivemind_logging(logging.DEBUG)
        assert os.environ["HIVEMIND_LOGLEVEL"] == "DEBUG" and hivemind_logger.level == logging.DEBUG
    finally:
        hivemind_logger.setLevel(before)  # setLevel: also clears the loggers' cached levels


def test_a_round_that_lost_a_sliver_is_quiet_and_a_bigger_loss_one_plain_warning():
    """hivemind said "Averaging: received 100.0% results" at WARNING when a peer left mid-round."""
    quiet_expected_averaging_failures()
    hivemind_logger, partition = (
        logging.getLogger("hivemind"),
        logging.getLogger("hivemind.averaging.partition"),
    )
    before = hivemind_logger.level
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelno)s %(message)s"))  # hivemind renames WARNING
    partition.addHandler(handler)  # once imported (by any earlier test in this process): the number
    try:
        for level in (logging.WARNING, logging.DEBUG):  # ours at info, then at debug
            hivemind_logger.setLevel(level)
            for share in (100.0, 62.5):  # as TensorPartReducer.finalize logs it
                partition.warning(f"Averaging: received {share:.1f}% results")
            partition.warning("something else")
    finally:
        partition.removeHandler(handler)
        hivemind_logger.setLevel(before)
    note = "% of the parts arrived (a peer was slow or left mid-round); what arrived was averaged"
    warning, debug = logging.WARNING, logging.DEBUG
    assert out.getvalue().splitlines() == [
        f"{warning} averaging round: 62.5{note}",
        f"{warning} something else",
        f"{debug} averaging round: 100.0{note}",
        f"{warning} averaging round: 62.5{note}",
        f"{warning} something else",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_record_starts_on_a_cleared_line_elsewhere_unchanged():
    for stream, formatter, starts in (
        (_Terminal(), logging.Formatter("%(levelname)s %(message)s"), CLEAR_LINE + "WARNING careful\n"),
        (io.StringIO(), logging.Formatter("%(levelname)s %(message)s"), "WARNING careful\n"),
        (_Terminal(), JsonFormatter(), '{"ts"'),  # JSON lines are for programs: nothing added
    ):
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "careful", (), None)
        record.levelname = "WARN"  # as named after hivemind's import
        handler = TerminalHandler(stream)
        handler.setFormatter(formatter)
        handler.emit(record)
        assert stream.getvalue().startswith(starts)
    assert '"level": "WARNING"' in stream.getvalue()


# ------------------------------------------------------------------ progress of long downloads

SHARD_DOWNLOAD = r"""
import hashlib, json, logging, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from crowdtrain.peer.cli import configure_logging

configure_logging("info", "text")

from crowdtrain.peer.data.shards import load_shard_blocks
from crowdtrain.peer.run.manifest import ShardSpec
from crowdtrain.peer.volunteer.meter import StatusLine

BODY = "".join(json.dumps({"text": f"document {i} " + "x" * 200}) + "\n" for i in range(6000)).encode()


class Slow(BaseHTTPRequestHandler):  # 1.4 MB in ~1.7 s
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        for i in range(0, len(BODY), 1 << 14):
            self.wfile.write(BODY[i : i + (1 << 14)])
            time.sleep(0.02)

    def log_message(self, *args):
        pass


class Tokenizer:  # one token a document
    def token_to_id(self, token):
        return 0

    def encode_batch(self, texts):
        return [type("Encoding", (), {"ids": [1]})() for _ in texts]


server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
threading.Thread(target=server.serve_forever, daemon=True).start()
shard = ShardSpec("train-00000.jsonl", hashlib.sha256(BODY).hexdigest(), len(BODY), 6000)
stopped = threading.Event()


def training(status):  # the training loop draws the live line while the read-ahead downloads
    while not stopped.wait(0.05):
        status.draw_paused("a reason long enough to fill the line " + "w" * 60, 7, 3)


log = logging.getLogger("test")
threading.Timer(0.7, lambda: log.warning("a log line in the middle of the download")).start()
with StatusLine(interval_s=0.0) as status:
    status.draw_paused("before the download", 7, 3)
    loop = threading.Thread(target=training, args=(status,))
    loop.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    load_shard_blocks(url, Path(sys.argv[1]), shard, Tokenizer(), 1, required=True)
    time.sleep(0.3)
    stopped.set()
    loop.join()
print()
"""


def test_a_shard_download_on_80_columns_is_one_bar_that_never_wraps(tmp_path: Path):
    status, out = run_in_terminal(SHARD_DOWNLOAD, str(tmp_path), columns=80)
    assert status == 0, out
    bar = "data shard train-00000.jsonl:"
    first, last = out.find(bar), out.rfind(bar)
    assert 0 < first < last, out  # a bar, redrawn as the bytes came
    assert re.search(r"\d+%\|[^\r\n]*\| [\d.]+[kM]?/1\.3\dM \[", out)
    redrawn = [s for s in re.split(r"[\r\n]", out) if bar in s or "PAUSED (" in s]
    assert max(len(_CSI.sub("", s)) for s in redrawn) <= 79  # never the last column
    screen = Screen(80).feed(out)
    assert screen.garbled == 0, screen.lines()
    # the live line waits while the bar holds the line (a draw already under way may land once)
    assert out[first:last].count("PAUSED (") <= 1
    lines = screen.lines()
    [logged] = [line for line in lines if "a log line in the middle" in line]
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING test: a log line in the middle of the download", logged)
    assert any(
        re.search(r"INFO crowdtrain\.peer\.data\.shards: data: train-00000\.jsonl, ", x) for x in lines
    )
    assert not any(bar in line for line in lines)  # the finished bar is cleared
    assert "PAUSED (" in out[last:]  # the live line is back once it is done


def test_off_a_terminal_progress_is_a_line_every_10_s_with_bytes_of_total_and_rate(caplog):
    now = [0.0]
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress(40_000_000, "data shard t.jsonl", log=log, terminal=False, clock=lambda: now[0]) as p:
            for _ in range(40):  # 1 MB a second for 40 s
                now[0] += 1.0
                p.update(1_000_000)
        with Progress(40_000_000, "cached", log=log, terminal=False, clock=lambda: now[0]):
            pass  # never updated (found in the cache): nothing shown
    assert [r.getMessage() for r in caplog.records] == [
        "data shard t.jsonl: 11.0MB of 40.0MB (28%), 1.10MB/s",  # the first chunk arrived at the start
        "data shard t.jsonl: 21.0MB of 40.0MB (52%), 1.00MB/s",
        "data shard t.jsonl: 31.0MB of 40.0MB (78%), 1.00MB/s",
    ]
    assert progress_text("x", 5_000, 0, 250.0) == "x: 5.00kB, 250B/s"  # size unknown


def test_the_swarm_state_download_shows_its_progress(monkeypatch, caplog):
    """stateload._download (in the averager process) counts the bytes of the donor's stream, out of
    the bytes of our own state; here off a terminal, a line every 10 s of a clock that ticks 4 s."""
    import torch
    from crowdtrain.peer.swarm import stateload

    from tests.test_state_wire import _joiner_reads, _messages, _parts

    ticks = iter(range(0, 10_000, 4))
    made: list[Progress] = []

    def recorded(*args, **kwargs):
        made.append(Progress(*args, **kwargs, terminal=False, clock=functools.partial(next, ticks)))
        return made[-1]

    monkeypatch.setattr(stateload, "Progress", recorded)
    state = [torch.randn(1024, 1024), torch.tensor([4.0])]
    with caplog.at_level(logging.INFO, logger=stateload.logger.name):
        _joiner_reads(_messages([part for t in state for part in _parts(t)]), state)
    [progress] = made
    assert progress.done_bytes == progress.total_bytes > 4 << 20
    lines = [r.getMessage() for r in caplog.records if r.name == stateload.logger.name]
    assert len(lines) > 10
    assert all(re.fullmatch(r"swarm state: \S+ of 4\.19MB \(\d+%\), \S+B/s", line) for line in lines)


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_a_bar_fits_the_terminal_as_it_is_now(columns, monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    width = [200]
    log = logging.getLogger("t")
    with Progress(10_000_000, "data shard train-00000.jsonl", log=log, width=lambda: width[0]) as progress:
        progress.update(3_000_000)
        width[0] = columns  # the terminal was resized
        progress.update(3_000_000)
        progress._bar.refresh()
    drawn = [segment for segment in re.split(r"[\r\n]", stream.getvalue()) if "data shard" in segment]
    assert len(drawn) >= 2 and drawn[-1].startswith(CLEAR_LINE[1:])  # no padding to the width before
    assert len(_CSI.sub("", drawn[-1])) == columns - 1  # a bar with a total fills the width it has
