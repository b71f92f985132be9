"""The coordinator's decisions are pure functions: tables of (now, state) -> (decision, reason)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from crowdtrain.coordinator import policy
from crowdtrain.coordinator.errors import BannedError, InvalidRequestError, NotFoundError
from crowdtrain.coordinator.policy import Admission
from crowdtrain.coordinator.registry import HealthSettings, PeerRecord
from crowdtrain.peer.report import LIMITS, PeerReport

HEALTH = HealthSettings(heartbeat_interval_s=5.0, heartbeat_timeout_s=20.0)
NOW = 1000.0


def peer(session_id: str = "s1", **changes) -> PeerRecord:
    """A peer that heartbeats on time and trains, unless `changes` say otherwise."""
    return PeerRecord(
        session_id=session_id,
        name=changes.pop("name", session_id),
        joined_unix_s=NOW - 100,
        last_seen_unix_s=changes.pop("last_seen_unix_s", NOW - 1),
        phase=changes.pop("phase", "training"),
        **changes,
    )


@pytest.mark.parametrize(
    ("name", "peers", "admission", "reason"),
    [
        ("alice", [], Admission.ADMITTED, "'alice' is not banned"),
        ("alice", [peer(name="alice")], Admission.ADMITTED, "not banned"),  # a returning volunteer
        ("alice", [peer(name="mallory", banned=True)], Admission.ADMITTED, "not banned"),
        (
            "mallory",
            [peer(name="mallory", banned=True)],
            Admission.BANNED,
            "'mallory' is banned by the operator",
        ),
        (
            "mallory",
            [peer(name="mallory"), peer("s2", name="mallory", banned=True)],
            Admission.BANNED,
            "banned",
        ),
    ],
)
def test_admit_join(name, peers, admission, reason):
    got, why = policy.admit_join(name, peers)
    assert got is admission and reason in why


@pytest.mark.parametrize(
    ("record", "admission", "reason", "error"),
    [
        (None, Admission.UNKNOWN_SESSION, "unknown session 's1'; join again", NotFoundError),
        (peer(banned=True), Admission.BANNED, "banned by the operator", BannedError),
        (peer(left_unix_s=NOW - 5), Admission.ADMITTED, "known and not banned", None),  # back after leaving
        (peer(), Admission.ADMITTED, "session 's1' is known", None),
    ],
)
def test_admit_heartbeat_and_the_error_of_each_refusal(record, admission, reason, error):
    decision = policy.admit_heartbeat("s1", record)
    assert decision[0] is admission and reason in decision[1]
    if error is None:
        policy.require_admitted(decision)
    else:
        with pytest.raises(error, match=reason):
            policy.require_admitted(decision)


@pytest.mark.parametrize(
    ("known_peers", "num_shards", "shard", "reason"),
    [
        (0, 3, 0, "round robin: 0 peers joined before it, 3 shards"),
        (4, 3, 1, "4 peers joined before it"),
        (7, 1, 0, "1 shards"),
    ],
)
def test_assign_shard(known_peers, num_shards, shard, reason):
    got, why = policy.assign_shard(known_peers, num_shards)
    assert got == shard and reason in why


@pytest.mark.parametrize(
    ("peers", "latest", "step", "reason"),
    [
        ([peer()], None, 0, "no checkpoint published yet"),
        ([], None, 0, "no checkpoint published yet"),
        ([], 12, 12, "nobody is training: start from checkpoint 12"),
        ([peer()], 12, 0, "peers are training"),
        ([peer(phase="loading_state")], 12, 12, "nobody is training"),  # a joiner is not a source
        ([peer(last_seen_unix_s=NOW - 11)], 12, 12, "nobody is training"),  # stale
        ([peer(left_unix_s=NOW - 1)], 12, 12, "nobody is training"),
        ([peer(banned=True)], 12, 12, "nobody is training"),
        ([peer(source="dht", last_seen_unix_s=NOW - 15)], 12, 0, "peers are training"),  # DHT-only
        ([peer(last_seen_unix_s=NOW - 30), peer("s2")], 12, 0, "peers are training"),
    ],
)
def test_resume_step(peers, latest, step, reason):
    got, why = policy.resume_step(NOW, peers, latest, HEALTH)
    assert got == step and reason in why


@pytest.mark.parametrize(
    ("field", "value", "kept", "error"),
    [
        ("name", "x" * LIMITS.name, "x" * LIMITS.name, None),
        ("name", "x" * (LIMITS.name + 1), "x" * LIMITS.name, None),  # display text is cut
        ("device", "d" * 500, "d" * LIMITS.device, None),
        ("reason", "r" * 500, "r" * LIMITS.reason, None),
        ("phase", "training", "training", None),
        ("phase", "p" * (LIMITS.phase + 1), None, "phase has 33 characters, more than the 32"),
        ("dht_peer_id", "Q" * 500, None, "dht_peer_id has 500 characters"),
        ("session_id", "s" * 65, None, "more than the 64 the coordinator accepts"),
    ],
)
def test_bound_text_cuts_display_text_and_refuses_long_identifiers(field, value, kept, error):
    if error is None:
        assert policy.bound_text(field, value) == kept
    else:
        with pytest.raises(InvalidRequestError, match=error):
            policy.bound_text(field, value)


def test_every_text_field_of_a_report_has_a_limit():
    text = [f.name for f in dataclasses.fields(PeerReport) if isinstance(getattr(PeerReport(), f.name), str)]
    assert text and all(isinstance(getattr(LIMITS, name), int) for name in text)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (
            {"loss": 2.5, "samples_per_s": 3.0, "uptime_s": 9.0},
            {"loss": 2.5, "samples_per_s": 3.0, "uptime_s": 9.0},
        ),
        ({"loss": math.inf}, {"loss": math.nan}),  # NaN: unknown
        ({"loss": -1.0}, {"loss": math.nan}),
        ({"samples_per_s": math.nan, "uptime_s": -math.inf}, {"samples_per_s": 0.0, "uptime_s": 0.0}),
        (
            {"samples_per_s": -4.0, "local_epoch": -3, "samples_total": -1},
            {"samples_per_s": 0.0, "local_epoch": 0, "samples_total": 0},
        ),
        (
            {"name": "n" * 100, "version": "v" * 100},
            {"name": "n" * LIMITS.name, "version": "v" * LIMITS.version},
        ),
    ],
)
def test_bound_report_keeps_sane_numbers_and_text(sent, kept):
    got = policy.bound_report(PeerReport(**sent))
    for name, value in kept.items():
        assert getattr(got, name) == value or (math.isnan(value) and math.isnan(getattr(got, name))), name


def test_bound_report_returns_a_sane_report_unchanged():
    report = PeerReport(phase="training", name="a", loss=1.0, samples_total=5)
    assert policy.bound_report(report) is report


def test_bound_report_refuses_a_report_with_a_long_identifier():
    with pytest.raises(InvalidRequestError, match="dht_peer_id"):
        policy.bound_report(PeerReport(dht_peer_id="Q" * 200))


def test_apply_report_keeps_known_text_and_marks_the_peer_seen():
    before = peer(
        name="alice", device="cpu", dht_peer_id="Qm", left_unix_s=NOW - 50, left_reason="bye", loss=3.0
    )
    after = policy.apply_report(
        NOW + 7, before, PeerReport(phase="loading_state", name="", samples_total=9, local_epoch=2)
    )
    assert (after.name, after.device, after.dht_peer_id) == ("alice", "cpu", "Qm")  # empty: unchanged
    assert (after.phase, after.samples_total, after.local_epoch) == ("loading_state", 9, 2)
    assert math.isnan(after.loss)  # a number is always the latest report's, NaN (unknown) included
    assert (after.last_seen_unix_s, after.left_unix_s, after.left_reason) == (NOW + 7, None, "")
    assert (after.session_id, after.joined_unix_s, after.shard_index) == (
        before.session_id,
        before.joined_unix_s,
        0,
    )
