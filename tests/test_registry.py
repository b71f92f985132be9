"""Peer health is a pure function of (now, record, settings): move the clock, assert the reason."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.registry import HealthSettings, PeerRecord, PeerState, compute_state

SETTINGS = HealthSettings(heartbeat_interval_s=5.0, heartbeat_timeout_s=20.0)
BASE = PeerRecord(session_id="s", name="n", joined_unix_s=1000.0, last_seen_unix_s=1000.0, phase="training")


@pytest.mark.parametrize(
    ("now", "changes", "state", "reason"),
    [
        (1001.0, {}, PeerState.ONLINE, "training at"),
        (1001.0, {"phase": "loading_state"}, PeerState.JOINING, "loading state"),
        (1001.0, {"phase": "joining"}, PeerState.JOINING, "joining"),
        (1010.0, {}, PeerState.ONLINE, "training"),  # exactly 2 intervals: still on time
        (1010.5, {}, PeerState.STALE, "last heartbeat 10s ago"),
        (1020.0, {}, PeerState.STALE, "expected every 5s"),
        (1020.5, {}, PeerState.DEAD, "no heartbeat for 20s"),
        (5000.0, {"phase": "loading_state"}, PeerState.DEAD, "timeout 20s"),
        (1030.0, {"left_unix_s": 1025.0, "left_reason": "shutdown"}, PeerState.LEFT, "left 5s ago: shutdown"),
        (9999.0, {"left_unix_s": 1025.0}, PeerState.LEFT, "left"),
    ],
)
def test_transitions(now, changes, state, reason):
    got_state, got_reason = compute_state(now, dataclasses.replace(BASE, **changes), SETTINGS)
    assert got_state is state
    assert reason in got_reason
