"""Peer health is a pure function of (now, record, settings): move the clock, assert the reason."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from crowdtrain.coordinator.peers.health import (
    HealthSettings,
    PeerRecord,
    PeerState,
    compute_state,
    contribution,
    is_online,
)

SETTINGS = HealthSettings(heartbeat_interval_s=5.0, heartbeat_timeout_s=20.0, contribution_grace_s=45.0)
BASE = PeerRecord(
    session_id="s",
    name="n",
    joined_unix_s=1000.0,
    last_seen_unix_s=1000.0,
    phase="training",
    dht_peer_id="Qm",
    dht_last_seen_unix_s=1000.0,
)


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
        (1001.0, {"banned": True}, PeerState.BANNED, "banned by the operator"),
        (1001.0, {"banned": True, "left_unix_s": 1000.0}, PeerState.BANNED, "refused"),
        # heartbeats arrive, but the swarm's own records disagree
        (
            1050.0,
            {"last_seen_unix_s": 1049.0},
            PeerState.ONLINE,
            "not contributing: heartbeats arrive but it left",
        ),
        (
            1050.0,
            {"last_seen_unix_s": 1049.0, "dht_last_seen_unix_s": None},
            PeerState.ONLINE,
            "never appeared in the swarm's progress records",
        ),
        # known only from the DHT: liveness comes from its progress record, no STALE step
        (1015.0, {"source": "dht"}, PeerState.ONLINE, "training at"),
        (1021.0, {"source": "dht"}, PeerState.DEAD, "no progress record for 21s"),
    ],
)
def test_transitions(now, changes, state, reason):
    got_state, got_reason = compute_state(now, dataclasses.replace(BASE, **changes), SETTINGS)
    assert got_state is state
    assert reason in got_reason


def test_every_state_is_reachable_and_every_combination_has_a_reason():
    seen = set()
    for banned, left, phase, silent, dht_seen, source in itertools.product(
        (False, True),
        (None, 990.0),
        ("joining", "loading_state", "training", "paused"),
        (0.0, 11.0, 25.0),
        (None, 1000.0),
        ("heartbeat", "dht"),
    ):
        record = dataclasses.replace(
            BASE,
            banned=banned,
            left_unix_s=left,
            phase=phase,
            last_seen_unix_s=1000.0,
            dht_last_seen_unix_s=dht_seen,
            source=source,
        )
        state, reason = compute_state(1000.0 + silent, record, SETTINGS)
        assert reason, (state, record)
        assert is_online(1000.0 + silent, record, SETTINGS) == (state is PeerState.ONLINE), (state, record)
        seen.add(state)
    assert seen == set(PeerState)


def test_contribution_is_granted_within_the_grace_period_only():
    fresh = dataclasses.replace(BASE, dht_last_seen_unix_s=None, joined_unix_s=1000.0)
    assert contribution(1040.0, fresh, SETTINGS)[0]  # just joined: not yet expected in the DHT
    assert not contribution(1046.0, fresh, SETTINGS)[0]
    assert not contribution(1001.0, dataclasses.replace(BASE, phase="loading_state"), SETTINGS)[0]
