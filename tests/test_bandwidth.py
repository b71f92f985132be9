"""--max-upload-mbps (peer/machine/bandwidth.py): the shared token bucket with an injected clock, its sharing
across forked processes, the wrapping of hivemind's send path, and the cap measured on real hivemind
P2P traffic over 127.0.0.1 and, as root, across a shaped link between two network namespaces."""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing as mp
import os
import threading
import time

import pytest
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.machine import bandwidth
from crowdtrain.peer.machine.bandwidth import (
    BucketState,
    HivemindSendPathChanged,
    SharedTokenBucket,
    UploadLimit,
    UploadLimitError,
    active_limit,
    check_send_path,
    limit_upload,
    reserve,
    upload_cap,
)

from scripts import bench_upload as probe

FORK = mp.get_context("fork")


@pytest.fixture(autouse=True)
def no_cap_left_behind():
    """Every test leaves hivemind's send path as it found it."""
    yield
    limit_upload(0)


class FakeClock:
    def __init__(self, start_s: float = 100.0):
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.now_s += seconds


class RecordingWriter:
    """An asyncio StreamWriter stand-in: records (clock time, bytes) of each write."""

    def __init__(self, clock: FakeClock):
        self.clock, self.writes = clock, []

    def write(self, data) -> None:
        self.writes.append((self.clock(), bytes(data)))

    async def drain(self) -> None:
        return None


# ---------------------------------------------------------------- the bucket, injected clock


@pytest.mark.parametrize("mbps", [0.1, 1.0, 5.0, 20.0, 50.0, 1000.0])
def test_the_cap_has_a_quarter_second_burst_of_at_least_one_small_chunk(mbps):
    cap = upload_cap(mbps)
    assert math.isclose(cap.mbps, mbps)
    assert math.isclose(cap.burst_bytes, max(cap.chunk_bytes, cap.rate_bytes_per_s * bandwidth.BURST_S))
    assert cap.chunk_bytes <= cap.burst_bytes
    assert bandwidth.MIN_CHUNK_BYTES <= cap.chunk_bytes <= bandwidth.MAX_CHUNK_BYTES
    assert cap.chunk_bytes / cap.rate_bytes_per_s <= max(bandwidth.CHUNK_S, 0.1)  # smooth at any cap


@pytest.mark.parametrize("bad", [-1.0, 0.05, float("nan"), float("inf"), "20"])
def test_unusable_caps_are_refused_with_what_to_pass(bad):
    with pytest.raises(UploadLimitError, match="--max-upload-mbps") as caught:
        limit_upload(bad)
    assert isinstance(caught.value, CrowdtrainError)
    assert active_limit() is None


def test_a_full_bucket_passes_its_burst_then_meters_at_the_rate():
    cap = upload_cap(20.0)
    state = BucketState(cap.burst_bytes, 0.0)
    state, wait_s = reserve(0.0, state, int(cap.burst_bytes), cap)
    assert wait_s == 0.0
    state, wait_s = reserve(0.0, state, cap.chunk_bytes, cap)
    assert math.isclose(wait_s, cap.chunk_bytes / cap.rate_bytes_per_s)
    # a long idle refills only up to the burst
    state, wait_s = reserve(3600.0, state, int(cap.burst_bytes) + 1000, cap)
    assert math.isclose(wait_s, 1000 / cap.rate_bytes_per_s)


def test_a_clock_that_goes_backwards_refills_nothing():
    cap = upload_cap(8.0)
    state, _ = reserve(50.0, BucketState(0.0, 50.0), 0, cap)
    state, wait_s = reserve(10.0, state, 1000, cap)
    assert math.isclose(wait_s, 1000 / cap.rate_bytes_per_s)
    assert state.updated_s == 50.0


def test_sustained_reservations_never_exceed_rate_times_time_plus_burst():
    cap, clock = upload_cap(20.0), FakeClock(0.0)
    state, sent = BucketState(cap.burst_bytes, 0.0), 0
    while clock.now_s < 10.0:
        state, wait_s = reserve(clock.now_s, state, cap.chunk_bytes, cap)
        clock.now_s += wait_s  # the sender sleeps, then sends
        sent += cap.chunk_bytes
        assert sent <= cap.burst_bytes + cap.rate_bytes_per_s * clock.now_s + 1e-6
    assert sent >= cap.rate_bytes_per_s * clock.now_s  # and the cap is used, not wasted


def test_a_30_mb_write_leaves_in_chunks_at_the_rate_not_as_one_burst():
    clock = FakeClock()
    limit = UploadLimit(upload_cap(20.0), clock=clock, sleep=clock.sleep)
    writer, data, t0 = RecordingWriter(clock), os.urandom(30 * 10**6), clock()
    try:
        asyncio.run(limit.send(writer, data))
        counters = limit.counters()
    finally:
        limit.shutdown()
    cap = limit.cap
    assert b"".join(chunk for _, chunk in writer.writes) == data
    assert max(len(chunk) for _, chunk in writer.writes) <= cap.chunk_bytes
    written = 0
    for at_s, chunk in writer.writes:
        written += len(chunk)
        assert written <= cap.burst_bytes + cap.rate_bytes_per_s * (at_s - t0) + 1e-3
    elapsed_s = clock() - t0
    assert math.isclose(elapsed_s, (len(data) - cap.burst_bytes) / cap.rate_bytes_per_s, rel_tol=1e-6)
    assert counters.bytes_sent == len(data)
    assert math.isclose(counters.waited_s, elapsed_s, rel_tol=1e-6)  # only the sleeps moved the clock
    asyncio.run(limit.send(writer, b"late"))  # a send racing the shutdown goes out, unmetered
    assert writer.writes[-1][1] == b"late" and limit.counters() == counters and clock() - t0 == elapsed_s


# ---------------------------------------------------------------- shared by forked processes


def _reserve_in_child(bucket: SharedTokenBucket, n_bytes: int, out) -> None:
    out.send(bucket.reserve(n_bytes))


def test_a_forked_child_draws_from_the_same_bucket():
    cap = upload_cap(20.0)
    bucket = SharedTokenBucket(cap, clock=lambda: 1000.0)  # time stands still: no refill
    try:
        assert bucket.reserve(int(cap.burst_bytes)) == 0.0
        receive, send = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_reserve_in_child, args=(bucket, cap.chunk_bytes, send))
        child.start()
        child_wait_s = receive.recv()
        child.join(10)
        assert math.isclose(child_wait_s, cap.chunk_bytes / cap.rate_bytes_per_s)
        # the parent now queues behind the child's reservation
        assert math.isclose(bucket.reserve(cap.chunk_bytes), 2 * cap.chunk_bytes / cap.rate_bytes_per_s)
        assert bucket.counters().bytes_sent == int(cap.burst_bytes) + 2 * cap.chunk_bytes
    finally:
        bucket.close()


def _send_until(bucket: SharedTokenBucket, start_s: float, stop_s: float, out) -> None:
    while time.monotonic() < start_s:
        time.sleep(0.001)
    sent = 0
    while time.monotonic() < stop_s:
        bucket.wait(bucket.cap.chunk_bytes)
        sent += bucket.cap.chunk_bytes
    out.send((sent, time.monotonic()))


def test_two_processes_together_do_not_exceed_the_rate():
    cap = upload_cap(8.0)  # 1 MB/s
    bucket = SharedTokenBucket(cap)
    start_s = time.monotonic() + 0.5
    stop_s = start_s + 1.5
    try:
        receive, send = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_send_until, args=(bucket, start_s, stop_s, send))
        child.start()
        here = threading.Thread(target=_send_until, args=(bucket, start_s, stop_s, send))
        here.start()
        results = [receive.recv(), receive.recv()]
        here.join(10)
        child.join(10)
    finally:
        bucket.close()
    sent = sum(n for n, _ in results)
    span_s = max(end for _, end in results) - start_s
    assert sent <= cap.burst_bytes + cap.rate_bytes_per_s * span_s + 2 * cap.chunk_bytes
    assert sent >= 0.85 * cap.rate_bytes_per_s * span_s
    assert all(n > 0 for n, _ in results)  # both got a share


def _die_holding_the_lock(bucket: SharedTokenBucket) -> None:
    bucket._locked(lambda cells: os._exit(3))


def test_a_process_that_dies_holding_the_lock_does_not_hang_the_others():
    bucket = SharedTokenBucket(upload_cap(20.0))
    try:
        child = FORK.Process(target=_die_holding_the_lock, args=(bucket,))
        child.start()
        child.join(10)
        assert child.exitcode == 3
        done = threading.Event()
        threading.Thread(target=lambda: (bucket.reserve(1000), done.set()), daemon=True).start()
        assert done.wait(5.0), "the bucket stayed locked after its holder died"
    finally:
        bucket.close()


# ---------------------------------------------------------------- hivemind's send path


def test_the_installed_hivemind_sends_the_way_the_cap_wraps():
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings import control

    check_send_path(P2P, control)  # raises if hivemind's internals moved


def test_a_changed_hivemind_is_refused_loudly():
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings import control

    class WritesDirectly(P2P):
        @staticmethod
        async def send_protobuf(protobuf, writer):
            writer.write(protobuf.SerializeToString())

    class NoRawData:
        HEADER_LEN, BYTEORDER = 8, "big"

    for changed, what in ((WritesDirectly, "send_protobuf"), (NoRawData, "send_raw_data")):
        with pytest.raises(HivemindSendPathChanged, match=what) as caught:
            check_send_path(changed, control)
        assert "hivemind 1.1.12" in str(caught.value)


def test_installing_is_idempotent_and_removing_the_cap_restores_hivemind():
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings import control

    original_raw, original_pbmsg = inspect.getattr_static(P2P, "send_raw_data"), control.write_pbmsg
    first = limit_upload(20.0)
    wrapped = inspect.getattr_static(P2P, "send_raw_data")
    assert wrapped is not original_raw and control.write_pbmsg is not original_pbmsg
    second = limit_upload(5.0)
    first.shutdown()  # already replaced: shutting it down leaves the new cap installed
    assert active_limit() is second and inspect.getattr_static(P2P, "send_raw_data") is wrapped
    assert limit_upload(0) is None
    assert active_limit() is None
    assert inspect.getattr_static(P2P, "send_raw_data") is original_raw
    assert control.write_pbmsg is original_pbmsg
    second.shutdown()  # again: nothing happens


# ---------------------------------------------------------------- real hivemind traffic


def within_10_percent(measured_mbps: float, cap_mbps: float) -> bool:  # the tolerance
    return 0.9 * cap_mbps <= measured_mbps <= 1.1 * cap_mbps


def test_a_stream_over_127_0_0_1_leaves_at_the_cap():
    cap_mbps = 20.0
    measured = asyncio.run(probe.loopback_measurement(cap_mbps, probe.bytes_for(cap_mbps, 5.0)))
    assert measured.payload_bytes >= 10 * 10**6
    assert within_10_percent(measured.mbps, cap_mbps), measured
    assert within_10_percent(measured.steady_mbps, cap_mbps), measured
    assert measured.waited_s > 0.5 * measured.elapsed_s  # the bucket, not the link, set the pace


async def _unary_upload(cap_mbps: float, calls: int) -> tuple[float, UploadLimit]:
    from google.protobuf import wrappers_pb2
    from hivemind.p2p import P2P

    receiver, sender, received = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), None, []

    async def handler(request, context):
        received.append(len(request.value))
        return wrappers_pb2.BytesValue()

    try:
        await receiver.add_protobuf_handler("upload_unary", handler, wrappers_pb2.BytesValue)
        sender = await P2P.create(
            initial_peers=await receiver.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
        limit = limit_upload(cap_mbps)
        payload = wrappers_pb2.BytesValue(value=os.urandom(probe.PART_BYTES))
        t0 = time.monotonic()
        call = sender.call_protobuf_handler
        reply = wrappers_pb2.BytesValue
        await asyncio.gather(*(call(receiver.peer_id, "upload_unary", payload, reply) for _ in range(calls)))
        elapsed_s = time.monotonic() - t0
        assert received == [probe.PART_BYTES] * calls
        return elapsed_s, limit
    finally:
        for p2p in (sender, receiver):
            if p2p is not None:
                await p2p.shutdown()


def test_unary_calls_such_as_the_dhts_wait_for_the_cap_too():
    cap_mbps, calls = 20.0, 10
    elapsed_s, limit = asyncio.run(_unary_upload(cap_mbps, calls))
    cap = limit.cap
    # over T seconds a bucket lets out rate * T + burst: the rate is what exceeds the burst
    metered_mbps = (calls * probe.PART_BYTES - cap.burst_bytes) * 8 / elapsed_s / 1e6
    assert within_10_percent(metered_mbps, cap_mbps), (elapsed_s, metered_mbps)
    assert limit.counters().bytes_sent >= calls * probe.PART_BYTES


def _child_sender(cap_mbps: float, total_bytes: int, maddrs, ready, go, out) -> None:
    """A process forked after the cap was set, as hivemind's DHT and averagers are: streams to the
    receiver once `go` is set, and reports (bytes, when it finished)."""
    from hivemind.p2p import P2P, PeerID

    async def run() -> None:
        to = maddrs.get(timeout=60)
        p2p = await P2P.create(initial_peers=to, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 60)
            peer_id = PeerID.from_base58(to[0].rpartition("/p2p/")[2])
            measured = await probe.send_probe(p2p, peer_id, total_bytes, cap_mbps)
            out.put((measured.payload_bytes, time.monotonic()))
        finally:
            await p2p.shutdown()

    asyncio.run(run())


async def _two_senders(cap_mbps: float, total_bytes: int, child_io) -> tuple[int, float]:
    from hivemind.p2p import P2P

    maddrs, ready, go, out = child_io
    loop = asyncio.get_running_loop()
    receiver = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sender = None
    try:
        await probe.serve_probe(receiver)
        visible = await receiver.get_visible_maddrs()
        sender = await P2P.create(initial_peers=visible, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs.put([str(m) for m in visible])
        assert await loop.run_in_executor(None, ready.wait, 60), "the forked sender did not start"
        t0 = time.monotonic()
        go.set()
        mine = await probe.send_probe(sender, receiver.peer_id, total_bytes, cap_mbps)
        my_end = time.monotonic()
        child_bytes, child_end = await loop.run_in_executor(None, out.get, True, 60)
        return mine.payload_bytes + child_bytes, max(my_end, child_end) - t0
    finally:
        for p2p in (sender, receiver):
            if p2p is not None:
                await p2p.shutdown()


def test_a_forked_process_and_its_parent_share_one_cap_on_real_traffic():
    cap_mbps = 20.0
    each = probe.bytes_for(cap_mbps, 2.5)  # alone, each would take 2.5 s at the cap
    limit_upload(cap_mbps)
    child_io = (FORK.Queue(), FORK.Event(), FORK.Event(), FORK.Queue())
    child = FORK.Process(target=_child_sender, args=(cap_mbps, each, *child_io))
    child.start()
    try:
        total, span_s = asyncio.run(_two_senders(cap_mbps, each, child_io))
    finally:
        child.join(30)
        if child.is_alive():
            child.terminate()
            child.join(10)
    assert total == 2 * each
    together_mbps = total * 8 / span_s / 1e6
    assert within_10_percent(together_mbps, cap_mbps), (together_mbps, span_s)


def test_the_cap_holds_within_10_percent_across_a_shaped_link():
    """As root: sender and receiver in two network namespaces joined by a 100 Mbit/s tbf link."""
    from scripts import wan

    ok, why = wan.probe()
    if not ok:
        pytest.skip(f"a shaped link needs network namespaces: {why}")
    cap_mbps = 20.0
    (measured,), link = probe.shaped_measurements([cap_mbps], link_mbit=100.0, seconds=5.0)
    assert "100 Mbit/s" in link
    assert measured.payload_bytes >= 10 * 10**6
    assert within_10_percent(measured.mbps, cap_mbps), measured
    assert within_10_percent(measured.steady_mbps, cap_mbps), measured
