"""The defences cannot be turned against the honest: each attack that used to work, now failing.
In process: the servicer on 127.0.0.1:0 with an injected clock, real RSA identities, real signatures.

The attacks: one session proved a new cheap identity at every heartbeat, each a distinct reporter,
and two heartbeats of fake evidence banned any peer (the coordinator's own nodes included). One
single-use invite admitted unlimited identities. Naming a listed public key was enough to join an
allowlist run. A huge RSA exponent cost the event loop ~8 ms per heartbeat, forever. And one
address could hold any number of sessions online, none ever forgotten.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.admission import bans as evidence_module
from crowdtrain.coordinator.admission.bans import AutobanSettings, EvidenceBook
from crowdtrain.coordinator.admission.gate import AdmissionSettings, Gate
from crowdtrain.coordinator.admission.invites import InviteBook
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import AbuseLimits, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.signing import new_key
from crowdtrain.peer.admission.tokens import sign_token
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.identities import identity, signed_join

HEALTH = HealthSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=10.0)
AGE_S = AutobanSettings().min_reporter_age_s + 1  # reporters must be this old
PROTECTED = 99  # the identity of the coordinator's own DHT node in these tests


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Run:
    stub: pb_grpc.CoordinatorStub
    store: Store
    clock: Clock
    invites: InviteBook
    evidence: EvidenceBook

    def join(self, who: int, **fields) -> pb.JoinResponse:
        return self.stub.Join(signed_join(who=who, now=self.clock(), **fields), timeout=5)

    def beat(self, joined: pb.JoinResponse, who: int, **fields) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(
            session_id=joined.session_id,
            session_token=joined.session_token,
            dht_peer_id=identity(who).peer_id,
            phase="training",
            **fields,
        )
        return self.stub.Heartbeat(request, timeout=5)

    def prove(self, joined: pb.JoinResponse, who: int) -> pb.HeartbeatResponse:
        public, signature = identity(who).prove(joined.dht_challenge)
        return self.beat(joined, who, dht_public_key=public, dht_signature=signature)

    def member(self, who: int, **join_fields) -> pb.JoinResponse:
        """A joined session of identity `who`, proven and holding a swarm token."""
        joined = self.join(who, **join_fields)
        assert self.prove(joined, who).swarm_token
        return joined

    def banned(self, who: int) -> bool:
        return identity(who).peer_id in self.store.banned_dht_ids()


@pytest.fixture
def run(tmp_path: Path):
    """`run(mode)`: a coordinator admitting by `mode`; all are stopped at the end."""
    started = []

    def start(mode: str = "open", allowlist: tuple[int, ...] = ()):
        store, clock, run_key = (
            Store(tmp_path / f"s{len(started)}.sqlite3", flush_interval_s=0),
            Clock(),
            new_key(),
        )
        path = tmp_path / f"allow{len(started)}.txt"
        path.write_text("".join(f"{identity(w).peer_id}\n" for w in allowlist))
        invites = InviteBook(store)
        settings = AdmissionSettings(mode, str(path) if mode == "allowlist" else "", 600.0)
        gate = Gate(settings, "ct_frame", lambda token: sign_token(run_key, token), invites)
        book = EvidenceBook(store, AutobanSettings(), mode, lambda: frozenset({identity(PROTECTED).peer_id}))
        servicer = CoordinatorServicer(
            RunInfo('{"run_id": "ct_frame"}', "abc", "{}", 2, "http://127.0.0.1:1", tmp_path / "ckpt"),
            store, HEALTH, initial_peers=list, clock=clock, gate=gate, evidence=book,
            abuse=AbuseLimits(joins_burst=1000, max_live_sessions_per_root=8),
        )  # fmt: skip
        server, port = create_server(servicer, "127.0.0.1", 0)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel, store))
        return Run(pb_grpc.CoordinatorStub(channel), store, clock, invites, book)

    try:
        yield start
    finally:
        for server, channel, store in started:
            channel.close()
            server.stop(0).wait()
            store.close()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def group(group_id: bytes, *members: int) -> pb.AveragingGroup:
    return pb.AveragingGroup(group_id=group_id, epoch=3, members=[identity(w).peer_id for w in members])


def accusations(offender: str, group_id: bytes, n: int = 6) -> list[pb.Rejection]:
    return [
        pb.Rejection(offender=offender, kind=kind, detail="fake", epoch=epoch, group_id=group_id)
        for epoch in range(n // 2)
        for kind in ("non_finite", "outlier")
    ]


# ---------------------------------------------------------------- one session, one identity


def test_a_session_cannot_switch_identity_nor_join_without_proving_its_key(run):
    c = run("open")
    joined = c.member(1)
    e = refused(lambda: c.beat(joined, 2))  # the heartbeat claims another identity
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "never changes identity" in e.details()
    fresh = c.join(1)
    public, signature = identity(2).prove(fresh.dht_challenge)
    e = refused(lambda: c.beat(fresh, 1, dht_public_key=public, dht_signature=signature))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT  # a proof by another key
    e = refused(lambda: c.stub.Join(pb.JoinRequest(name="keyless"), timeout=5))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "identity key" in e.details()


def test_cheap_and_slow_keys_are_refused_and_failed_proofs_end_the_session(run):
    """An Ed25519 key costs microseconds to make; an RSA key with a huge exponent costs ~60x
    a normal one to verify. Neither may name a session, and failed proofs are not free forever."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    c = run("open")
    ed = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    e = refused(lambda: c.stub.Join(pb.JoinRequest(dht_public_key=b"\x08\x01\x12\x20" + ed), timeout=5))
    assert "not RSA" in e.details()
    slow = rsa.RSAPublicNumbers(2**3000 + 1, (2**1024 + 1) * (2**1024 + 3) * (2**1000 + 1)).public_key()
    der = slow.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = b"\x08\x00\x12" + bytes([0x80 | (len(der) & 0x7F), len(der) >> 7]) + der
    e = refused(
        lambda: c.stub.Join(pb.JoinRequest(dht_public_key=encoded, join_signature=b"x" * 256), timeout=5)
    )
    assert "e = 65537" in e.details()
    joined = c.join(3)
    public = identity(3).public_key_protobuf
    codes = [
        refused(lambda: c.beat(joined, 3, dht_public_key=public, dht_signature=b"bad")).code()
        for _ in range(3)
    ]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2 + [grpc.StatusCode.UNAUTHENTICATED]
    assert c.store.get_peer(joined.session_id) is None  # the session ended


def test_a_stale_or_foreign_join_signature_is_refused(run):
    c = run("open")
    stale = signed_join(who=4, now=c.clock() - 3600)
    assert "clock" in refused(lambda: c.stub.Join(stale, timeout=5)).details()
    forged = signed_join(who=4, now=c.clock())
    forged.join_signature = identity(5).join_fields(c.clock())["join_signature"]  # 5 signs, names 4
    assert "does not verify" in refused(lambda: c.stub.Join(forged, timeout=5)).details()


def test_fake_evidence_from_many_identities_of_one_root_frames_nobody(run):
    """Framing by fake evidence, with everything one stranger can do from one address: many proven identities,
    old enough and holding tokens, reporting an honest peer and the coordinator's own node, with
    group records vouching for each other. No report counts; nobody is banned or quarantined."""
    c = run("open")
    victim = c.member(10)
    attackers = {w: c.member(w) for w in range(11, 15)}
    c.clock.now += AGE_S
    gid = b"g" * 20
    for w, joined in attackers.items():
        fake = group(gid, *attackers, 10)
        rejections = (
            accusations(identity(10).peer_id, gid) + accusations(identity(PROTECTED).peer_id, gid)[:2]
        )
        c.prove(joined, w)  # renews nothing, proves again: still one identity per session
        c.beat(joined, w, groups=[fake], rejections=rejections)
    assert not c.banned(10) and identity(10).peer_id not in c.evidence.quarantined(c.clock())
    assert not c.evidence.counted_against(identity(10).peer_id, c.clock())
    assert c.beat(victim, 10).heartbeat_interval_s > 0  # still admitted
    own = identity(PROTECTED).peer_id
    assert own not in c.store.banned_dht_ids() and not c.evidence.reports_against(own, c.clock())


def test_reports_from_a_groupmate_of_another_root_count_and_an_invite_run_bans_then_unban_restores(run):
    """The defence still works against a real offender: in an invite run, two reporters of two
    invites whose group the offender itself confirmed ban it, and it is told how to appeal; the
    operator's unban restores it fully (its invite admits it again, it gets a token)."""
    c = run("invite")
    codes = [c.invites.create(c.clock())[0] for _ in range(3)]
    offender = c.member(20, invite_code=codes[0])
    reporters = {21: c.member(21, invite_code=codes[1]), 22: c.member(22, invite_code=codes[2])}
    c.clock.now += AGE_S
    gid = b"h" * 20
    c.beat(offender, 20, groups=[group(gid, 20, 21, 22)])  # the offender's own account of the group
    for w, joined in reporters.items():
        c.beat(joined, w, rejections=accusations(identity(20).peer_id, gid))
    assert c.banned(20)
    e = refused(lambda: c.beat(offender, 20))
    assert e.code() is grpc.StatusCode.PERMISSION_DENIED and "--unban" in e.details()
    assert "--unban" in refused(lambda: c.join(20, invite_code=codes[0])).details()
    assert evidence_module.unban(c.store, identity(20).peer_id)
    again = c.join(20, invite_code=codes[0])  # its single-use invite still admits it
    assert c.prove(again, 20).swarm_token


def test_evidence_from_one_root_alone_bans_nobody_even_when_confirmed(run):
    c = run("invite")
    code, spare = (c.invites.create(c.clock(), uses=2)[0] for _ in range(2))
    offender = c.member(30, invite_code=spare)
    a, b = c.member(31, invite_code=code), c.member(32, invite_code=code)  # two identities, one invite
    c.clock.now += AGE_S
    gid = b"i" * 20
    c.beat(offender, 30, groups=[group(gid, 30, 31, 32)])
    for w, joined in ((31, a), (32, b)):
        c.beat(joined, w, rejections=accusations(identity(30).peer_id, gid))
    assert len(c.evidence.counted_against(identity(30).peer_id, c.clock())) == 12
    assert not c.banned(30)  # 12 confirmed reports, but one admission root


def test_open_runs_quarantine_instead_of_banning(run):
    c = run("open")
    offender = c.member(40)
    reporters = {41: c.member(41), 42: c.member(42)}
    for w in reporters:  # two addresses: the test rewrites the roots the servicer recorded
        record = c.store.get_peer(reporters[w].session_id)
        c.store.upsert_peer(dataclasses.replace(record, admission_root=f"addr:198.51.100.{w}"))
    c.clock.now += AGE_S
    gid = b"j" * 20
    c.beat(offender, 40, groups=[group(gid, 40, 41, 42)])
    for w, joined in reporters.items():
        c.beat(joined, w, rejections=accusations(identity(40).peer_id, gid))
    assert not c.banned(40) and identity(40).peer_id in c.evidence.quarantined(c.clock())
    assert c.beat(offender, 40).heartbeat_interval_s > 0  # it keeps training
    assert evidence_module.unban(c.store, identity(40).peer_id)
    assert identity(40).peer_id not in c.evidence.quarantined(c.clock())


# ---------------------------------------------------------------- invites and allowlists


def test_one_single_use_invite_admits_exactly_one_identity(run):
    c = run("invite")
    code, _ = c.invites.create(c.clock())
    first = c.member(50, invite_code=code)
    assert c.member(50, invite_code=code).session_id != first.session_id  # the same volunteer, restarted
    e = refused(lambda: c.join(51, invite_code=code))
    assert e.code() is grpc.StatusCode.PERMISSION_DENIED and "used up" in e.details()
    e = refused(lambda: c.beat(first, 51))  # nor can its session turn into another identity
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_naming_a_listed_public_key_is_not_enough_to_join_an_allowlist_run(run):
    c = run("allowlist", allowlist=(60,))
    stolen = pb.JoinRequest(name="stranger", dht_public_key=identity(60).public_key_protobuf)
    stolen.join_unix_s = int(c.clock())
    e = refused(lambda: c.stub.Join(stolen, timeout=5))  # no signature by that key
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
    stolen.join_signature = identity(61).join_fields(c.clock())["join_signature"]
    assert refused(lambda: c.stub.Join(stolen, timeout=5)).code() is grpc.StatusCode.INVALID_ARGUMENT
    assert c.member(60).session_id  # the key's owner joins


# ---------------------------------------------------------------- sessions are bounded


def test_old_sessions_are_forgotten_and_one_root_holds_a_bounded_number_online(run):
    c = run("open")
    sessions = [c.member(70 + i) for i in range(8)]
    e = refused(lambda: c.join(78))  # the 9th online session from one address
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions from" in e.details()
    c.clock.now += AbuseLimits().forget_sessions_after_s + 60
    assert c.join(79).session_id  # the others went silent a day ago: forgotten, room again
    assert all(c.store.get_peer(s.session_id) is None for s in sessions)
