"""Evidence against peers and automatic bans, in process (gRPC and HTTP on 127.0.0.1:0, injected
clock), and the decision as a pure table. Before admission existed the coordinator ignored
`HeartbeatRequest.rejections` whatever they held (1,000 garbage entries were accepted), banned no
one however many peers reported it, and a capped sample claim was invisible in every view. So that
fake evidence frames nobody, a report now counts only from a proven token holder at least
`min_reporter_age_s` into its session, confirmed by a groupmate of another admission root, and the
action needs distinct roots."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.admission.bans import AutobanSettings, Report, autoban_decision
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.limits import MAX_REJECTIONS_PER_HEARTBEAT
from crowdtrain.protos import coordinator_pb2 as pb

from tests import test_admission
from tests.identities import identity
from tests.test_admission import DENIED
from tests.test_hostile_peers import refused

coordinator = test_admission.coordinator  # the fixture: a coordinator on 127.0.0.1:0
SETTINGS = AutobanSettings(min_reporters=2, min_reports=3, window_s=600.0)
A, B, C, M = ("QmReporterA", "QmReporterB", "QmReporterC", "QmMallory")
AGE_S = AutobanSettings().min_reporter_age_s  # a reporter's evidence counts from this far into its session


def reports(*rows) -> list[Report]:
    """Reports of (reporter, offender, t), or (reporter, offender, t, admission root)."""
    return [Report(row[0], row[1], "nonfinite", row[2], *row[3:]) for row in rows]


@pytest.mark.parametrize(
    "rows, ban, reason",
    [
        ([(A, M, 990.0)] * 50, False, "from 1 distinct admission root(s)"),  # one reporter, however often
        ([(A, M, 990.0), (B, M, 995.0)], False, "action needs 3"),
        ([(A, M, 990.0), (B, M, 995.0), (B, M, 996.0)], True, "3 reports (nonfinite x3) from 2 independent"),
        (
            [(A, M, 300.0), (B, M, 350.0), (B, M, 996.0)],
            False,
            "from 1 distinct admission root(s) within 600s",
        ),
        ([(M, M, 990.0), (M, M, 991.0), (A, M, 992.0)], False, "from 1 distinct admission root(s)"),  # itself
        ([(A, B, 990.0), (C, B, 991.0), (A, B, 992.0), (A, M, 993.0)], False, "1 report(s)"),  # others
        ([(A, M, 990.0), (B, M, 991.0), (C, M, 992.0)], True, "from 3 independent peers"),
        # reporters admitted through one invite (or address, or allowlist entry) are one reporter
        (
            [(A, M, 990.0, "invite:1"), (B, M, 991.0, "invite:1"), (C, M, 992.0, "invite:1")],
            False,
            "1 distinct",
        ),
        (
            [(A, M, 990.0, "invite:1"), (B, M, 991.0, "invite:1"), (C, M, 992.0, "invite:2")],
            True,
            "from 2 indep",
        ),
    ],
)
def test_autoban_decision(rows, ban, reason):
    got, why = autoban_decision(M, reports(*rows), 1000.0, SETTINGS)
    assert got is ban and reason in why, why


def _report(c, joined, offender: str, epoch: int, kind: str = "nonfinite", **fields):
    rejection = pb.Rejection(
        offender=offender, kind=kind, detail="part 3 of 4 had 12 NaN", epoch=epoch, group_id=_group_id(epoch)
    )
    return c.beat(joined, rejections=[rejection], **fields)


def _group_id(epoch: int) -> bytes:
    return bytes([epoch + 1]) * 20  # hivemind's group ids are random bytes; one group per epoch here


def _groups(epochs, *members: int) -> list[pb.AveragingGroup]:
    """The all-reduce groups of test identities `members`, one per epoch."""
    ids = [identity(w).peer_id for w in members]
    return [pb.AveragingGroup(group_id=_group_id(e), epoch=e, members=ids) for e in epochs]


def _invited(c, name: str, who: int) -> pb.JoinResponse:
    """Test identity `who` joined with an invite of its own (its own admission root), proven."""
    code, _ = c.gate.invites.create(c.clock(), uses=1)
    joined = c.join(name, who=who, invite_code=code)
    assert c.prove(joined, who, phase="training").dht_verified
    return joined


def test_two_distinct_reporters_ban_the_offender_and_every_view_says_why(coordinator, tmp_path: Path):
    c = coordinator("invite")  # each peer its own invite: its own admission root (an open run quarantines)
    reporters = [_invited(c, f"honest{i}", who) for i, who in enumerate((1, 2))]
    mallory, mallory_id = _invited(c, "mallory", 3), identity(3).peer_id
    c.clock.now += AGE_S  # evidence counts from sessions this old
    for joined in reporters:  # each honest peer tells the groups it averaged in, mallory among them
        c.beat(joined, groups=_groups((5, 6, 7, 8), 1, 2, 3))
    for epoch in (5, 6, 7, 8):
        _report(c, reporters[0], mallory_id, epoch=epoch)
    assert not c.store.get_peer(mallory.session_id).banned  # one reporter: evidence, no ban
    assert c.stub.GetStatus(pb.GetStatusRequest(), timeout=5).peers  # status works meanwhile
    _report(c, reporters[1], mallory_id, epoch=6)
    assert not c.store.get_peer(mallory.session_id).banned  # two reporters, 5 reports: not yet (6)
    _report(c, reporters[1], mallory_id, epoch=7)
    record = c.store.get_peer(mallory.session_id)
    assert record.banned and record.ban_reason.startswith("banned automatically: 6 reports (nonfinite x6)")
    assert mallory_id in c.store.banned_dht_ids()
    refused(lambda: c.beat(mallory, phase="training"), DENIED, "banned automatically")
    code, _ = c.gate.invites.create(c.clock(), uses=1)
    refused(lambda: c.join("mallory again", who=3, invite_code=code), DENIED, "banned")  # a new session too
    status = {p.peer_id: p for p in c.stub.GetStatus(pb.GetStatusRequest(), timeout=5).peers}
    assert status[mallory.peer_id].state == "BANNED" and status[mallory.peer_id].rejections_against == 6
    assert "banned automatically" in status[mallory.peer_id].reason
    assert status[reporters[0].peer_id].rejections_against == 0
    # GET /api/v1/rejections: the evidence and the ban, newest first, beside the publisher's refusals
    c.store.add_rejection(c.clock() - 100, 4, "eval loss 9.0 is worse than the last published 4.25")
    context = WebContext(tmp_path, frozenset(), tmp_path / "ckpt", "{}", c.store, c.status)
    with WebServer(context, "127.0.0.1", 0) as web:
        with urllib.request.urlopen(f"http://127.0.0.1:{web.port}/api/v1/rejections", timeout=10) as r:
            rows = json.loads(r.read())
    assert [r["source"] for r in rows] == ["automatic_ban", *["peer_evidence"] * 6, "publisher"]
    assert rows[0]["offender"] == mallory_id and rows[0]["reason"] == record.ban_reason
    assert {r["reporter"] for r in rows if r["source"] == "peer_evidence"} == {
        identity(w).peer_id for w in (1, 2)
    }
    assert "NaN" in rows[1]["reason"] and rows[-1]["step"] == 4  # the publisher's rows keep their shape
    assert all(rows[i]["t"] >= rows[i + 1]["t"] for i in range(len(rows) - 1))


def test_one_reporter_cannot_frame_an_honest_peer_even_with_many_reports_and_sessions(coordinator):
    c = coordinator("invite")  # where the action would be a ban
    HONEST, FRAMER = 1, 2  # test identities
    honest, honest_id, framer_id = (
        _invited(c, "honest", HONEST),
        identity(HONEST).peer_id,
        identity(FRAMER).peer_id,
    )
    framer_code, _ = c.gate.invites.create(c.clock(), uses=1)
    sessions = [c.join(f"framer{i}", who=FRAMER, invite_code=framer_code) for i in range(3)]  # one identity
    for joined in sessions:
        assert c.prove(joined, FRAMER).dht_verified
    strangers = []  # unproven sessions
    for i in range(3):
        code, _ = c.gate.invites.create(c.clock(), uses=1)
        strangers.append((c.join(f"stranger{i}", who=10 + i, invite_code=code), identity(10 + i).peer_id))
    c.clock.now += AGE_S
    c.beat(honest, groups=_groups(range(5), HONEST, FRAMER))  # they did average together: confirmed
    for epoch in range(5):
        for joined in sessions:
            batch = [
                pb.Rejection(offender=honest_id, kind=f"kind{i}", epoch=epoch, group_id=_group_id(epoch))
                for i in range(MAX_REJECTIONS_PER_HEARTBEAT)
            ]
            c.clock.now += 1
            c.beat(joined, rejections=batch)
    # every report is confirmed by a groupmate of another root: only the framer's one root stops it
    assert len(c.evidence.counted_against(honest_id, c.clock())) == 5 * MAX_REJECTIONS_PER_HEARTBEAT
    assert not c.store.get_peer(honest.session_id).banned and honest_id not in c.store.banned_dht_ids()
    assert c.beat(honest, phase="training").dht_verified  # still welcome
    # unproven sessions' reports are not even kept, and nobody can report itself
    for stranger, stranger_id in strangers:
        _report(c, stranger, honest_id, epoch=1, dht_peer_id=stranger_id)  # claimed, unproven
    _report(c, sessions[0], framer_id, epoch=9)
    against = {p.peer_id: p.rejections_against for p in c.status().peers}
    assert against[honest.peer_id] == 5 * MAX_REJECTIONS_PER_HEARTBEAT  # deduplicated per epoch and kind
    assert against[sessions[0].peer_id] == 0


def test_oversize_or_garbage_evidence_is_refused_and_changes_nothing(coordinator):
    c = coordinator("open")
    reporter = c.join("reporter", who=1)
    c.prove(reporter, 1, phase="training")
    good = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    too_many = [
        pb.Rejection(offender=good, kind="nonfinite", epoch=i)
        for i in range(MAX_REJECTIONS_PER_HEARTBEAT + 1)
    ]
    refused(lambda: c.beat(reporter, rejections=too_many), invalid, "more than the 32 allowed")
    for bad, what in (
        (pb.Rejection(offender="../../etc/passwd", kind="x"), "offender"),
        (pb.Rejection(offender="", kind="x"), "offender"),
        (pb.Rejection(offender="Qm0OIl" * 8, kind="x"), "offender"),  # not base58
        (pb.Rejection(offender=good * 2, kind="x"), "offender"),  # too long
        (pb.Rejection(offender=good, kind="\x1b[31mred"), "kind"),
        (pb.Rejection(offender=good, kind=""), "kind"),
        (pb.Rejection(offender=good, kind="x", epoch=-1), "epoch"),
        (pb.Rejection(offender=good, kind="x", epoch=2**62), "epoch"),
        (pb.Rejection(offender=good, kind="x", group_id=b"g" * 65), "group_id"),
    ):
        refused(lambda b=bad: c.beat(reporter, rejections=[b]), invalid, f"rejections[0]: {what}")
    mine = identity(1).peer_id
    for bad, what in (
        ([pb.AveragingGroup(group_id=b"g" * 20, members=[mine])] * 17, "more than the 16 allowed"),
        ([pb.AveragingGroup(group_id=b"g" * 65, members=[mine])], "groups[0]: group_id"),
        ([pb.AveragingGroup(group_id=b"g" * 20, members=[mine, "../etc"])], "groups[0]: members[1]"),
        ([pb.AveragingGroup(group_id=b"g" * 20, members=[mine] * 65)], "groups[0]: members"),
        ([pb.AveragingGroup(group_id=b"g" * 20, epoch=-1, members=[mine])], "groups[0]: epoch"),
    ):
        refused(lambda b=bad: c.beat(reporter, groups=b), invalid, what)
    assert not c.store.query("SELECT * FROM averaging_groups")
    assert c.status().peers and not c.store.query("SELECT * FROM evidence")
    # display text is cleaned and cut, not refused (once the reporter is old enough to be heard)
    c.clock.now += AGE_S
    c.beat(reporter, rejections=[pb.Rejection(offender=good, kind="outlier", detail="\x1b[2J" + "d" * 999)])
    ((detail,),) = c.store.query("SELECT detail FROM evidence")
    assert detail == "[2J" + "d" * 197


def test_a_sample_claim_beyond_the_peers_throughput_is_capped_and_shown(coordinator):
    c = coordinator("open")
    liar = c.join("liar")
    c.beat(liar, phase="training", samples_per_s=1.0, samples_total=10)
    c.clock.now += 2
    c.beat(liar, phase="training", samples_per_s=1.0, samples_total=10**12)
    view = c.view(liar)
    assert view.computed_samples < 10_000 and "samples capped: claimed 1000000000000 samples" in view.reason
    status = {p.peer_id: p for p in c.stub.GetStatus(pb.GetStatusRequest(), timeout=5).peers}
    assert "samples capped" in status[liar.peer_id].reason
    honest = c.join("honest")
    c.beat(honest, phase="training", samples_per_s=100.0, samples_total=10)
    c.clock.now += 2
    c.beat(honest, phase="training", samples_per_s=100.0, samples_total=210)
    assert c.view(honest).computed_samples == 210 and "capped" not in c.view(honest).reason


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs a Chromium for playwright")
def test_the_dashboard_shows_reports_and_automatic_bans(coordinator, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    c = coordinator("invite")  # each its own invite: two admission roots report (an open run quarantines)
    evil = "<img src=x onerror=alert(1)>"
    peers = [_invited(c, name, who) for who, name in enumerate(("alice", "bob", evil), start=1)]
    offender = identity(3).peer_id
    c.clock.now += AGE_S
    for joined in peers[:2]:
        c.beat(joined, groups=_groups(range(6), 1, 2, 3))
    for epoch, joined in enumerate([peers[0], peers[1]] * 3):
        rejection = pb.Rejection(
            offender=offender, kind="outlier", detail=evil, epoch=epoch, group_id=_group_id(epoch)
        )
        c.beat(joined, rejections=[rejection])
    context = WebContext(tmp_path, frozenset(), tmp_path / "ckpt", "{}", c.store, c.status)
    dialogs = []
    with WebServer(context, "127.0.0.1", 0) as web, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://127.0.0.1:{web.port}/?refresh=60000")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            banned_row = page.locator(f"#peers tr[data-peer='{peers[2].peer_id}']")
            assert banned_row.get_attribute("data-state") == "BANNED"
            assert "banned automatically" in banned_row.inner_text() and "\t6\t" in banned_row.inner_text()
            assert page.locator("#evidence tr[data-source=automatic_ban]").count() == 1
            assert page.locator("#evidence tr[data-source=peer_evidence]").count() == 6
            assert evil in page.locator("#evidence").inner_text()  # shown as text, never run
        finally:
            browser.close()
    assert not dialogs
