"""scripts/bench.py's pure parts: how a peer's samples/s is read from its events, and the table."""

from __future__ import annotations

import pytest

from scripts.bench import Row, _rate_between, markdown, tcp_loopback_mb_s


def _epoch(ts: float, samples: int) -> dict:
    return {"event": "epoch", "ts": ts, "samples_total": samples}


def test_rate_is_read_between_the_last_epochs_before_each_end_of_the_window():
    events = [_epoch(10.0, 100), {"event": "joined", "ts": 11.0}, _epoch(20.0, 300), _epoch(40.0, 700)]
    assert _rate_between(events, t0=15.0, t1=45.0) == pytest.approx((700 - 100) / 30.0)
    assert _rate_between(events, t0=25.0, t1=45.0) == pytest.approx((700 - 300) / 20.0)


def test_no_rate_without_two_epochs_in_the_window():
    events = [_epoch(10.0, 100), _epoch(20.0, 300)]
    assert _rate_between(events, t0=5.0, t1=45.0) is None  # nothing before the window opened
    assert _rate_between(events, t0=25.0, t1=45.0) is None  # no epoch after it opened


def test_the_table_marks_missed_goals():
    rows = [
        Row("a", "1.00", ">= 0.90", True),
        Row("b", "0.50", ">= 0.90", False),
        Row("c", "skipped", "-", None),
    ]
    text = markdown(rows, "python -m scripts.bench", images=[])
    assert "| a | 1.00 | >= 0.90 | yes |" in text
    assert "| b | 0.50 | >= 0.90 | NO |" in text
    assert "| c | skipped | - | - |" in text


def test_raw_tcp_moves_bytes_over_loopback():
    assert tcp_loopback_mb_s(8.0) > 1.0  # MB/s; a stalled or broken copy would hang or fail
