"""A live coordinator in this process for the fuzzer (scripts/fuzz.py, tests/test_fuzz.py), built as
crowdtrain.coordinator.app wires one but without a DHT or a publisher: a Store on a temporary
SQLite file, the servicer on grpc.aio, the HTTP server, one data shard and one published,
signed checkpoint. Also the well-behaved peer whose heartbeat latency the fuzz must not hurt, and
the identities that sign Joins (every Join must name and sign its identity key) and prove
themselves in heartbeats, as a real peer does.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import grpc
from crowdtrain.coordinator import signing
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.metrics import CoordinatorMetrics
from crowdtrain.coordinator.api.servicer import SERVICE_NAME, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.status import SwarmProgress, SwarmStatus, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.admission.identity import PeerIdentity, throwaway_identity
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.protos import coordinator_pb2 as pb

from scripts.fuzz_inputs import Hints

logger = logging.getLogger(__name__)

RUN_ID = "ct_fuzz"
SHARD = "train_000.bin"
STEP = 3
CHECKPOINT_FILES = {"model.safetensors": b"\x00" * 4096, "optimizer.safetensors": b"\x01" * 100}
# the peer sends a heartbeat this often, and is told to: a per-session rate limit fits it
GOOD_PEER_INTERVAL_S = 0.05
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 256 << 20)]


def _status_of(store: Store, health: HealthSettings, root: Path):
    def status() -> SwarmStatus:
        return build_status(
            time.time(),
            RUN_ID,
            store.list_peers(),
            store.contribution_totals(),
            health,
            SwarmProgress(global_epoch=STEP, samples_per_s=1.0, num_peers=1, read_unix_s=time.time()),
            checkpoint.list_checkpoints(root),
            store.rejections(),
        )

    return status


def _publish(root: Path) -> None:
    staging = archive.new_staging_dir(root, STEP)
    for name, data in CHECKPOINT_FILES.items():
        (staging / name).write_bytes(data)
    meta = checkpoint.CheckpointMeta(RUN_ID, STEP, 768, 4.25, time.time(), "m", None, ())
    archive.finalize(staging, root, meta, signing_key=signing.new_key())


class LiveCoordinator:
    """gRPC and HTTP on 127.0.0.1:0 over a fresh data directory; a context manager."""

    def __init__(self, directory: Path | None = None):
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="crowdtrain-fuzz-")
        self.dir = Path(directory or self._tmp.name)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "data" / SHARD).write_bytes(bytes(range(256)) * 64)
        self.checkpoint_root = self.dir / "checkpoints"
        _publish(self.checkpoint_root)
        self.db_path = self.dir / "coordinator.sqlite3"
        self.store = Store(self.db_path)
        health = HealthSettings(heartbeat_interval_s=GOOD_PEER_INTERVAL_S, heartbeat_timeout_s=10.0)
        self.status = _status_of(self.store, health, self.checkpoint_root)
        metrics = CoordinatorMetrics(self.status)
        manifest_json = f'{{"run_id": "{RUN_ID}"}}'
        context = WebContext(
            data_dir=self.dir / "data",
            data_files=frozenset([SHARD]),
            checkpoint_root=self.checkpoint_root,
            manifest_json=manifest_json,
            store=self.store,
            status=self.status,
            metrics=metrics,
        )
        self.web = WebServer(context, "127.0.0.1", 0).start()
        self.http_port = self.web.port
        servicer = CoordinatorServicer(
            RunInfo(
                manifest_json=manifest_json,
                manifest_sha256="0" * 64,
                tokenizer_json="{}",
                num_shards=4,
                http_base_url=f"http://127.0.0.1:{self.http_port}",
                checkpoint_root=self.checkpoint_root,
            ),
            self.store,
            health,
            initial_peers=lambda: ["/ip4/127.0.0.1/tcp/1/p2p/x"],
            status=self.status,
            heartbeat_latency=metrics.heartbeat_latency.observe,
            downloads=context.downloads,
        )
        self.grpc_server, port = create_server(servicer, "127.0.0.1", 0)
        self.grpc_server.start()
        self.grpc_address = f"127.0.0.1:{port}"
        self.web.announce_grpc(self.grpc_address, tls=False)  # as the coordinator does once gRPC is up

    def hints(self) -> Hints:
        sizes = tuple(len(d) for d in CHECKPOINT_FILES.values())
        return Hints(texts=(SHARD, str(STEP), checkpoint.META_NAME, *CHECKPOINT_FILES), ints=(STEP, *sizes))

    def close(self) -> None:
        try:
            self.grpc_server.stop(0)
        finally:
            try:
                self.web.shutdown()
            finally:
                self.store.close()
                if self._tmp is not None:
                    self._tmp.cleanup()

    def __enter__(self) -> LiveCoordinator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def credentials(join: pb.JoinResponse, request_cls) -> dict:
    """Every field of a JoinResponse that `request_cls` also has by name (the session id, a token):
    what a peer copies from its join into each later request."""
    names = {f.name for f in request_cls.DESCRIPTOR.fields}
    return {f.name: getattr(join, f.name) for f in join.DESCRIPTOR.fields if f.name in names}


def _method(channel: grpc.Channel, name: str, request_cls, response_cls):
    return channel.unary_unary(
        f"/{SERVICE_NAME}/{name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )


class GoodPeer:
    """A volunteer that joins, then sends a unary heartbeat every GOOD_PEER_INTERVAL_S on its own
    channel and thread; `latencies_s` holds every answered heartbeat's round trip, `failures` the
    status codes of the others."""

    def __init__(self, address: str):
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        request = pb.JoinRequest(name="good-peer", version="0.1.0", device="cpu")
        Identities(1).sign(request, 0)
        join = _method(self._channel, "Join", pb.JoinRequest, pb.JoinResponse)(request, timeout=10)
        self._request = pb.HeartbeatRequest(
            **credentials(join, pb.HeartbeatRequest),
            name="good-peer",
            phase="training",
            samples_per_s=10.0,
            local_epoch=1,
            loss=3.0,
        )
        self._heartbeat = _method(self._channel, "Heartbeat", pb.HeartbeatRequest, pb.HeartbeatResponse)
        self._thread = threading.Thread(target=self._loop, name="good-peer", daemon=True)

    def start(self) -> GoodPeer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self._heartbeat(self._request, timeout=5)
                self.latencies_s.append(time.perf_counter() - t0)
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")
            # after a stall, the next one interval from now: a peer does not send a burst to catch up
            next_t = max(next_t + GOOD_PEER_INTERVAL_S, time.monotonic() + GOOD_PEER_INTERVAL_S / 2)
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._channel.close()


class _ErrorLog(logging.Handler):
    """Every ERROR record of any logger: an unhandled exception in a handler, most likely."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 1000:
            self.messages.append(f"{record.name}: {record.getMessage()[:300]}")


def _serve(directory: str | None, conn) -> None:
    """The coordinator's process: serve until told to stop, then answer its ERROR log lines."""
    errors = _ErrorLog()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    with LiveCoordinator(Path(directory) if directory else None) as target:
        conn.send((target.grpc_address, target.http_port, target.hints(), str(target.db_path)))
        conn.recv()
        target.store.flush()
        # the database outlives the process when `directory` is given; else the parent checks it
        # now, while the temporary directory still exists
        conn.send(errors.messages)
        conn.recv()


def _heartbeat(address: str, conn) -> None:
    """The good peer's process: heartbeat until told to stop, then answer (latencies, failures)."""
    peer = GoodPeer(address).start()
    conn.send("started")
    conn.recv()
    peer.stop()
    conn.send((peer.latencies_s, peer.failures))


class Child:
    """One spawned process running `target(*args, conn)`, talked to over a pipe."""

    def __init__(self, target, *args, timeout_s: float = 60.0):
        context = multiprocessing.get_context("spawn")  # no fork: grpc's threads do not survive it
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=target, args=(*args, child_conn), daemon=True)
        self.process.start()
        self.timeout_s = timeout_s

    def ask(self, message=None):
        if message is not None:
            self.conn.send(message)
        if not self.conn.poll(self.timeout_s):
            raise RuntimeError(f"{self.process.name} did not answer within {self.timeout_s} s")
        return self.conn.recv()

    def close(self) -> None:
        self.process.join(timeout=self.timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class CoordinatorProcess:
    """LiveCoordinator in a process of its own, so that the fuzzer's work in this process does not
    compete with it for the GIL (as in production, where the coordinator is a process). `stop()`
    returns what it logged at ERROR; `alive()` says whether it crashed."""

    def __init__(self, directory: Path | None = None):
        self._child = Child(_serve, str(directory) if directory else None)
        self.grpc_address, self.http_port, self._hints, db_path = self._child.ask()
        self.db_path = Path(db_path)

    def hints(self) -> Hints:
        return self._hints

    def alive(self) -> bool:
        return self._child.process.is_alive()

    def stop(self) -> list[str]:
        """Stop serving and flush; the database stays readable until close()."""
        return self._child.ask("stop")

    def close(self) -> None:
        if self.alive():
            self._child.conn.send("exit")
        self._child.close()


class GoodPeerProcess:
    def __init__(self, address: str):
        self._child = Child(_heartbeat, address)
        self._child.ask()

    def stop(self) -> tuple[list[float], list[str]]:
        try:
            return self._child.ask("stop")
        finally:
            self._child.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Identities:
    """Throwaway hivemind identities of this process (RSA keys in temporary directories; one is
    `peer.identity.throwaway_identity`): what a fuzzed request needs to get past the identity checks
    and reach the code behind them."""

    def __init__(self, count: int = 4):
        cache = Path(tempfile.gettempdir()) / "crowdtrain-fuzz-identities"
        self._all = [throwaway_identity()] + [PeerIdentity.fresh(cache) for _ in range(count - 1)]

    def __len__(self) -> int:
        return len(self._all)

    def sign(self, join: pb.JoinRequest, index: int) -> None:
        """Make `join` name identity `index` and sign it now (`PeerIdentity.join_fields`)."""
        for name, value in self._all[index % len(self._all)].join_fields(time.time()).items():
            setattr(join, name, value)

    def as_peer(self, request, join: pb.JoinResponse, index: int, pick: int) -> None:
        """Make a heartbeat of the session `join` (which identity `index` signed) claim that identity
        where it names a DHT peer id, and, for an even `pick`, prove it where it names a key (an odd
        one keeps the fuzzed proof: a failed one)."""
        names = {f.name for f in request.DESCRIPTOR.fields}
        me = self._all[index % len(self._all)]
        if "dht_peer_id" in names and request.dht_peer_id:
            request.dht_peer_id = me.peer_id
        if "dht_public_key" in names and request.dht_public_key and pick % 2 == 0:
            request.dht_public_key, request.dht_signature = me.prove(join.dht_challenge)
