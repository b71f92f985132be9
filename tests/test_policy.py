"""The coordinator's decisions are pure functions: tables of (now, state) -> (decision, reason)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from crowdtrain.coordinator.errors import (
    BannedError,
    InvalidRequestError,
    NotFoundError,
    UnauthenticatedError,
)
from crowdtrain.coordinator.limits import REQUEST_LIMITS, check_value
from crowdtrain.coordinator.peers import policy
from crowdtrain.coordinator.peers.groups import GroupReport
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.policy import Admission
from crowdtrain.peer.checks import version_verdict
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.run.report import PeerReport
from crowdtrain.protos import coordinator_pb2 as pb

HEALTH = HealthSettings(heartbeat_interval_s=5.0, heartbeat_timeout_s=20.0)
NOW = 1000.0


TOKEN = "t" * 43


def peer(session_id: str = "s1", **changes) -> PeerRecord:
    """A peer that heartbeats on time and trains under a DHT identity it proved and that the swarm's
    progress records confirm, unless `changes` say otherwise."""
    return PeerRecord(
        session_id=session_id,
        name=changes.pop("name", session_id),
        joined_unix_s=changes.pop("joined_unix_s", NOW - 100),
        last_seen_unix_s=changes.pop("last_seen_unix_s", NOW - 1),
        phase=changes.pop("phase", "training"),
        token_sha256=changes.pop("token_sha256", policy.token_sha256(TOKEN)),
        dht_peer_id=changes.pop("dht_peer_id", f"Qm{session_id}"),
        dht_verified=changes.pop("dht_verified", True),
        dht_last_seen_unix_s=changes.pop("dht_last_seen_unix_s", NOW - 2),
        **changes,
    )


@pytest.mark.parametrize(
    ("record", "token", "banned_dht", "admission", "reason", "error"),
    [
        (None, TOKEN, (), Admission.UNKNOWN_SESSION, "unknown session 's1'; join again", NotFoundError),
        (peer(), "", (), Admission.BAD_TOKEN, "wrong or missing session_token", UnauthenticatedError),
        (peer(), "u" * 43, (), Admission.BAD_TOKEN, "wrong or missing session_token", UnauthenticatedError),
        (peer(token_sha256=""), "", (), Admission.BAD_TOKEN, "missing session_token", UnauthenticatedError),
        (peer(banned=True), TOKEN, (), Admission.BANNED, "banned by the operator", BannedError),
        (peer(), TOKEN, ("Qms1",), Admission.BANNED, "banned by the operator", BannedError),  # its DHT key
        (peer(dht_verified=False), TOKEN, ("Qms1",), Admission.ADMITTED, "token matches", None),  # a claim
        (
            peer(left_unix_s=NOW - 5),
            TOKEN,
            (),
            Admission.ADMITTED,
            "token matches",
            None,
        ),  # back after leaving
        (peer(), TOKEN, (), Admission.ADMITTED, "session known, token matches, not banned", None),
    ],
)
def test_admit_session_and_the_error_of_each_refusal(record, token, banned_dht, admission, reason, error):
    decision = policy.admit_session("s1", record, token, frozenset(banned_dht))
    assert decision[0] is admission and reason in decision[1]
    if error is None:
        policy.require_admitted(decision)
    else:
        with pytest.raises(error, match=reason):
            policy.require_admitted(decision)


@pytest.mark.parametrize(
    ("record", "pruned", "reason"),
    [
        (peer(joined_unix_s=NOW - 121), True, "never heartbeated (limit 120s)"),
        (peer(joined_unix_s=NOW - 60), False, "within 120s"),
        (peer(joined_unix_s=NOW - 999, last_heartbeat_unix_s=NOW - 998), False, "heartbeated"),
        (peer(joined_unix_s=NOW - 999, banned=True), False, "banned"),
        (peer(joined_unix_s=NOW - 999, source="dht"), False, "known from the DHT"),
    ],
)
def test_never_heartbeated(record, pruned, reason):
    got, why = policy.never_heartbeated(NOW, record, 120.0)
    assert got is pruned and reason in why


# a groupmate of another admission root averaged with identities Qms1 and Qms2 five seconds ago
CONFIRMED = (GroupReport("g1", "Qmmate", "invite:mate", 3, frozenset({"Qms1", "Qms2", "Qmmate"}), NOW - 5),)


@pytest.mark.parametrize(
    ("peers", "latest", "groups", "step", "reason"),
    [
        ([peer()], None, (), 0, "no checkpoint published yet"),
        ([], None, (), 0, "no checkpoint published yet"),
        ([], 12, (), 12, "start from checkpoint 12"),
        ([peer()], 12, CONFIRMED, 0, "peers are training"),
        # its own progress record and "training" heartbeats are its own word
        ([peer()], 12, (), 12, "nobody is training that a groupmate of another identity confirmed"),
        ([peer()], 12, [dataclasses.replace(CONFIRMED[0], reporter="Qms1")], 12, "nobody"),  # its own account
        # trainers of several roots: only a groupmate of another root confirms
        (
            [peer(admission_root="invite:mate"), peer("s3", admission_root="invite:3")],
            12,
            CONFIRMED,
            12,
            "root",
        ),
        (
            [peer(), peer("s3", admission_root="invite:3")],
            12,
            CONFIRMED,
            0,
            "another admission root confirmed",
        ),
        ([peer()], 12, [dataclasses.replace(CONFIRMED[0], t=NOW - 46)], 12, "within 45s"),  # too old
        ([peer(phase="loading_state")], 12, CONFIRMED, 12, "nobody is training"),  # a joiner is no source
        ([peer(last_seen_unix_s=NOW - 11)], 12, CONFIRMED, 12, "nobody is training"),  # stale
        ([peer(left_unix_s=NOW - 1)], 12, CONFIRMED, 12, "nobody is training"),
        ([peer(banned=True)], 12, CONFIRMED, 12, "nobody is training"),
        (
            [peer(source="dht", last_seen_unix_s=NOW - 15)],
            12,
            CONFIRMED,
            12,
            "nobody is training",
        ),  # DHT-only
        ([peer(last_seen_unix_s=NOW - 30), peer("s2")], 12, CONFIRMED, 0, "peers are training"),
        # a heartbeat saying "training" is not enough: a proven identity the records confirm is
        ([peer(dht_verified=False)], 12, CONFIRMED, 12, "nobody is training"),
        ([peer(dht_last_seen_unix_s=None)], 12, CONFIRMED, 12, "nobody is training"),
        ([peer(dht_last_seen_unix_s=NOW - 60)], 12, CONFIRMED, 12, "nobody is training"),  # left the records
    ],
)
def test_resume_step(peers, latest, groups, step, reason):
    got, why = policy.resume_step(NOW, peers, latest, HEALTH, groups)
    assert got == step and reason in why


HB = REQUEST_LIMITS["HeartbeatRequest"]


@pytest.mark.parametrize(
    ("field", "value", "kept", "error"),
    [
        ("name", "x" * 64, "x" * 64, None),
        ("name", "x" * 65, "x" * 64, None),  # display text is cut
        ("name", "carol\n2026-11-28 INFO forged line", "carol 2026-11-28 INFO forged line", None),
        ("name", "\x1b[31mred\x1b[0m \u202eevil", "[31mred[0m evil", None),  # no ESC, no bidi override
        ("name", "\uff21lice\u00a0 ", "Alice", None),  # NFKC, whitespace trimmed
        ("device", "d" * 500, "d" * 64, None),
        ("phase", "training", "training", None),
        ("phase", "", "", None),
        ("phase", "p" * 33, None, "phase \\(HeartbeatRequest\\) is 'ppp.*'; it must be one of joining"),
        (
            "dht_peer_id",
            "Q" * 500,
            None,
            "dht_peer_id \\(HeartbeatRequest\\) has 500 characters, more than the 128",
        ),
        ("dht_peer_id", "Qm0OIl", None, "must be base58"),
        ("session_id", "s" * 65, None, "more than the 32 the coordinator accepts"),
        ("session_id", "", None, "must be 32 lowercase hex digits"),
        ("local_epoch", 9_200_000_000_000_000_000, None, "outside the range 0..1.09951e\\+12"),
        ("samples_per_s", math.inf, None, "samples_per_s \\(HeartbeatRequest\\) is inf, outside"),
        ("samples_per_s", math.nan, 0.0, None),  # NaN: unknown
        ("loss", math.inf, math.nan, None),  # a diverged loss is unknown, not a refusal
        ("dht_public_key", b"k" * 1025, None, "1025 bytes, more than the 1024"),
    ],
)
def test_check_value_cleans_display_text_and_refuses_everything_else_outside_its_limit(
    field, value, kept, error
):
    if error is None:
        got = check_value("HeartbeatRequest", field, value, HB[field])
        assert got == kept or (isinstance(kept, float) and math.isnan(kept) and math.isnan(got))
    else:
        with pytest.raises(InvalidRequestError, match=error):
            check_value("HeartbeatRequest", field, value, HB[field])


def test_checked_report_keeps_a_sane_report():
    request = pb.HeartbeatRequest(
        session_id="0" * 32, phase="training", name="a", loss=1.0, samples_total=5, local_epoch=3
    )
    report = policy.checked_report(request)
    assert report == PeerReport(phase="training", name="a", loss=1.0, samples_total=5, local_epoch=3)


@pytest.mark.parametrize(
    ("before", "sent", "kept", "reason"),
    [
        (
            {"samples_total": 100, "samples_per_s": 10.0},
            {"samples_total": 300, "samples_per_s": 10.0},
            300,
            "within",
        ),
        # 10 samples/s for 10 s allow 2 * 100 more, plus the slack of 4096
        (
            {"samples_total": 100, "samples_per_s": 10.0},
            {"samples_total": 10**9, "samples_per_s": 10.0},
            4396,
            "kept 4396",
        ),
        ({}, {"samples_total": 2**50, "samples_per_s": 0.0}, 4096, "more than its 0.0 samples/s allow"),
    ],
)
def test_plausible_samples_total(before, sent, kept, reason):
    record = peer(last_heartbeat_unix_s=NOW - 10, **before)
    got, why = policy.plausible_samples_total(NOW, record, PeerReport(**sent))
    assert got == kept and reason in why


def test_apply_report_keeps_known_text_and_marks_the_peer_seen():
    before = peer(
        name="alice", device="cpu", dht_peer_id="Qm", left_unix_s=NOW - 50, left_reason="bye", loss=3.0
    )
    after = policy.apply_report(
        NOW + 7, before, PeerReport(phase="loading_state", name="", samples_total=9, local_epoch=2)
    )
    assert (after.name, after.device, after.dht_peer_id) == ("alice", "cpu", "Qm")  # empty: unchanged
    assert (after.phase, after.samples_total, after.local_epoch) == ("loading_state", 9, 2)
    assert after.last_heartbeat_unix_s == NOW + 7 and after.dht_verified  # same DHT id: still proven
    assert math.isnan(after.loss)  # a number is always the latest report's, NaN (unknown) included
    assert (after.last_seen_unix_s, after.left_unix_s, after.left_reason) == (NOW + 7, None, "")
    assert (after.session_id, after.joined_unix_s, after.shard_index) == (
        before.session_id,
        before.joined_unix_s,
        0,
    )


@pytest.mark.parametrize(
    ("admitted", "claimed", "same", "reason"),
    [
        ("QmA", "QmA", True, "the identity it joined with"),
        ("QmA", "", True, "the identity it joined with"),  # not reported yet: nothing claimed
        ("QmA", "QmOther", False, "a session never changes identity"),  # was: re-proven under the new id
        ("", "QmA", False, "joined without naming its identity"),
        ("", "", False, "joined without naming its identity"),
    ],
)
def test_a_session_never_switches_the_identity_it_joined_with(admitted, claimed, same, reason):
    ok, why = policy.identity_verdict(peer(admitted_dht_id=admitted), PeerReport(dht_peer_id=claimed))
    assert ok is same and reason in why


@pytest.mark.parametrize(
    "peer_version, minimum, allowed, reason",
    [
        ("0.1.0", "0.1", True, "0.1.0 >= 0.1"),
        ("0.2.3", "0.2", True, "0.2.3 >= 0.2"),
        ("0.1.9", "0.2", False, ">= 0.2 the way you installed it: `pipx upgrade crowdtrain`"),
        ("0.2.0rc1", "0.2", False, "this run needs crowdtrain >= 0.2 and this peer runs 0.2.0rc1"),
        ("0.0.1", "", True, "no minimum version"),
        ("", "0.2", True, "unreadable: not checked"),  # not a defence: a client may claim anything
        ("bench", "0.2", True, "unreadable: not checked"),
    ],
)
def test_version_verdict(peer_version, minimum, allowed, reason):
    ok, why = version_verdict(peer_version, minimum)
    assert ok is allowed and reason in why
    assert "crowdtrain>=" not in why, "crowdtrain is on no index: a bare requirement installs nothing"


@pytest.mark.parametrize(
    "configured, own, minimum",
    [("", "0.1.0", "0.1"), ("", "1.4.2", "1.4"), ("0.2.1", "0.1.0", "0.2.1"), ("", "0+unknown", "")],
)
def test_the_minimum_peer_version_defaults_to_the_coordinator_s_own_major_minor(configured, own, minimum):
    assert policy.minimum_peer_version(configured, own) == minimum


def test_a_minimum_peer_version_that_is_not_a_version_is_refused_at_start():
    with pytest.raises(CrowdtrainError, match="--min-peer-version 'latest' is not a version number"):
        policy.minimum_peer_version("latest", "0.1.0")
