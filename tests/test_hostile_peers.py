"""Attacks of issue 10 on the coordinator's peer API, one test each (gRPC on 127.0.0.1:0, injected
clock): stolen identities, unbounded input, forged progress, sybil joins, bans by name, terminal
escapes. Each failed against the coordinator before the fix (see docs/security.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.admission import signatures as identity
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.monitor import ProgressRecord, vet_records
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status, contributors
from crowdtrain.coordinator.peers.store import MAX_LEDGER_SAMPLES, Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.run.report import dht_claim_message
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.identities import identity as peer_identity
from tests.identities import signed_join

HEALTH = HealthSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=10.0)


class Clock:
    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now  # joins are signed on the wall clock

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Served:
    stub: pb_grpc.CoordinatorStub
    store: Store
    clock: Clock
    root: Path

    def status(self):
        return build_status(
            self.clock(), "run", self.store.list_peers(), self.store.contribution_totals(), HEALTH,
            SwarmProgress(), [], self.store.rejections(),
        )  # fmt: skip

    def join(self, name: str = "p", device: str = "cpu", who: int | None = None) -> pb.JoinResponse:
        """Join as test identity `who` (`tests.identities`; a new one when None)."""
        return self.stub.Join(signed_join(who=who, now=self.clock(), name=name, device=device), timeout=5)

    def beat(self, joined: pb.JoinResponse, **fields) -> pb.HeartbeatResponse:
        fields.setdefault("session_token", joined.session_token)
        return self.stub.Heartbeat(pb.HeartbeatRequest(session_id=joined.session_id, **fields), timeout=5)


@pytest.fixture
def served(tmp_path: Path):
    from crowdtrain.coordinator.api.grpcserver import create_server

    store, clock = Store(tmp_path / "state.sqlite3", flush_interval_s=0), Clock()
    run = RunInfo('{"run": 1}', "abc", "{}", 3, "http://127.0.0.1:1", tmp_path / "checkpoints")
    served = Served(None, store, clock, tmp_path / "checkpoints")
    servicer = CoordinatorServicer(run, store, HEALTH, initial_peers=list, clock=clock, status=served.status)
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    served.stub = pb_grpc.CoordinatorStub(channel)
    try:
        yield served
    finally:
        channel.close()
        server.stop(0).wait()
        store.close()


def refused(call, code: grpc.StatusCode | tuple[grpc.StatusCode, ...], match: str = "") -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() in (code if isinstance(code, tuple) else (code,)), e.value.details()
    assert match in e.value.details()
    return e.value.details()


def rsa_identity():
    """(libp2p PublicKey protobuf, its peer id, a signer) of a fresh RSA key, as hivemind makes them."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = b"\x08\x00\x12" + bytes([0x80 | (len(der) & 0x7F), len(der) >> 7]) + der  # KeyType RSA, data
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    return public, identity.peer_id_of(public), lambda message: key.sign(message, pss, hashes.SHA256())


# ---------------------------------------------------------------- attack 4: credentials


def test_leave_rename_and_heartbeat_of_another_peer_need_its_token(served):
    victim = served.join("alice")
    served.beat(victim, phase="training")
    public_id = served.status().peers[0].peer_id
    assert public_id == victim.peer_id
    for session_id in (victim.session_id, public_id):  # its leaked session id, or its public id
        for token in ("", "x" * 43):
            request = pb.LeaveRequest(session_id=session_id, session_token=token, reason="pwned")
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if session_id == victim.session_id
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            refused(lambda r=request: served.stub.Leave(r, timeout=5), code)
            rename = pb.HeartbeatRequest(session_id=session_id, session_token=token, name="mallory")
            refused(lambda r=rename: served.stub.Heartbeat(r, timeout=5), code)
            stream = served.stub.HeartbeatStream(iter([rename]), timeout=5)
            refused(lambda s=stream: list(s), code)
    record = served.store.get_peer(victim.session_id)
    assert (record.name, record.left_unix_s, record.phase) == ("alice", None, "training")
    served.stub.Leave(
        pb.LeaveRequest(session_id=victim.session_id, session_token=victim.session_token), timeout=5
    )
    assert served.store.get_peer(victim.session_id).left_unix_s is not None  # its own token works


def test_no_session_id_or_token_appears_in_any_public_view_or_log(served, caplog):
    caplog.set_level(logging.DEBUG)
    joined = [served.join(f"p{i}", who=i) for i in range(3)]
    for i, j in enumerate(joined):
        served.beat(j, phase="training", dht_peer_id=peer_identity(i).peer_id)
    secrets_ = [s for j in joined for s in (j.session_id, j.session_token)]
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    views = served.status().to_json_dict()  # what /api/v1/state, /api/v1/peers and the dashboard show
    public = [
        status.SerializeToString().decode("latin-1"),
        json.dumps(views),
        json.dumps(contributors(served.status(), served.store.contribution_totals())),
        caplog.text,
    ]
    for text in public:
        assert not any(secret in text for secret in secrets_)
    assert {p.peer_id for p in status.peers} == {j.peer_id for j in joined}
    stored = served.store.get_peer(joined[0].session_id)
    assert stored.token_sha256 != joined[0].session_token and len(stored.token_sha256) == 64


def test_a_dht_peer_id_claim_earns_no_credit_until_proven(served):
    owner_key = peer_identity(20)
    dht_id = owner_key.peer_id
    served.store.add_contributions([(dht_id, 1, 500)])  # what the swarm's records credit to that id
    thief = served.join("thief")  # under an identity of its own: a session never claims another one
    refused(
        lambda: served.beat(thief, phase="training", dht_peer_id=dht_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        "never changes identity",
    )
    assert served.store.get_peer(thief.session_id).dht_peer_id == ""  # the claim was not kept
    # even the identity's own session earns nothing while its claim is unproven
    owner = served.join("owner", who=20)
    answer = served.beat(owner, phase="training", dht_peer_id=dht_id)  # claims it, no proof
    assert (answer.accepted_samples, answer.rank) == (0, 0)  # "am I contributing?" is not told to it
    view = next(p for p in served.status().peers if p.peer_id == owner.peer_id)
    assert (view.contributed_samples, view.dht_verified) == (0, False)
    assert not served.store.mark_dht_seen(dht_id, served.clock(), 1)  # the records are not linked to it
    assert contributors(served.status(), served.store.contribution_totals())[0]["name"] != "owner"
    # a signature by another key, or of another session's challenge, proves nothing
    other_public, _, other_sign = rsa_identity()
    public, stale = owner_key.prove(b"another session's challenge")
    for key, signature in (
        (other_public, other_sign(dht_claim_message(owner.dht_challenge, dht_id))),
        (public, stale),
    ):
        refused(
            lambda k=key, s=signature: served.beat(
                owner, dht_peer_id=dht_id, dht_public_key=k, dht_signature=s
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dht_public_key",
        )
    # the owner of the key proves it: now the records and the credit are its own
    public, signature = owner_key.prove(owner.dht_challenge)
    response = served.beat(
        owner, phase="training", dht_peer_id=dht_id, dht_public_key=public, dht_signature=signature
    )
    assert response.dht_verified
    # "am I contributing?": its accepted samples, their share of the run, its rank
    assert (response.accepted_samples, response.share, response.rank, response.ranked_peers) == (
        500,
        1.0,
        1,
        1,
    )
    view = next(p for p in served.status().peers if p.peer_id == owner.peer_id)
    assert (view.contributed_samples, view.dht_verified) == (500, True)


def test_peer_ids_are_derived_as_hivemind_derives_them(tmp_path: Path):
    from crowdtrain.peer.swarm.wiring import DhtIdentity
    from hivemind.p2p import P2P, PeerID

    ident = DhtIdentity(tmp_path)
    P2P.generate_identity(str(ident.path))  # what hivemind writes when the DHT starts from identity_path
    hivemind_id = PeerID.from_identity(ident.path.read_bytes()).to_base58()
    public, signature = ident.prove(b"challenge", hivemind_id)
    assert identity.peer_id_of(public) == hivemind_id
    assert identity.verify_dht_claim(hivemind_id, public, signature, b"challenge") == (
        True,
        "dht_peer_id proven by a signature of this session's challenge",
    )
    assert not identity.verify_dht_claim(hivemind_id, public, signature, b"other")[0]
    assert identity.base58(b"\0\0\x01") == "112"
    assert (ident.path.stat().st_mode & 0o077) == 0 or (ident.path.parent.stat().st_mode & 0o077) == 0


# ---------------------------------------------------------------- attack 5: bounds


def test_megabyte_strings_are_refused_and_the_database_stays_small(served, tmp_path: Path):
    joined = served.join("p")
    for i in range(25):
        field = ("dht_peer_id", "phase", "session_token")[i % 3]
        big = "Q" * (1 << 20)  # refused by the field's limit, or by the server's receive limit first
        refused(
            lambda f=field, b=big: served.beat(joined, **{f: b}),
            (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED),
        )
        refused(
            lambda f=field: served.beat(joined, **{f: "Q" * 1000}), grpc.StatusCode.INVALID_ARGUMENT, field
        )
    long = "n" * 8000
    served.beat(joined, name=long, device=long, version=long)  # display text: cut, not refused
    served.store.flush()
    size = sum(p.stat().st_size for p in tmp_path.glob("state.sqlite3*"))
    assert size < 1 << 20, size
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert status.ByteSize() < 4096 and len(status.peers[0].name) == 64


def test_absurd_numbers_and_a_garbage_phase_are_refused(served):
    joined = served.join("p")
    served.beat(joined, phase="training", local_epoch=3)
    for fields, name in (
        ({"local_epoch": 9_200_000_000_000_000_000}, "local_epoch"),
        ({"samples_per_s": 1e300}, "samples_per_s"),
        ({"uptime_s": -1.0}, "uptime_s"),
        ({"swarm_size": 4_000_000_000}, "swarm_size"),
        ({"phase": "garbage"}, "phase"),
    ):
        details = refused(lambda f=fields: served.beat(joined, **f), grpc.StatusCode.INVALID_ARGUMENT, name)
        assert "HeartbeatRequest" in details
    # a samples_total its throughput cannot explain is clamped
    served.clock.now += 10
    served.beat(joined, phase="training", samples_per_s=10.0, samples_total=2**50)
    assert served.store.get_peer(joined.session_id).samples_total <= 10 * 10 * 2 + 4096
    summary = served.stub.GetStatus(pb.GetStatusRequest(), timeout=5).summary
    assert summary.global_epoch == 0  # a heartbeat alone never moves the swarm's epoch


def test_a_fake_training_heartbeat_does_not_change_resume_from_step(served):
    staging = archive.new_staging_dir(served.root, 2)
    (staging / "model.safetensors").write_bytes(b"w")
    archive.finalize(staging, served.root, CheckpointMeta("ct_test", 2, 0, 5.0, 1.0, "m", None, ()))
    assert served.join("first").settings.resume_from_step == 2
    fake = served.join("fake", who=21)
    served.beat(
        fake, phase="training", samples_per_s=100.0, local_epoch=5, dht_peer_id=peer_identity(21).peer_id
    )
    assert served.join("newcomer").settings.resume_from_step == 2


# ---------------------------------------------------------------- attack 6: the ledger


def test_huge_progress_values_cannot_break_the_ledger_or_the_views(served):
    served.store.add_contributions([("QmA", 1, 2**63)])  # was: OverflowError on every monitor tick
    served.store.add_contributions([("QmB", 1, 2**62), ("QmB", 2, 2**62)])  # was: SUM overflow
    totals = served.store.contribution_totals()
    assert totals == {"QmA": MAX_LEDGER_SAMPLES, "QmB": 2 * MAX_LEDGER_SAMPLES}
    summary = served.stub.GetStatus(pb.GetStatusRequest(), timeout=5).summary
    assert summary.total_contributed_samples == 3 * MAX_LEDGER_SAMPLES
    # an old database holding such rows is read without overflowing either
    with sqlite3.connect(served.store.path) as db:
        db.executemany("INSERT INTO contributions VALUES ('QmC', ?, ?)", [(1, 2**62), (2, 2**62), (3, 2**62)])
    assert served.store.contribution_totals()["QmC"] == 3 * MAX_LEDGER_SAMPLES


def test_progress_records_are_vetted_and_their_rate_capped():
    """A record's own sample count is never credited since issue 22 (N5: credit is per epoch the
    swarm passed, tests/test_credit.py), so only the records themselves are vetted here."""

    def record(peer: str, epoch: int, samples: int, rate: float) -> ProgressRecord:
        return ProgressRecord(peer, epoch, samples, rate, 1.0, False)

    kept = vet_records(
        [
            record("QmGood", 1, 10, 5.0),
            record("QmEpoch", 2**63, 10, 5.0),
            record("QmRate", 1, 10, math.nan),
            record("QmTwice", 1, 10, 5.0),
            record("QmTwice", 1, 99, 5.0),  # a second record claiming the same peer id
            record("QmFast", 1, 10, 1e300),
        ]
    )
    assert [(r.dht_peer_id, r.samples_per_s) for r in kept] == [("QmGood", 5.0), ("QmFast", 1e6)]


# ---------------------------------------------------------------- attack 7 (part): sybils and rates


def test_two_thousand_joins_from_one_address_are_mostly_refused_and_silent_sessions_pruned(served):
    codes = []
    signed = signed_join(who=22, device="cpu")  # one key: the limit is per address, whatever it names
    for i in range(2000):
        request = pb.JoinRequest()
        request.CopyFrom(signed)
        request.name = f"sybil{i}"
        try:
            served.stub.Join(request, timeout=5)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "retry in" in e.details()
    assert codes.count("OK") <= 25 and codes.count("RESOURCE_EXHAUSTED") == 2000 - codes.count("OK")
    assert served.store.count_peers() == codes.count("OK")
    served.clock.now += 121  # none of them ever heartbeated
    survivor = served.join("honest")
    assert served.store.count_peers() == 1 and served.store.get_peer(survivor.session_id)


def test_a_session_heartbeating_far_faster_than_its_interval_is_refused(served):
    joined = served.join("p")
    outcomes = []
    for _ in range(30):  # all at one instant; a peer sends one per 2 s
        try:
            served.beat(joined)
            outcomes.append("OK")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
    assert outcomes[:10] == ["OK"] * 10 and set(outcomes[10:]) == {"RESOURCE_EXHAUSTED"}
    served.clock.now += 2.0
    served.beat(joined)  # the bucket refills at 10 per interval


def test_status_lists_a_bounded_number_of_peers(served):
    for i in range(700):
        served.store.upsert_peer(
            PeerRecord(
                session_id=f"{i:032x}", peer_id=f"{i:012x}", joined_unix_s=1.0, last_seen_unix_s=float(i)
            )
        )
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert len(status.peers) == 500 and status.summary.peers_not_listed == 200
    assert min(p.last_seen_unix_s for p in status.peers) == 200.0  # the most recently seen are listed


# ---------------------------------------------------------------- attack 8: bans by identity


def test_bans_are_by_identity_so_a_copied_name_gets_no_one_banned(served, tmp_path: Path):
    from crowdtrain.coordinator import config as cfg
    from crowdtrain.coordinator.cli import cmd_ban
    from crowdtrain.peer.errors import CrowdtrainError

    carol, copycat = served.join("carol"), served.join("Carol ")
    served.beat(carol, phase="training")
    with pytest.raises(CrowdtrainError, match="not by display name"):
        cmd_ban(cfg.BanConfig(data_dir=str(tmp_path), peer="carol"))
    assert cmd_ban(cfg.BanConfig(data_dir=str(tmp_path), peer=copycat.peer_id)) == 0
    served.store.flush()  # picks up the ban written by the CLI (another connection)
    refused(lambda: served.beat(copycat), grpc.StatusCode.PERMISSION_DENIED, "banned")
    served.beat(carol, phase="training")  # the honest volunteer with the same name is unaffected
    # a ban by proven DHT identity also refuses a session of the same key that had not proven it
    # yet, and any later Join naming that key
    mallory = peer_identity(23)
    dht_id = mallory.peer_id
    first, again = served.join("mallory", who=23), served.join("not-mallory", who=23)
    public, signature = mallory.prove(first.dht_challenge)
    served.beat(first, dht_peer_id=dht_id, dht_public_key=public, dht_signature=signature)
    assert served.store.set_banned(dht_id, True) == 1
    public, signature = mallory.prove(again.dht_challenge)
    refused(
        lambda: served.beat(again, dht_peer_id=dht_id, dht_public_key=public, dht_signature=signature),
        grpc.StatusCode.PERMISSION_DENIED,
        f"identity {dht_id} is banned",
    )
    refused(lambda: served.join("mallory-again", who=23), grpc.StatusCode.PERMISSION_DENIED, "is banned")


# ---------------------------------------------------------------- attack 9 (part): terminal and logs


def test_newlines_and_escapes_in_names_reach_no_log_line_and_no_terminal(served, caplog):
    from crowdtrain.coordinator.dashboard.render import format_status

    caplog.set_level(logging.INFO)
    evil = served.join("eve\x1b[2J\x1b]0;title\x07\u202e", device="cpu\n2026-01-01 INFO peer 'root' joined")
    record = served.store.get_peer(evil.session_id)
    assert (record.name, record.device) == ("eve[2J]0;title", "cpu 2026-01-01 INFO peer 'root' joined")
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage() for r in caplog.records)
    # a database written before input was cleaned still prints clean
    served.store.upsert_peer(dataclasses.replace(record, name="old\x1b[31m\nname", device="\x9b2J"))
    text = format_status(served.stub.GetStatus(pb.GetStatusRequest(), timeout=5), served.clock())
    assert "\x1b" not in text and "\x9b" not in text and "old[31m name" in text
    assert all(line.isprintable() for line in text.splitlines())
