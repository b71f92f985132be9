"""Floods of the gRPC plane: silent calls, hammering one RPC, and what stays
served meanwhile. In-process server on 127.0.0.1:0; an attacker at a different address is routed
through a TCP relay whose connections to the server come from 127.0.0.2 (Linux routes 127/8 to lo).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.api.grpcserver import GrpcLimits, create_server
from crowdtrain.coordinator.api.loopthread import LoopThread
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.flood.callbudget import CallBudget, CallLimits, Pool, PoolCaps
from crowdtrain.coordinator.flood.ratelimit import BucketSettings
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checkpoints.format import META_NAME, CheckpointMeta
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.identities import signed_join

HEALTH = HealthSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=10.0)
FLOOD_CALLS, FLOOD_CONNECTIONS = 2000, 20  # the review's probe: 2,000 silent streams on 20 connections


class Served:
    """A coordinator on 127.0.0.1:0 with one published checkpoint, and an attacker's event loop."""

    def __init__(self, tmp_path: Path, limits: GrpcLimits):
        self.root = tmp_path / "checkpoints"
        staging = archive.new_staging_dir(self.root, 2)
        (staging / "model.safetensors").write_bytes(b"w" * 1000)
        archive.finalize(staging, self.root, CheckpointMeta("ct_test", 2, 0, 5.0, 1.0, "m", None, ()))
        self.store = Store(tmp_path / "state.sqlite3")
        run = RunInfo('{"run": 1}', "abc", "{}", 3, "http://127.0.0.1:1", self.root)
        status = build_status(time.time(), "run", [], {}, HEALTH, SwarmProgress(), [])
        servicer = CoordinatorServicer(run, self.store, HEALTH, initial_peers=list, status=lambda: status)
        self.server, self.port = create_server(servicer, "127.0.0.1", 0, limits)
        self.server.start()
        # generous deadlines: the machine may be busy; what is checked is the answers' codes
        self.client = CoordinatorClient(f"127.0.0.1:{self.port}", rpc_timeout_s=30)
        self.attacker = LoopThread("attacker")
        self.relays: list[asyncio.Server] = []

    def held(self) -> dict[Pool, int]:
        return self.server.calls_held()

    def relay_from(self, source_host: str) -> int:
        """The port of a relay to this server whose connections come from `source_host`."""
        relay = self.attacker.run(relay_from(source_host, self.port))
        self.relays.append(relay)
        return relay.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.client.close()
        self.attacker.run(_cancel_all(self.relays), timeout_s=10)
        self.attacker.close()
        self.server.stop(0)
        self.store.close()


async def _cancel_all(relays: list[asyncio.Server]) -> None:
    """End the attacker's relays and calls before its loop closes."""
    for relay in relays:
        relay.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def served(tmp_path: Path, request):
    served = Served(tmp_path, getattr(request, "param", GrpcLimits()))
    try:
        yield served
    finally:
        served.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def relay_from(source_host: str, port: int) -> asyncio.Server:
    """A relay on 127.0.0.1 whose every connection reaches 127.0.0.1:`port` from `source_host`."""

    async def connect(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_host, 0))
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    return await asyncio.start_server(connect, "127.0.0.1", 0)


class Flood:
    """`FLOOD_CALLS` HeartbeatStream calls that never send a message, spread over connections."""

    def __init__(self, target: str):
        self.target, self.channels, self.calls = target, [], []

    async def open(self) -> None:
        """Connection by connection, as the review's probe did; a call gRPC core shed (CANCELLED:
        its queue of arriving calls was long) is opened again, so that 2,000 are held if they can be.
        Run on the attacker's loop (grpc.aio channels belong to the loop that made them)."""
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
        for _ in range(FLOOD_CONNECTIONS):
            self.channels.append(grpc.aio.insecure_channel(self.target, options=options))
            stub = pb_grpc.CoordinatorStub(self.channels[-1])
            batch = [stub.HeartbeatStream() for _ in range(FLOOD_CALLS // FLOOD_CONNECTIONS)]
            for _ in range(3):
                await asyncio.gather(*(c.wait_for_connection() for c in batch), return_exceptions=True)
                await asyncio.sleep(0.02)
                shed = [c for c in batch if c.done() and await c.code() is grpc.StatusCode.CANCELLED]
                self.calls += [c for c in batch if c not in shed]
                batch = [stub.HeartbeatStream() for _ in shed]
            self.calls += batch

    async def outcome(self) -> list[grpc.StatusCode]:
        codes = await asyncio.gather(*(c.code() for c in self.calls))
        for channel in self.channels:
            await channel.close()
        return codes


def start_flood(served: Served, source_host: str) -> tuple[Flood, float]:
    """The flood from `source_host`, opened; and when the last call was opened."""
    port = served.port if source_host == "127.0.0.1" else served.relay_from(source_host)
    flood = Flood(f"127.0.0.1:{port}")
    served.attacker.run(flood.open(), timeout_s=120)
    return flood, time.monotonic()


def heartbeat(joined: pb.JoinResponse) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        session_id=joined.session_id, session_token=joined.session_token, phase="training"
    )


def pull(client: CoordinatorClient) -> bytes:
    [listed] = client.list_checkpoints().checkpoints
    chunks = client.download_checkpoint_file(listed.step, "model.safetensors", 0, timeout_s=30)
    return b"".join(c.data for c in chunks)


def test_silent_streams_from_one_address_leave_everyone_else_served(served):
    """The review's silent-stream probe from 127.0.0.2: before, every new call got RESOURCE_EXHAUSTED while
    the 2,000 silent streams were held. Now an existing session heartbeats (its stream opened in
    the flood), a newcomer joins and a checkpoint is pulled, and the flood ends by itself."""
    joined = served.client.join(signed_join(name="honest"))
    flood, t0 = start_flood(served, "127.0.0.2")
    stream = served.client.heartbeat_stream()
    for _ in range(3):
        assert stream.send(heartbeat(joined)).heartbeat_interval_s == 2.0
    served.client.heartbeat(heartbeat(joined))
    assert served.client.join(signed_join(name="newcomer")).session_id
    assert pull(served.client) == b"w" * 1000
    held = served.held()
    assert held[Pool.WAITING] <= CallLimits().waiting.per_address and held[Pool.SESSION_STREAM] == 1
    codes = served.attacker.run(flood.outcome(), timeout_s=120)
    elapsed = time.monotonic() - t0
    # pushed out by the newer silent calls of their address, or ended at 5 s: none served, none held
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, set(codes)
    assert elapsed < 5.0 + 30.0  # held by nothing: on the old server they never ended
    assert 0 < codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) <= CallLimits().waiting.per_address
    assert stream.send(heartbeat(joined)).heartbeat_interval_s == 2.0  # the honest stream lives on
    stream.close()


def test_a_flood_from_the_sessions_own_address_cannot_starve_its_heartbeats(served):
    """Behind one NAT with the attacker: the established stream keeps answering, and the session
    opens a new stream during the flood (a reconnect while the old call lingers on the server),
    pushing out calls that stayed silent; the new stream replaces the old one."""
    joined = served.client.join(signed_join(name="behind the same NAT"))
    stream = served.client.heartbeat_stream()
    stream.send(heartbeat(joined))
    start_flood(served, "127.0.0.1")
    for _ in range(3):
        assert stream.send(heartbeat(joined)).heartbeat_interval_s == 2.0
    reopened = served.client.heartbeat_stream()
    for _ in range(2):
        assert reopened.send(heartbeat(joined)).heartbeat_interval_s == 2.0
    served.client.heartbeat(heartbeat(joined))  # a unary heartbeat: no address's budget to spend
    with pytest.raises(CoordinatorRejected, match="ABORTED: .*newer HeartbeatStream"):
        stream.send(heartbeat(joined))
    assert served.held()[Pool.SESSION_STREAM] == 1
    reopened.close()


@pytest.mark.parametrize("served", [GrpcLimits(calls=CallLimits(first_message_timeout_s=0.5))], indirect=True)
def test_a_call_that_sends_no_request_is_ended_after_the_first_message_timeout(served):
    async def silent(method: str, streaming_response: bool):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            open_call = channel.stream_stream if streaming_response else channel.stream_unary
            call = open_call(method)()
            t0 = time.monotonic()
            code, details = await call.code(), await call.details()
            return code, details, time.monotonic() - t0

    for method, streaming in (
        ("/crowdtrain.v1.Coordinator/HeartbeatStream", True),
        ("/crowdtrain.v1.Coordinator/Join", False),  # a unary call's headers without its request
        ("/grpc.health.v1.Health/Watch", True),
    ):
        code, details, elapsed = served.attacker.run(silent(method, streaming), timeout_s=30)
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "no request message within 0.5s" in details
        assert 0.4 < elapsed < 10.0, (method, elapsed)
    assert sum(served.held().values()) == 0


def test_hammering_listings_and_status_is_refused_per_address(served):
    """One address calling ListCheckpoints/GetStatus as fast as it can gets its burst, then
    RESOURCE_EXHAUSTED with a retry time, while another address is served."""

    async def hammer(port: int, method) -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub, codes = pb_grpc.CoordinatorStub(channel), []
            for _ in range(200):
                try:
                    await method(stub)(timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in e.details()
                    assert "127.0.0.2" in e.details()
                    codes.append(e.code())
            return codes

    port = served.relay_from("127.0.0.2")
    limits = CallLimits()
    for method, bucket in (
        (lambda s: lambda **kw: s.ListCheckpoints(pb.ListCheckpointsRequest(), **kw), limits.listings),
        (lambda s: lambda **kw: s.GetStatus(pb.GetStatusRequest(), **kw), limits.status),
    ):
        t0 = time.monotonic()
        codes = served.attacker.run(hammer(port, method), timeout_s=120)
        allowed = bucket.capacity + (time.monotonic() - t0) * bucket.refill_per_s
        assert bucket.capacity <= codes.count(grpc.StatusCode.OK) <= allowed + 1
        assert codes[-1] is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert served.client.list_checkpoints().checkpoints[0].step == 2  # 127.0.0.1: served
        assert served.client.get_status().summary is not None


def test_the_listing_is_read_from_disk_only_when_a_checkpoint_changes(tmp_path: Path, monkeypatch):
    """So that hammering costs no disk reads, the listing behind ListCheckpoints and every download
    is cached: re-read after a publication, a retention removal or an edited crowdtrain.json, never
    per request."""
    root, reads = tmp_path / "checkpoints", []
    real = archive.list_checkpoints
    monkeypatch.setattr(archive, "list_checkpoints", lambda r: reads.append(r) or real(r))

    def publish(step: int) -> None:
        staging = archive.new_staging_dir(root, step)
        (staging / "model.safetensors").write_bytes(b"w")
        archive.finalize(staging, root, CheckpointMeta("ct_test", step, 0, 5.0, 1.0, "m", None, ()))

    assert archive.published(root) == [] and archive.published(root) == []
    publish(1)
    for _ in range(100):
        assert [m.step for m in archive.published(root)] == [1]
        archive.lookup_file(root, None, "model.safetensors")
    assert len(reads) == 2
    publish(2)
    assert [m.step for m in archive.published(root)] == [1, 2] and len(reads) == 3
    archive.remove_checkpoint(root, 1)
    assert [m.step for m in archive.published(root)] == [2] and len(reads) == 4
    meta = root / "step-00000002" / META_NAME
    meta.write_text(meta.read_text().replace('"eval_loss": 5.0', '"eval_loss": 4.25'))  # edited in place
    assert archive.published(root)[0].eval_loss == 4.25 and len(reads) == 5


@pytest.mark.parametrize(
    "served", [GrpcLimits(max_connection_age_s=0.5, max_connection_age_grace_s=0.5)], indirect=True
)
def test_a_peers_heartbeat_stream_survives_the_connection_age_limit(served):
    """The server ends every connection after max_connection_age (+grace): the peer's stream is
    cut, its next heartbeat fails and the one after opens a new stream on a new connection."""
    joined = served.client.join(signed_join(name="long-lived"))
    stream = served.client.heartbeat_stream()
    stream.send(heartbeat(joined))
    failed = 0
    for _ in range(4):
        time.sleep(0.7)  # 2 connection lifetimes in all
        try:
            stream.send(heartbeat(joined))
        except CoordinatorUnavailable:
            failed += 1
            stream.send(heartbeat(joined))  # what the peer's next heartbeat does
    assert failed >= 1  # the limit did cut the stream
    stream.close()


# ---------------------------------------------------------------- the budget itself (pure)


def small_budget() -> CallBudget:
    limits = CallLimits(
        waiting=PoolCaps(3, 2), session_streams=PoolCaps(4, 2), open_calls=PoolCaps(2, 1),
        open_streams=PoolCaps(2, 1), listings=BucketSettings(3, 1.0),
    )  # fmt: skip
    return CallBudget(limits, clock=lambda: 0.0)


def test_silent_calls_push_out_only_the_longest_waiting_and_never_take_session_slots():
    budget, ended = small_budget(), []
    attacker = [budget.open("6.6.6.6", lambda i=i: ended.append(i)) for i in range(3)]
    assert ended == [0] and attacker[0].end_reason.startswith("more than 2 calls from this address")
    other = [budget.open("9.9.9.9", list) for _ in range(2)]  # the pool is full: the oldest goes
    assert ended == [0, 1] and attacker[1].end_reason.startswith("more than 3 calls waited")
    for i, key in enumerate(("9.9.9.9", "7.7.7.7")):  # unauthenticated work fills its own pools
        first, second = other if i == 0 else [budget.open(key, list) for _ in range(2)]
        assert budget.move(first, Pool.OPEN_STREAM) == budget.move(second, Pool.OPEN_CALL) == (True, "")
    ok, why = budget.move(budget.open("8.8.8.8", list), Pool.OPEN_CALL)
    assert (ok, why) == (False, "the coordinator already holds 2 calls (at most 2)")
    ok, why = budget.move(budget.open("7.7.7.7", list), Pool.OPEN_CALL)
    assert (ok, why) == (False, "7.7.7.7 already holds 1 calls (at most 1 per address)")
    honest = budget.open("1.2.3.4", list)  # a new heartbeat stream: there is still room for it
    budget.move(honest, None)
    assert budget.accept_session(honest, "s1") == (True, "")
    assert budget.held() == {Pool.WAITING: 1, Pool.SESSION_STREAM: 1, Pool.OPEN_CALL: 2, Pool.OPEN_STREAM: 2}
    assert ended == [0, 1] and budget.held_by("6.6.6.6")[Pool.WAITING] == 1


def test_a_session_holds_one_stream_and_rates_are_per_address_and_group():
    budget, ended, tickets = small_budget(), [], []
    for i in range(5):  # five streams of one session, each accepted: only the newest is kept
        tickets.append(budget.open("1.2.3.4", lambda i=i: ended.append(i)))
        budget.move(tickets[-1], None)
        assert budget.accept_session(tickets[-1], "s1")[0]
    assert ended == [0, 1, 2, 3] and budget.held()[Pool.SESSION_STREAM] == 1
    assert tickets[0].end_reason == "this session opened a newer HeartbeatStream; only the newest is kept"
    assert budget.accept_session(budget.open("1.2.3.4", list), "s2")[0]  # per address: 2
    ok, why = budget.accept_session(budget.open("1.2.3.4", list), "s3")
    assert not ok and why == "1.2.3.4 already holds 2 heartbeat streams (at most 2 per address); retry later"
    budget.close(tickets[-1])
    assert budget.held()[Pool.SESSION_STREAM] == 1
    assert [budget.rate("listings", "6.6.6.6")[0] for _ in range(4)] == [True, True, True, False]
    assert budget.rate("listings", "6.6.6.6")[1] == 1.0  # seconds until the next one
    assert budget.rate("listings", "1.2.3.4")[0] and budget.rate("status", "6.6.6.6")[0]
    assert all(budget.rate(None, "6.6.6.6")[0] for _ in range(100))  # heartbeats, joins: no rate here
