"""The live status line's text (fitted to the terminal, no absurd numbers, PAUSED while paused) and
how often the epoch line is logged, without a terminal."""

from __future__ import annotations

import io
import logging
import math

import pytest
from crowdtrain.peer.events import JsonFormatter, writes_json
from crowdtrain.peer.volunteer.meter import (
    EpochLines,
    StatusLine,
    eta_text,
    fit_fields,
    standing_text,
    status_text,
)
from crowdtrain.protos import coordinator_pb2 as pb

STANDING = standing_text(
    pb.HeartbeatResponse(accepted_samples=12400, share=0.31, rank=2, ranked_peers=5), short=True
)
BUSY = (
    "other processes kept the machine busy; resuming once they stay below 50% for 60 s "
    "(now 93% cpu, 41 s to go)"
)


def _training(width: int, **overrides) -> str:
    numbers = dict(epoch=1234, loss=5.2311, samples_per_s=88.1, swarm_peers=12, eta_s=25.4, standing=STANDING)
    return status_text(**{**numbers, **overrides}, width=width)


@pytest.mark.parametrize("width", [40, 80, 200])
def test_the_live_line_never_wraps(width):
    for text in (
        _training(width),
        _training(width, eta_s=math.inf),
        status_text(epoch=7, swarm_peers=3, standing=STANDING, paused_reason=BUSY, width=width),
        status_text(epoch=7, paused_reason="paused by SIGUSR1 (send SIGUSR2 to resume)", width=width),
    ):
        assert 0 < len(text) <= width - 1 and "\n" not in text and "\r" not in text


def test_the_least_important_fields_give_way_first():
    wide = _training(200)
    assert wide == (
        f"epoch 1234 | loss 5.231 | 88.1 samples/s | swarm 12 peers | next averaging in 25s | {STANDING}"
    )
    at_80 = _training(80)
    assert at_80.startswith("epoch 1234 | loss 5.231") and STANDING in at_80
    assert "next averaging" not in at_80  # the least important field goes first
    at_40 = _training(40)
    assert at_40.startswith("epoch 1234 | loss 5.231") and STANDING not in at_40
    # a less important but shorter field stays when a longer, more important one cannot
    assert fit_fields([("a" * 30, 9), ("b" * 30, 5), ("c", 1)], 40) == "a" * 30 + " | c"
    assert fit_fields([("x" * 100, 9)], 40) == "x" * 36 + "..."


def test_no_absurd_or_non_finite_number_is_shown():
    for eta in (2.56e22, math.inf, -math.inf, math.nan, None):
        assert eta_text(eta) == "next averaging: waiting for peers"
    assert eta_text(-3.0) == "next averaging in 0s"
    assert eta_text(25.4) == "next averaging in 25s" and eta_text(600) == "next averaging in 10min"
    for loss in (math.nan, math.inf):
        text = _training(200, loss=loss, samples_per_s=math.inf, eta_s=2.56e22)
        assert "loss - |" in text and "- samples/s" in text and "waiting for peers" in text
        assert "inf" not in text and "nan" not in text and "e+" not in text


def test_a_paused_peer_says_so_and_why():
    text = status_text(
        epoch=7,
        swarm_peers=3,
        standing=STANDING,
        paused_reason="paused by SIGUSR1 (send SIGUSR2 to resume)",
        width=200,
    )
    assert text.startswith("PAUSED (by SIGUSR1 (send SIGUSR2 to resume)) | epoch 7")
    assert "loss" not in text and "samples/s" not in text and STANDING in text
    narrow = status_text(epoch=7, paused_reason=BUSY, width=80)
    assert narrow.startswith("PAUSED (other processes kept the machine busy") and narrow.endswith("...")


def test_no_live_line_off_a_terminal(monkeypatch):
    """On a file or a pipe nothing is drawn: plain log lines only."""
    stream = io.StringIO()  # isatty() is False
    monkeypatch.setattr("sys.stderr", stream)
    with StatusLine(interval_s=0.0) as status:
        status.draw_paused("on battery", 3, 1)
        status.clear()
    assert stream.getvalue() == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_in_place_and_cleared_for_log_lines(monkeypatch):
    stream = _Tty()
    monkeypatch.setattr("sys.stderr", stream)
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with StatusLine(interval_s=0.0, width=lambda: 80) as status:
            status.draw_paused("paused by SIGUSR1 (send SIGUSR2 to resume)", 3, 1)
            logging.getLogger("crowdtrain.test").warning("a log line")
        assert handler.filters == []  # the `with` took its filter away
    finally:
        root.removeHandler(handler)
    out = stream.getvalue()
    assert out.startswith("\r\033[KPAUSED (by SIGUSR1")
    assert "\r\033[Ka log line\n" in out  # cleared first: the record starts at the margin


def test_the_live_line_waits_while_a_progress_bar_holds_the_line(monkeypatch):
    """A shard downloading on the read-ahead thread shows a bar; the live line is not drawn over it
    meanwhile, and is drawn again once the bar is gone."""
    from crowdtrain.peer.events import Progress

    stream = _Tty()
    monkeypatch.setattr("sys.stderr", stream)
    with StatusLine(interval_s=0.0, width=lambda: 80) as status:
        with Progress(
            1000, "data shard train-00001.jsonl", log=logging.getLogger("t"), width=lambda: 80
        ) as bar:
            bar.update(500)
            status.draw_paused("on battery", 3, 1)
            assert "PAUSED" not in stream.getvalue()
        status.draw_paused("on battery", 3, 1)
    assert "data shard train-00001.jsonl" in stream.getvalue()
    assert (
        stream.getvalue().removesuffix("\r\033[K").endswith("PAUSED (on battery) | epoch 3 | swarm 1 peers")
    )


def test_epoch_lines_are_thinned_on_text_logs_but_every_one_stays_in_json():
    now = [0.0]
    text = EpochLines(every_s=30.0, clock=lambda: now[0], json_logs=lambda: False)
    levels = []
    for _ in range(12):  # an epoch every 5 s for a minute
        levels.append(text.level())
        now[0] += 5.0
    assert levels.count(logging.INFO) == 2 and levels[0] == logging.INFO and levels[6] == logging.INFO
    as_json = EpochLines(every_s=30.0, clock=lambda: now[0], json_logs=lambda: True)
    assert {as_json.level() for _ in range(12)} == {logging.INFO}


def test_json_logs_are_recognised_through_the_logger_hierarchy():
    parent = logging.getLogger("test-json-parent")
    child = logging.getLogger("test-json-parent.child")
    handler = logging.StreamHandler(io.StringIO())
    parent.handlers[:] = [handler]
    parent.propagate = False
    try:
        assert not writes_json(child)
        handler.setFormatter(JsonFormatter())
        assert writes_json(child)
        child.propagate = False
        assert not writes_json(child)
    finally:
        child.propagate = True
        parent.handlers[:] = []
        parent.propagate = True


def test_the_pause_gate_keeps_the_paused_line_up_while_it_waits(monkeypatch):
    import threading

    from crowdtrain.peer.link.heartbeat import StatsBox
    from crowdtrain.peer.volunteer.pause_gate import PauseGate

    from tests.test_pausing import Monitor, Optimizer, Tracker

    monkeypatch.setattr("crowdtrain.peer.volunteer.pause_gate.HAND_IN_POLL_S", 0.0)
    opt = Optimizer(epoch=5, pending=0, tracker=Tracker(swarm_epoch=5), round_after_steps=99)
    shown = []
    gate = PauseGate(Monitor(), StatsBox(), threading.Event())
    gate.wait(opt, resync=lambda: None, show=shown.append)
    assert len(shown) >= 2 and set(shown) == {"paused by SIGUSR1 (send SIGUSR2 to resume)"}
