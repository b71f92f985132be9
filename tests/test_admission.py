"""Admission (open, invite, allowlist) and swarm tokens, in process: gRPC on 127.0.0.1:0 with an
injected clock, pure decisions as tables, and `crowdtrain invite create|list|revoke`. Every refusal
here used to be an admission (no mode existed: anyone who reached Join was in, and no
peer got a swarm token)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator import cli
from crowdtrain.coordinator.admission.bans import AutobanSettings, EvidenceBook, counts_against
from crowdtrain.coordinator.admission.gate import (
    AdmissionConfigError,
    AdmissionSettings,
    Gate,
    admit_join,
    mint_token,
    openssh_public_key,
    parse_allowlist,
    still_admitted,
    token_decision,
)
from crowdtrain.coordinator.admission.invites import Invite, InviteBook, invite_usable
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.signing import new_key, public_key_hex
from crowdtrain.peer.admission.tokens import SwarmToken, parse_and_check, sign_token
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.identities import identity, signed_join
from tests.test_hostile_peers import Clock, refused

HEALTH = HealthSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=10.0)
RUN_ID = "ct_test_0001"
TTL_S = 600.0
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclasses.dataclass
class Coordinator:
    """A servicer on 127.0.0.1:0 with its store, clock, run key and admission."""

    stub: pb_grpc.CoordinatorStub
    store: Store
    clock: Clock
    run_key: object
    gate: Gate
    evidence: EvidenceBook

    @property
    def run_public_key(self) -> str:
        return public_key_hex(self.run_key)

    def join(self, name: str = "p", who: int | None = None, **fields) -> pb.JoinResponse:
        """Join as test identity `who` (`tests.identities`; a new one when None)."""
        return self.stub.Join(signed_join(name=name, who=who, now=self.clock(), **fields), timeout=5)

    def beat(self, joined: pb.JoinResponse, **fields) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(
            session_id=joined.session_id, session_token=joined.session_token, **fields
        )
        return self.stub.Heartbeat(request, timeout=5)

    def prove(self, joined: pb.JoinResponse, who: int, **fields) -> pb.HeartbeatResponse:
        """A heartbeat proving the DHT identity of test identity `who` (`tests.identities`)."""
        public, signature = identity(who).prove(joined.dht_challenge)
        return self.beat(
            joined,
            dht_peer_id=identity(who).peer_id,
            dht_public_key=public,
            dht_signature=signature,
            **fields,
        )

    def status(self):
        return build_status(
            self.clock(), RUN_ID, self.store.list_peers(), {}, HEALTH, SwarmProgress(), [],
            rejections_against=counts_against(self.store),
        )  # fmt: skip

    def view(self, joined: pb.JoinResponse):
        return next(p for p in self.status().peers if p.peer_id == joined.peer_id)


@pytest.fixture
def coordinator(tmp_path: Path):
    """`coordinator(mode, allowlist_path="")`: a started coordinator; all are stopped at the end."""
    started = []

    def start(mode: str = "open", allowlist_path: str = "", autoban: AutobanSettings | None = None):
        store, clock, run_key = (
            Store(tmp_path / f"s{len(started)}.sqlite3", flush_interval_s=0),
            Clock(),
            new_key(),
        )
        gate = Gate(
            AdmissionSettings(mode, allowlist_path, TTL_S),
            RUN_ID,
            lambda token: sign_token(run_key, token),
            InviteBook(store),
        )
        evidence = EvidenceBook(store, autoban or AutobanSettings(), mode)
        run = RunInfo('{"run": 1}', "abc", "{}", 3, "http://127.0.0.1:1", tmp_path / "checkpoints")
        c = Coordinator(None, store, clock, run_key, gate, evidence)
        servicer = CoordinatorServicer(
            run, store, HEALTH, initial_peers=list, clock=clock, status=c.status, gate=gate, evidence=evidence
        )
        server, port = create_server(servicer, "127.0.0.1", 0)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel, store))
        c.stub = pb_grpc.CoordinatorStub(channel)
        return c

    try:
        yield start
    finally:
        for server, channel, store in started:
            channel.close()
            server.stop(0).wait()
            store.close()


# ---------------------------------------------------------------- admission modes over gRPC


def test_open_mode_admits_anyone_and_says_so(coordinator):
    c = coordinator("open")
    assert c.join("stranger").admission == "open"
    assert c.join("another", invite_code="some-code-nobody-issued").admission == "open"


def test_invite_mode_needs_a_valid_unexpired_unrevoked_code_with_uses_left(coordinator):
    c = coordinator("invite")
    refused(lambda: c.join("no code"), DENIED, "pass --invite CODE")
    refused(lambda: c.join("guess", invite_code="A" * 32), DENIED, "not one of this run's")
    refused(
        lambda: c.join("bad", invite_code="x; DROP TABLE"), grpc.StatusCode.INVALID_ARGUMENT, "invite_code"
    )
    code, invite = c.gate.invites.create(c.clock(), uses=2, expires_in_s=3600, note="lab")
    assert [c.join(f"p{i}", invite_code=code).admission for i in range(2)] == ["invite", "invite"]
    refused(lambda: c.join("third", invite_code=code), DENIED, "used up")
    assert c.gate.invites.list()[0].uses_left == 0
    later, _ = c.gate.invites.create(c.clock(), uses=5, expires_in_s=60)
    c.clock.now += 61
    refused(lambda: c.join("late", invite_code=later), DENIED, "expired")
    revoked, revoked_invite = c.gate.invites.create(c.clock(), uses=5)
    assert c.gate.invites.revoke(revoked_invite.invite_id) == 0
    refused(lambda: c.join("revoked", invite_code=revoked), DENIED, "revoked")
    assert c.store.count_peers() == 2  # no refused joiner got a session


def test_a_volunteer_restarting_with_its_identity_keeps_its_single_use_invite(coordinator):
    c = coordinator("invite")
    code, invite = c.gate.invites.create(c.clock(), uses=1)
    mine, stranger = 1, 2  # test identities
    refused(lambda: c.join("unproven", who=mine, invite_code="B" * 32), DENIED, "not one of")
    first = c.join("alice", who=mine, invite_code=code)  # the use is bound to the key it signed with
    assert c.gate.invites.identities(invite.invite_id) == [identity(mine).peer_id]
    # its Join proved the key, so it may come back at once (was: only after a heartbeat's proof)
    again = c.join("alice again", who=mine, invite_code=code)
    assert c.prove(first, mine).swarm_token and c.prove(again, mine).swarm_token
    assert c.gate.invites.list()[0].uses_left == 0
    # someone who knows the code and alice's public key cannot sign her Join: no session at all
    thief = signed_join(who=stranger, now=c.clock(), name="thief", invite_code=code)
    thief.dht_public_key = identity(mine).public_key_protobuf
    refused(lambda: c.stub.Join(thief, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "join_signature")
    refused(lambda: c.join("other", who=stranger, invite_code=code), DENIED, "used up")
    keyless = pb.JoinRequest(name="keyless", invite_code=code)
    refused(lambda: c.stub.Join(keyless, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "dht_public_key")
    assert c.store.count_peers() == 2 and c.gate.invites.identities(invite.invite_id) == [
        identity(mine).peer_id
    ]


def test_an_invite_use_is_spent_atomically(tmp_path: Path):
    """Two coordinators' stores on one file (as `crowdtrain invite` beside a running coordinator):
    racing consumers of a 1-use code admit exactly one."""
    first, second = Store(tmp_path / "s.sqlite3", 0), Store(tmp_path / "s.sqlite3", 0)
    try:
        code, invite = InviteBook(first).create(100.0, uses=1)
        joiners = ("QmJoinerA", "QmJoinerB", "QmJoinerC")
        results = [
            InviteBook(s).consume(code, 101.0, who)
            for s, who in zip((first, second, first), joiners, strict=True)
        ]
        assert [invite is not None for invite, _ in results] == [True, False, False]
        assert "used up" in results[1][1]
        # the use is bound to the identity that spent it: that one comes back, from either store
        assert InviteBook(second).consume(code, 102.0, "QmJoinerA")[0] is not None
        assert InviteBook(second).identities(invite.invite_id) == ["QmJoinerA"]
    finally:
        first.close()
        second.close()


def test_revoking_an_invite_ends_its_sessions_and_stops_their_tokens(coordinator):
    c = coordinator("invite")
    code, invite = c.gate.invites.create(c.clock(), uses=3)
    other_code, _ = c.gate.invites.create(c.clock(), uses=1)
    revoked_peer, kept_peer = c.join("a", who=1, invite_code=code), c.join("b", who=2, invite_code=other_code)
    assert c.prove(revoked_peer, 1).swarm_token
    assert c.prove(kept_peer, 2).swarm_token
    assert c.gate.invites.revoke(invite.invite_id) == 1
    refused(lambda: c.beat(revoked_peer, phase="training"), DENIED, f"invite {invite.invite_id} was revoked")
    assert c.view(revoked_peer).state == "BANNED" and "revoked" in c.view(revoked_peer).reason
    c.clock.now += TTL_S  # the kept peer's token is due: renewed; the revoked one's never is
    assert c.beat(kept_peer, phase="training").swarm_token


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time_ns() + 10**9 * (1 + len(text))  # a new mtime even within the clock's resolution
    os.utime(path, ns=(stamp, stamp))


def test_allowlist_mode_admits_listed_keys_and_binds_the_proof_to_the_key(coordinator, tmp_path: Path):
    listed, unlisted, other = 1, 2, 3  # test identities
    allowlist = tmp_path / "allowlist.txt"
    _write(allowlist, f"# volunteers of the lab\n{identity(listed).peer_id}  # alice\nnot-a-peer-id\n\n")
    c = coordinator("allowlist", str(allowlist))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    refused(lambda: c.stub.Join(pb.JoinRequest(name="keyless"), timeout=5), invalid, "dht_public_key")
    refused(lambda: c.join("unlisted", who=unlisted), DENIED, "not on this run's allowlist")
    garbage = signed_join(name="garbage")
    garbage.dht_public_key = b"\x01\x02"
    refused(lambda: c.stub.Join(garbage, timeout=5), invalid, "dht_public_key")
    joined = c.join("alice", who=listed)
    assert joined.admission == "allowlist"
    # a session admitted for the listed key claiming another key is refused, and gets no token
    impostor = c.join("alice again", who=listed)
    refused(lambda: c.prove(impostor, other), invalid, "never changes identity")
    assert not c.store.get_peer(impostor.session_id).dht_verified
    assert c.prove(joined, listed).swarm_token
    # the file is re-read when it changes: removed -> refused and no token; added -> admitted
    _write(allowlist, f"{identity(unlisted).peer_id}\n")
    refused(lambda: c.beat(joined, phase="training"), DENIED, "removed from this run's allowlist")
    assert c.join("bob", who=unlisted).admission == "allowlist"


def test_admission_settings_refuse_what_cannot_work(tmp_path: Path):
    with pytest.raises(AdmissionConfigError, match="not one of open, invite, allowlist"):
        AdmissionSettings("closed")
    with pytest.raises(AdmissionConfigError, match="--allowlist-path"):
        AdmissionSettings("allowlist")
    with pytest.raises(AdmissionConfigError, match="does not exist"):
        Gate(AdmissionSettings("allowlist", str(tmp_path / "missing")), RUN_ID, None)


# ---------------------------------------------------------------- swarm tokens


def test_a_swarm_token_is_issued_only_after_proof_verifies_and_is_renewed_only_when_due(coordinator):
    c = coordinator("open")
    ident = identity(1)
    joined = c.join("alice", who=1)
    assert (
        c.beat(joined, phase="training", dht_peer_id=ident.peer_id).swarm_token == ""
    )  # claimed, not proven
    text = c.prove(joined, 1).swarm_token
    token, reason = parse_and_check(text, RUN_ID, c.run_public_key, c.clock(), peer_id=ident.peer_id)
    assert token is not None, reason
    assert token.public_key == openssh_public_key(ident.public_key_protobuf)
    assert token.expires_unix_s == pytest.approx(c.clock() + TTL_S, abs=0.001)  # kept to the ms
    other_run_key = public_key_hex(new_key())
    assert parse_and_check(text, RUN_ID, other_run_key, c.clock())[0] is None  # only the run's key
    assert parse_and_check(text, "ct_other", c.run_public_key, c.clock())[0] is None
    c.clock.now += TTL_S / 2 - 5
    assert c.beat(joined).swarm_token == ""  # more than half its lifetime left: not re-sent
    c.clock.now += 10
    renewed, _ = parse_and_check(c.beat(joined).swarm_token, RUN_ID, c.run_public_key, c.clock())
    assert renewed is not None and renewed.expires_unix_s > token.expires_unix_s


def test_no_swarm_token_for_a_banned_identity(coordinator):
    c = coordinator("open")
    assert c.prove(c.join("mallory", who=1), 1).swarm_token
    assert c.store.set_banned(identity(1).peer_id, True) == 1
    refused(lambda: c.join("mallory again", who=1), DENIED, "banned")  # its Join names the banned key


def test_the_token_key_is_exactly_hiveminds_rsa_public_key_bytes():
    from cryptography.hazmat.primitives import serialization
    from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

    hivemind_key = RSAPrivateKey()
    der = hivemind_key.get_public_key()._public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    libp2p = b"\x08\x00\x12" + bytes([0x80 | (len(der) & 0x7F), len(der) >> 7]) + der
    assert openssh_public_key(libp2p) == hivemind_key.get_public_key().to_bytes()
    assert RSAPublicKey.from_bytes(openssh_public_key(libp2p)).to_bytes() == openssh_public_key(libp2p)
    run_key = new_key()
    # mint_token (the coordinator's own DHT nodes): from a hivemind key, a cryptography key, OpenSSH bytes
    for key in (hivemind_key, hivemind_key._private_key, hivemind_key.get_public_key().to_bytes()):
        minted = mint_token(
            run_key, RUN_ID, key, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", 60, now=1000.0
        )
        checked, reason = parse_and_check(minted.to_json(), RUN_ID, public_key_hex(run_key), 1030.0)
        assert checked == minted and minted.public_key == openssh_public_key(libp2p), reason
    assert parse_and_check(minted.to_json(), RUN_ID, public_key_hex(run_key), 1060.0)[0] is None  # expired


# ---------------------------------------------------------------- pure decisions


def _record(**kw) -> PeerRecord:
    base = dict(
        session_id="s", joined_unix_s=0.0, last_seen_unix_s=0.0, dht_peer_id="QmA", proven_key_hex="08"
    )
    return PeerRecord(**{**base, **kw})


@pytest.mark.parametrize(
    "record, allowed, banned, last, issue, reason",
    [
        (_record(), (True, ""), frozenset(), None, False, "not proven"),
        (_record(dht_verified=True), (True, ""), frozenset(), None, True, "token issued"),
        (_record(dht_verified=True, banned=True), (True, ""), frozenset(), None, False, "banned"),
        (_record(dht_verified=True), (True, ""), frozenset({"QmA"}), None, False, "banned"),
        (_record(dht_verified=True), (False, "removed"), frozenset(), None, False, "not admitted: removed"),
        (
            _record(dht_verified=True),
            (True, ""),
            frozenset(),
            SwarmToken("r", "QmA", b"k", 1000.0),
            False,
            "valid",
        ),
        (
            _record(dht_verified=True),
            (True, ""),
            frozenset(),
            SwarmToken("r", "QmA", b"k", 1200.0),
            False,
            "valid",
        ),
        (
            _record(dht_verified=True),
            (True, ""),
            frozenset(),
            SwarmToken("r", "QmA", b"k", 999.0),
            True,
            "renewed",
        ),
        (
            _record(dht_verified=True),
            (True, ""),
            frozenset(),
            SwarmToken("r", "QmB", b"k", 1600.0),
            True,
            "renewed",
        ),
    ],
)
def test_token_decision(record, allowed, banned, last, issue, reason):
    # now = 700, ttl 600: due when less than 300 s are left (expiry before 1000)
    got, why = token_decision(700.0, record, allowed, banned, last, 600.0)
    assert got is issue and reason in why


@pytest.mark.parametrize(
    "mode, invite_ok, announced, listed, admitted, reason",
    [
        ("open", (False, "x"), "", frozenset(), True, "open"),
        ("invite", (False, "used up"), "QmA", frozenset({"QmA"}), False, "used up"),
        ("invite", (True, "invite 1"), "", frozenset(), True, "invite 1"),
        ("allowlist", (True, ""), "", frozenset({"QmA"}), False, "--identity"),
        ("allowlist", (True, ""), "QmB", frozenset({"QmA"}), False, "not on this run's allowlist"),
        ("allowlist", (True, ""), "QmA", frozenset({"QmA"}), True, "on the allowlist"),
    ],
)
def test_admit_join(mode, invite_ok, announced, listed, admitted, reason):
    got, why = admit_join(mode, invite_ok, announced, listed)
    assert got is admitted and reason in why


def test_still_admitted_follows_the_proven_identity_in_allowlist_mode():
    joined = _record(admitted_dht_id="QmA", dht_peer_id="QmA")
    assert still_admitted("allowlist", joined, frozenset({"QmA"}))[0]
    assert not still_admitted("allowlist", joined, frozenset({"QmB"}))[0]
    proven_other = _record(admitted_dht_id="QmA", dht_peer_id="QmB", dht_verified=True)
    assert not still_admitted("allowlist", proven_other, frozenset({"QmA"}))[0]
    assert still_admitted("invite", proven_other, frozenset())[0]


def test_parse_allowlist_skips_comments_and_names_bad_lines():
    good = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    ids, problems = parse_allowlist(f"# header\n\n  {good}   # alice\nQm0OIl\n{good}\n")
    assert ids == frozenset({good}) and len(problems) == 1 and "line 4" in problems[0]


@pytest.mark.parametrize(
    "invite, usable, reason",
    [
        (None, False, "not one of this run's"),
        (Invite("i1", 1, None, "", 0.0), True, "1 use(s) left"),
        (Invite("i1", 0, None, "", 0.0), False, "used up"),
        (Invite("i1", 3, 100.0, "", 0.0), False, "expired"),
        (Invite("i1", 3, 101.0, "", 0.0), True, "i1"),
        (Invite("i1", 3, None, "", 0.0, revoked=True), False, "revoked"),
    ],
)
def test_invite_usable(invite, usable, reason):
    got, why = invite_usable(invite, now=100.0)
    assert got is usable and reason in why
    # a returning identity needs no use left, but never gets past a revocation or an expiry
    back, why = invite_usable(invite, now=100.0, returning=True)
    assert back is (invite is not None and not invite.revoked and invite.expires_unix_s in (None, 101.0))


# ---------------------------------------------------------------- crowdtrain invite


def test_invite_cli_create_list_revoke(tmp_path: Path, capsys):
    store = Store(tmp_path / "state.sqlite3", flush_interval_s=0.05)  # the running coordinator's
    try:
        book = InviteBook(store)
        assert (
            cli.main(
                ["invite", "create", "--data-dir", str(tmp_path), "--uses", "2", "--note", "for\x1b[2Jbob"]
            )
            == 0
        )
        out = capsys.readouterr()
        code = out.out.strip()
        assert len(code) == 32 and "2 use(s)" in out.err
        invite, _ = book.consume(code, time.time(), "QmVolunteer")
        assert invite is not None and invite.note == "for[2Jbob"  # no escape reaches a terminal
        record = PeerRecord(
            session_id="a" * 32, joined_unix_s=0, last_seen_unix_s=0, invite_id=invite.invite_id
        )
        store.upsert_peer(record)
        assert cli.main(["invite", "list", "--data-dir", str(tmp_path)]) == 0
        listed = capsys.readouterr().out
        assert invite.invite_id in listed and "usable" in listed and code not in listed
        assert cli.main(["invite", "revoke", "--data-dir", str(tmp_path), "nosuch"]) == 1
        assert "no invite 'nosuch'" in capsys.readouterr().err
        assert cli.main(["invite", "revoke", "--data-dir", str(tmp_path), invite.invite_id]) == 0
        assert "ended 1 session(s)" in capsys.readouterr().out
        deadline = time.monotonic() + 10  # the running coordinator's store sees it at its next flush
        while not store.get_peer(record.session_id).banned:
            assert time.monotonic() < deadline, "the revocation never reached the coordinator's store"
            time.sleep(0.05)
        assert "revoked" in store.get_peer(record.session_id).ban_reason
        assert cli.main(["invite", "list", "--data-dir", str(tmp_path)]) == 0
        assert "revoked" in capsys.readouterr().out
        assert book.consume(code, time.time(), "QmVolunteer")[0] is None  # revoked: not even for its own
    finally:
        store.close()
    assert cli.main(["invite", "list", "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert cli.main(["invite", "create", "--data-dir", str(tmp_path), "--uses", "0"]) == 1


def test_the_coordinators_flags_build_its_gate_and_evidence(tmp_path: Path):
    from crowdtrain.coordinator.admission.bans import AutobanConfigError
    from crowdtrain.coordinator.admission.gate import servicer_admission
    from crowdtrain.coordinator.config import CoordinatorConfig

    def admission(config: CoordinatorConfig):
        return servicer_admission(
            config.settings(AdmissionSettings), config.settings(AutobanSettings), RUN_ID, run_key, store
        )

    store, run_key = Store(tmp_path / "s.sqlite3", 0), new_key()
    try:
        config = CoordinatorConfig(data_dir=str(tmp_path), admission="invite", swarm_token_ttl_s=60.0)
        built = admission(config)
        assert built.gate.settings == AdmissionSettings("invite", "", 60.0)
        assert built.evidence.settings == AutobanSettings(2, 6, 600.0)
        listed = tmp_path / "allow.txt"
        _write(listed, "")
        config = CoordinatorConfig(data_dir=str(tmp_path), admission="allowlist", allowlist_path=str(listed))
        assert admission(config).gate.allowlisted() == frozenset()
        with pytest.raises(AutobanConfigError, match="--autoban-min-reporters 0"):
            admission(CoordinatorConfig(data_dir=str(tmp_path), autoban_min_reporters=0))
    finally:
        store.close()
