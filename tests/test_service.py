"""In-process gRPC on 127.0.0.1:0: join, heartbeat, leave, checkpoints, health; persistence."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator import errors
from crowdtrain.coordinator.admission.bans import EvidenceBook
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import STATUS_CODES, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.errors import PortInUseError
from crowdtrain.coordinator.limits import REQUEST_LIMITS
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, PeerState, compute_state
from crowdtrain.coordinator.peers.status import PeerView, SwarmSummary
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.link.client import (
    CoordinatorClient,
    CoordinatorRejected,
    CoordinatorUnavailable,
    retry_until,
)
from crowdtrain.peer.run.report import FIELD_NAMES
from crowdtrain.protos import coordinator_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.identities import identity, signed_join


class Clock:
    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now  # joins are signed on the wall clock

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(tmp_path: Path):
    store = Store(tmp_path / "state.sqlite3")
    clock = Clock()
    run = RunInfo(
        manifest_json='{"run": 1}',
        manifest_sha256="abc",
        tokenizer_json="{}",
        num_shards=3,
        http_base_url="http://127.0.0.1:1",
        checkpoint_root=tmp_path / "checkpoints",
    )
    health = HealthSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=10.0)
    servicer = CoordinatorServicer(
        run,
        store,
        health,
        initial_peers=lambda: ["/ip4/127.0.0.1/tcp/1/p2p/x"],
        clock=clock,
        evidence=EvidenceBook(store),  # where the averaging groups peers report are kept
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    client = CoordinatorClient(f"127.0.0.1:{port}", rpc_timeout_s=5)
    try:
        yield client, store, clock, port, health
    finally:
        client.close()
        server.stop(0).wait()
        store.close()


def test_join_gives_each_peer_a_free_shard_and_ships_the_run(served):
    client, store, clock, port, _ = served
    responses = [client.join(signed_join(name=f"p{i}", version="0.1.0", device="cpu")) for i in range(4)]
    assert [r.settings.shard_index for r in responses] == [0, 1, 2, 0]
    assert len({r.session_id for r in responses}) == 4
    r = responses[0]
    assert r.manifest_json == '{"run": 1}' and r.manifest_sha256 == "abc" and r.tokenizer_json == "{}"
    assert list(r.initial_peers) == ["/ip4/127.0.0.1/tcp/1/p2p/x"]
    assert r.settings.heartbeat_interval_s == 2.0 and r.settings.http_base_url == "http://127.0.0.1:1"
    # the same name joining again is a new session; every shard is read, so it shares the least-shared
    # one (shard 0 has two readers)
    again = client.join(signed_join(name="p1"))
    assert again.settings.shard_index == 1 and again.session_id != responses[1].session_id


def test_heartbeat_then_silence_then_leave(served):
    client, store, clock, _, health = served
    joined = client.join(signed_join(who=1, name="<b>bob</b>", device="cpu"))
    sid, token, dht_id = joined.session_id, joined.session_token, identity(1).peer_id
    clock.now += 1
    client.heartbeat(
        pb.HeartbeatRequest(
            session_id=sid,
            session_token=token,
            phase="training",
            samples_per_s=42.0,
            local_epoch=7,
            loss=5.5,
            dht_peer_id=dht_id,
            swarm_size=2,
            samples_total=1000,
        )
    )
    record = store.get_peer(sid)
    assert (record.local_epoch, record.loss, record.samples_per_s, record.dht_peer_id) == (
        7,
        5.5,
        42.0,
        dht_id,
    )
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT: dht_peer_id .* a session never changes"):
        client.heartbeat(pb.HeartbeatRequest(session_id=sid, session_token=token, dht_peer_id="12D3Koo"))
    assert store.get_peer(sid).dht_peer_id == dht_id  # the identity it joined with, still
    assert (record.swarm_size, record.samples_total) == (2, 1000)
    assert record.name == "<b>bob</b>"  # stored verbatim; escaping is the views' job
    assert compute_state(clock.now, record, health)[0] is PeerState.ONLINE
    clock.now += 11
    assert compute_state(clock.now, store.get_peer(sid), health)[0] is PeerState.DEAD
    client.heartbeat(
        pb.HeartbeatRequest(session_id=sid, session_token=token, phase="training", loss=math.nan)
    )
    record = store.get_peer(sid)
    assert math.isnan(record.loss) and compute_state(clock.now, record, health)[0] is PeerState.ONLINE
    client.leave(sid, token, reason="bye")
    state, reason = compute_state(clock.now, store.get_peer(sid), health)
    assert state is PeerState.LEFT and "bye" in reason


def test_unknown_session_is_rejected_not_retried(served):
    client = served[0]
    with pytest.raises(CoordinatorRejected, match="NOT_FOUND"):
        client.heartbeat(pb.HeartbeatRequest(session_id="0" * 32))
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT: session_id"):
        client.heartbeat(pb.HeartbeatRequest(session_id="nope"))


def test_health_service_reports_serving(served):
    port = served[3]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "crowdtrain.v1.Coordinator"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_second_server_on_the_same_port_fails_clearly(served, tmp_path: Path):
    port = served[3]
    servicer = CoordinatorServicer(None, None, None, initial_peers=list)
    with pytest.raises(PortInUseError, match="--grpc-port 0"):
        create_server(servicer, "127.0.0.1", port)


def test_store_survives_reopen(served, tmp_path: Path):
    client, store, *_ = served
    joined = client.join(signed_join(who=2, name="durable"))
    sid = joined.session_id
    report = dict(phase="training", uptime_s=12.5, swarm_size=3, samples_total=64, local_epoch=2)
    report["dht_peer_id"] = identity(2).peer_id
    client.heartbeat(
        pb.HeartbeatRequest(session_id=sid, session_token=joined.session_token, loss=math.nan, **report)
    )
    store.set_meta({"k": "v"})
    store.flush()  # heartbeats are written behind
    reopened = Store(tmp_path / "state.sqlite3")
    try:
        again = reopened.get_peer(sid)
        assert again.name == "durable" and reopened.get_meta("k") == "v"
        assert {k: getattr(again, k) for k in report} == report
        assert math.isnan(again.loss) and again.left_unix_s is None and again.banned is False
        assert again.token_sha256 and joined.session_token not in again.token_sha256  # only a hash
        # every field round-trips (NaN != NaN, so compare the loss apart)
        assert dataclasses.replace(again, loss=0.0) == dataclasses.replace(store.get_peer(sid), loss=0.0)
    finally:
        reopened.close()


def test_store_adds_the_columns_of_new_fields_to_an_older_database(tmp_path: Path):
    import sqlite3

    with sqlite3.connect(tmp_path / "old.sqlite3") as db:  # as if written before uptime_s and banned
        db.execute(
            "CREATE TABLE peers (session_id TEXT PRIMARY KEY, name TEXT, joined_unix_s REAL, last_seen_unix_s REAL)"
        )
        db.execute("INSERT INTO peers VALUES ('s1', 'old', 1.0, 2.0)")
    store = Store(tmp_path / "old.sqlite3")
    try:
        record = store.get_peer("s1")
        assert (record.name, record.last_seen_unix_s, record.uptime_s, record.banned) == (
            "old",
            2.0,
            0.0,
            False,
        )
        assert (
            math.isnan(record.loss) and record.source == "heartbeat" and record.dht_last_seen_unix_s is None
        )
        assert len(record.peer_id) == 12 and not record.token_sha256  # a public id; no token: must rejoin
        store.upsert_peer(PeerRecord(session_id="s2", joined_unix_s=3.0, last_seen_unix_s=3.0, uptime_s=1.5))
    finally:
        store.close()
    reopened = Store(tmp_path / "old.sqlite3")
    assert reopened.get_peer("s2").uptime_s == 1.5
    reopened.close()


def test_unreachable_coordinator_gives_up_with_advice():
    client = CoordinatorClient("127.0.0.1:1", rpc_timeout_s=0.5)
    with pytest.raises(CoordinatorUnavailable, match="check the address"):
        retry_until(lambda: client.join(signed_join()), deadline_s=1.5, what="joining", initial_backoff_s=0.2)
    client.close()


@pytest.mark.parametrize("bad", ["localhost", "host:", ":50051", "host:99999", "http://host"])
def test_bad_addresses_are_rejected(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        CoordinatorClient(bad)


def test_an_out_of_date_peer_is_told_the_upgrade_command(tmp_path: Path):
    """Join refuses a peer older than the run's minimum with FAILED_PRECONDITION and the exact
    command; the peer's client does not retry it, and its CLI prints that line."""
    store = Store(tmp_path / "state.sqlite3")
    run = RunInfo(
        "{}", "abc", "{}", 1, "http://127.0.0.1:1", tmp_path / "checkpoints", min_peer_version="0.2"
    )
    servicer = CoordinatorServicer(run, store, HealthSettings(2.0, 10.0), initial_peers=list)
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    client = CoordinatorClient(f"127.0.0.1:{port}", rpc_timeout_s=5)
    try:
        with pytest.raises(CoordinatorRejected, match="FAILED_PRECONDITION") as refused:
            client.join(signed_join(name="old", version="0.1.7", device="cpu"))
        # the coordinator lists the ways to upgrade; the peer adds the command for its own install
        from crowdtrain.peer.machine.install import upgrade_hint

        assert "upgrade crowdtrain to >= 0.2 the way you installed it" in str(refused.value)
        assert str(refused.value).endswith(f"; {upgrade_hint('0.2')}")
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert store.count_peers() == 0, "a refused joiner leaves no session behind"
        assert client.join(signed_join(name="new", version="0.2.0", device="cpu")).session_id
    finally:
        client.close()
        server.stop(0).wait()
        store.close()


def test_banned_peers_are_refused(served):
    client, store, *_ = served
    joined = client.join(signed_join(name="mallory"))
    sid = joined.session_id
    assert store.set_banned("mallory", True) == 0  # bans are by id, never by display name
    assert store.set_banned(joined.peer_id, True) == 1
    with pytest.raises(CoordinatorRejected, match="PERMISSION_DENIED"):
        client.heartbeat(pb.HeartbeatRequest(session_id=sid, session_token=joined.session_token))
    client.join(signed_join(name="mallory"))  # the name itself is nobody's identity
    # a heartbeat that raced with the ban cannot undo it
    record = store.get_peer(sid)
    store.upsert_peer(record.__class__(**{**record.__dict__, "banned": False}))
    assert store.get_peer(sid).banned


def test_reflection_lists_the_services(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    port = served[3]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"crowdtrain.v1.Coordinator", "grpc.health.v1.Health"} <= names


def test_undecodable_requests_are_invalid_arguments_not_crashes(served, caplog):
    """Garbage bytes that are no message of the method's type: INVALID_ARGUMENT with the reason,
    never UNKNOWN with a traceback in the log (found by tests/test_fuzz.py)."""
    port = served[3]
    garbage = [b"\x00", b"\xff", b"O\xca\xff\x07\x06\x86v"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in ("Join", "Heartbeat", "Leave", "GetStatus", "ListCheckpoints"):
            call = channel.unary_unary(f"/crowdtrain.v1.Coordinator/{method}")
            for data in garbage:
                with pytest.raises(grpc.RpcError) as e:
                    call(data, timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, e.value.details())
                assert "is not a valid crowdtrain.v1." in e.value.details()
        download = channel.unary_stream("/crowdtrain.v1.Coordinator/DownloadCheckpointFile")
        with pytest.raises(grpc.RpcError) as e:
            list(download(b"\xff", timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/crowdtrain.v1.Coordinator/HeartbeatStream")
        with pytest.raises(grpc.RpcError) as e:
            list(stream(iter([b"\xff"]), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_heartbeat_stream_answers_in_order_and_survives_a_restart(served, tmp_path: Path):
    client, store, clock, port, health = served
    joined = client.join(signed_join(name="streamer"))
    sid, token = joined.session_id, joined.session_token
    stream = client.heartbeat_stream()
    for epoch in range(5):
        response = stream.send(
            pb.HeartbeatRequest(session_id=sid, session_token=token, phase="training", local_epoch=epoch)
        )
        assert response.heartbeat_interval_s == health.heartbeat_interval_s
        assert store.get_peer(sid).local_epoch == epoch
    with pytest.raises(CoordinatorRejected, match="NOT_FOUND"):
        stream.send(pb.HeartbeatRequest(session_id="0" * 32))
    # the stream was closed by the refusal; the next send opens a new one
    stream.send(pb.HeartbeatRequest(session_id=sid, session_token=token, phase="training", local_epoch=9))
    assert store.get_peer(sid).local_epoch == 9
    stream.close()
    stream.close()


def test_heartbeat_stream_reports_a_silent_coordinator():
    import socket

    with socket.socket() as s:  # accepts TCP connections but never speaks HTTP/2
        s.bind(("127.0.0.1", 0))
        s.listen()
        client = CoordinatorClient(f"127.0.0.1:{s.getsockname()[1]}", rpc_timeout_s=1.0)
        stream = client.heartbeat_stream()
        with pytest.raises(CoordinatorUnavailable):
            stream.send(pb.HeartbeatRequest(session_id="x"))
        stream.close()
        client.close()


def test_a_new_phase_is_reported_at_once_not_one_heartbeat_interval_later(tmp_path: Path):
    """Join decides from the phases peers reported (e.g. whether anyone trains); a peer that starts
    training must not look "joining" for a whole interval (60 s here)."""
    import time

    from crowdtrain.peer.link.heartbeat import HeartbeatReporter, StatsBox

    store = Store(tmp_path / "state.sqlite3")
    run = RunInfo("{}", "abc", "{}", 1, "http://127.0.0.1:1", tmp_path / "checkpoints")
    servicer = CoordinatorServicer(run, store, HealthSettings(60.0, 600.0), initial_peers=lambda: [])
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    client = CoordinatorClient(f"127.0.0.1:{port}", rpc_timeout_s=5)
    stats = StatsBox()
    joined = client.join(signed_join(name="p", device="cpu"))
    sid = joined.session_id
    reporter = HeartbeatReporter(
        client, sid, joined.session_token, stats, name="p", version="v", device="cpu", interval_s=60.0
    )
    try:
        with reporter:
            deadline = time.monotonic() + 20
            while store.get_peer(sid).last_seen_unix_s == store.get_peer(sid).joined_unix_s:
                assert time.monotonic() < deadline, "the first heartbeat never arrived"
                time.sleep(0.05)
            first = store.get_peer(sid)
            assert (first.phase, first.version, first.device) == ("joining", "v", "cpu")
            assert first.uptime_s >= 0
            stats.update(phase="training")
            while store.get_peer(sid).phase != "training":
                assert time.monotonic() < deadline, "the new phase waited for the next interval"
                time.sleep(0.05)
    finally:
        client.close()
        server.stop(0).wait()
        store.close()


def test_heartbeat_request_carries_exactly_the_peer_report_and_views_fill_the_status_protos():
    """A new metric is one field in PeerReport and one in HeartbeatRequest: they must agree by name
    (besides the credentials, the DHT proof, the evidence against other peers and its groups)."""
    credentials = {"session_id", "session_token", "dht_public_key", "dht_signature", "rejections", "groups"}
    assert {f.name for f in pb.HeartbeatRequest.DESCRIPTOR.fields} == {*credentials, *FIELD_NAMES}
    # every field of every request has a limit
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        if message.name.endswith("Request"):
            assert {f.name for f in message.fields} == set(REQUEST_LIMITS[message.name]), message.name
    views = {f.name for f in dataclasses.fields(PeerView)}
    assert {f.name for f in pb.PeerStatus.DESCRIPTOR.fields} <= views
    assert {f.name for f in pb.SwarmSummary.DESCRIPTOR.fields} <= {
        f.name for f in dataclasses.fields(SwarmSummary)
    }


def test_every_domain_error_has_one_status_code():
    domain = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RequestError)}
    assert set(STATUS_CODES) == domain - {errors.RequestError}
    assert STATUS_CODES[errors.BannedError] is grpc.StatusCode.PERMISSION_DENIED  # the peer stops on it


def test_reports_are_bounded_and_garbage_never_breaks_the_servicer(served):
    client, store, *_ = served
    joined = client.join(signed_join(name="n" * 1000, version="v" * 1000, device="d" * 1000))
    sid, token = joined.session_id, joined.session_token
    record = store.get_peer(sid)
    join_limits = REQUEST_LIMITS["JoinRequest"]
    assert (len(record.name), len(record.version), len(record.device)) == (
        join_limits["name"].max_len,
        join_limits["version"].max_len,
        join_limits["device"].max_len,
    )
    client.heartbeat(
        pb.HeartbeatRequest(
            session_id=sid, session_token=token, phase="training", loss=-math.inf, uptime_s=math.nan
        )
    )
    record = store.get_peer(sid)
    assert record.uptime_s == 0 and math.isnan(record.loss)  # NaN: unknown; an absurd loss: unknown
    for bad, what in (
        ({"phase": "p" * 100}, "phase"),
        ({"dht_peer_id": "Q" * 300}, "dht_peer_id"),
        ({"samples_per_s": math.inf}, "samples_per_s"),
        ({"local_epoch": -5}, "local_epoch"),
        ({"samples_total": -1}, "samples_total"),
    ):
        with pytest.raises(CoordinatorRejected, match=f"INVALID_ARGUMENT: {what}"):
            client.heartbeat(pb.HeartbeatRequest(session_id=sid, session_token=token, **bad))
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT: session_id"):
        client.heartbeat(pb.HeartbeatRequest(session_id="s" * 10_000))
    assert store.get_peer(sid).phase == "training"  # refused reports change nothing
    client.leave(sid, token, reason="r" * 1000)
    assert len(store.get_peer(sid).left_reason) == REQUEST_LIMITS["LeaveRequest"]["reason"].max_len


def test_joiners_resume_from_the_latest_checkpoint_only_when_nobody_trains(served, tmp_path: Path):
    """Only a trainer another identity reported averaging with counts: one peer's own "training"
    heartbeats and progress records must not send newcomers to load a live state nobody can send."""
    client, store, clock, *_ = served
    assert client.join(signed_join(name="first")).settings.resume_from_step == 0  # nothing published
    root = tmp_path / "checkpoints"  # the served run's checkpoint_root
    for step in (3, 8):
        staging = archive.new_staging_dir(root, step)
        (staging / "model.safetensors").write_bytes(b"w")
        archive.finalize(staging, root, CheckpointMeta("ct_test", step, 0, 5.0, 1.0, "m", None, ()))
    trainer = client.join(signed_join(who=3, name="trainer"))
    assert trainer.settings.resume_from_step == 8  # the swarm left: start from the latest
    client.heartbeat(_beat(trainer, 3, phase="training"))
    # a heartbeat saying "training" is not enough: the swarm's records must confirm a proven identity
    assert client.join(signed_join(name="early")).settings.resume_from_step == 8
    client.heartbeat(_beat(trainer, 3, proof=True, phase="training"))
    assert store.mark_dht_seen(identity(3).peer_id, clock.now, 1)
    # nor is its own progress record: another identity must report averaging with it
    assert client.join(signed_join(name="alone")).settings.resume_from_step == 8
    mate = client.join(signed_join(who=4, name="mate"))
    group = pb.AveragingGroup(group_id=b"g" * 20, epoch=1, members=[identity(3).peer_id, identity(4).peer_id])
    client.heartbeat(_beat(mate, 4, proof=True, phase="training", groups=[group]))
    assert client.join(signed_join(name="late")).settings.resume_from_step == 0  # load from peers
    clock.now += 60  # the trainer went silent
    assert client.join(signed_join(name="later")).settings.resume_from_step == 8


def _beat(joined: pb.JoinResponse, who: int, proof: bool = False, **fields) -> pb.HeartbeatRequest:
    """A heartbeat of `joined` claiming test identity `who` (the one it joined with), with its proof."""
    if proof:
        fields["dht_public_key"], fields["dht_signature"] = identity(who).prove(joined.dht_challenge)
    return pb.HeartbeatRequest(
        session_id=joined.session_id,
        session_token=joined.session_token,
        dht_peer_id=identity(who).peer_id,
        **fields,
    )
