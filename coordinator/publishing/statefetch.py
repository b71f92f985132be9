"""Download the training state from chosen peers (hivemind wiring, no decisions).

hivemind's `load_state_from_peers` picks the donor itself (the highest self-declared priority) and
stops at the first answer, so the publisher could never get a second opinion. This asks the same
`rpc_download_state` of a peer we name, through our own client of the DHT's p2p daemon, and keeps
the model's parameters only (the first tensors of hivemind's flat state, in the order of
`model.parameters()`, see `peer.swarm.make_optimizer`).

It relies on internals of hivemind 1.1.12 (no public API offers this), each marked "hivemind
1.1.12 internals" below: the state averager's DHT prefix, its donor key, its download RPC and that
RPC's stream format. Check them when upgrading hivemind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from crowdtrain.coordinator.limits import MAX_EPOCH
from crowdtrain.coordinator.publishing.agreement import FetchedState
from crowdtrain.coordinator.publishing.vetting import ExpectedTensor, check_tensor
from crowdtrain.peer.swarm.statewire import STREAM_PART_BYTES, StateAssembler, StateRefused, WireTensor

logger = logging.getLogger(__name__)


async def _daemon_maddr(_dht, node):
    """Runs inside hivemind's DHT process: where our p2p daemon listens for local clients."""
    # hivemind 1.1.12 internals: DHTNode.p2p and P2P.daemon_listen_maddr, so that P2P.replicate can
    # open a client of the DHT's own p2pd instead of starting a second daemon and identity
    return node.p2p.daemon_listen_maddr


@dataclass(frozen=True)
class StateLimits:
    """What a donor may send: the model's parameters (shapes, dtypes) and bounds on the stream."""

    expected: tuple[ExpectedTensor, ...]  # the model's parameters in order
    margin: float = 1.25  # bytes allowed beyond the parameters' own (headers, a different layout)

    @property
    def parameter_bytes(self) -> int:
        return sum(t.nbytes for t in self.expected)

    @property
    def max_bytes(self) -> int:
        """Serialized bytes a donor may send before we hang up: the parameters' bytes times
        `margin`, plus 4 KiB per tensor of protobuf headers."""
        return int(self.parameter_bytes * self.margin) + 4096 * len(self.expected)

    @property
    def max_messages(self) -> int:
        """Stream messages a donor may send: each tensor in hivemind's 64 KiB parts, twice over."""
        parts = sum(-(-max(t.nbytes, 1) // STREAM_PART_BYTES) for t in self.expected)
        return 2 * parts + 16


class StateFetcher:
    """Lists the swarm's state donors and downloads the state of the ones we choose.

    Owns a private event loop (on a thread of its own) so that it can be used from any thread.
    """

    def __init__(self, dht, run_id: str, limits: StateLimits, timeout_s: float):
        self.dht, self.run_id, self.limits, self.timeout_s = dht, run_id, limits, timeout_s
        self.num_parameters = len(limits.expected)
        # hivemind 1.1.12 internals: Optimizer._make_state_averager names its averager this way;
        # the RPC namespace below derives from it
        self.prefix = f"{run_id}_state_averager"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="state-fetch", daemon=True)
        self._thread.start()
        self._p2p = None

    def shutdown(self) -> None:
        if self._thread is None:
            return
        if self._p2p is not None:
            self._run(self._p2p.shutdown(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        if not self._loop.is_running():  # the replica's reader tasks: no "Task was destroyed" at exit
            from crowdtrain.peer.swarm.wiring import finish_event_loop

            finish_event_loop(self._loop)

    def _run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    def progress_claims(self) -> list[tuple[str, int, bool]]:
        """(peer id, epoch, client_mode) of every record in the swarm's signed progress key.

        These records are RSA-signed per writer (hivemind's `RSASignatureValidator`, registered by
        the publisher's `ProgressTracker` on this DHT), unlike `<prefix>.all_averagers`, an unsigned
        dictionary anyone can overwrite. The peer id inside is the writer's claim: `voters` decides
        what it is worth."""
        from hivemind.p2p import PeerID

        # hivemind 1.1.12 internals: ProgressTracker.training_progress_key is `<prefix>_progress`
        # (prefix=run_id), one subkey per writer holding LocalTrainingProgress as a dict
        found = self.dht.get(f"{self.run_id}_progress", latest=True, return_future=True)
        entry = found.result(timeout=self.timeout_s)
        if entry is None or not isinstance(entry.value, dict):
            return []
        claims = []
        for item in entry.value.values():
            record = getattr(item, "value", None)
            if not isinstance(record, dict):
                continue  # a peer that left writes None
            try:
                peer, epoch = PeerID(record["peer_id"]).to_base58(), record["epoch"]
                client_mode = bool(record.get("client_mode", False))
            except (KeyError, TypeError, ValueError) as e:
                logger.info("skipping a malformed progress record: %r", e)
                continue
            if isinstance(epoch, int) and 0 <= epoch < MAX_EPOCH:
                claims.append((peer, epoch, client_mode))
        return claims

    def fetch_all(self, peers: list[str]) -> tuple[list[FetchedState], dict[str, str]]:
        """The states `peers` serve, downloaded at once (as close in time as can be), and why each
        other peer gave none: it left, timed out, sent garbage or too much (`StateRefused`)."""

        async def one(peer: str) -> FetchedState | str:
            try:
                return await asyncio.wait_for(self._fetch(peer), self.timeout_s)
            except Exception as e:  # a donor that left, refused, timed out or sent garbage
                logger.warning("could not download the state of peer %s: %s: %s", peer, type(e).__name__, e)
                return f"{type(e).__name__}: {e}"

        async def gather():
            return await asyncio.gather(*(one(peer) for peer in peers))

        results = self._run(gather(), self.timeout_s + 10)
        states = [r for r in results if isinstance(r, FetchedState)]
        failed = {peer: r for peer, r in zip(peers, results, strict=True) if isinstance(r, str)}
        return states, failed

    async def _fetch(self, peer: str) -> FetchedState:
        from hivemind.optim.state_averager import TrainingStateAverager
        from hivemind.p2p import P2P, PeerID
        from hivemind.proto import averaging_pb2

        if self._p2p is None:
            maddr = self.dht.run_coroutine(_daemon_maddr)
            self._p2p = await P2P.replicate(maddr)
        # hivemind 1.1.12 internals: the averager's RPC (get_stub, namespace=prefix)
        stub = TrainingStateAverager.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        reader = StreamReader(self.limits)
        try:
            async for message in stream:
                if reader.add(message):
                    break  # optimizer statistics follow: not needed to publish the model
        finally:
            if hasattr(stream, "aclose"):
                await stream.aclose()  # tell the donor to stop sending
        return FetchedState(peer=peer, epoch=reader.finish(), tensors=reader.tensors)


class StreamReader:
    """Reassembles the parameters from `rpc_download_state` messages, within `limits`: each tensor's
    parts must declare the run's codec and the parameter's dtype and shape before they are decoded
    (`peer.statewire.StateAssembler`, so its decoded bytes are the parameter's own), each tensor is
    checked (finite: `vetting.check_tensor`) as soon as it is complete, and the stream is refused
    (`StateRefused`) once it exceeds `max_bytes` or `max_messages`, so a donor can never make us
    hold more than about the model's size."""

    def __init__(self, limits: StateLimits):
        self.limits = limits
        self.metadata = None
        self.assembler = StateAssembler(
            [WireTensor(t.shape, t.dtype.removeprefix("torch."), t.element_size) for t in limits.expected]
        )
        self.received_bytes = self.messages = 0

    @property
    def tensors(self) -> list:
        return self.assembler.tensors

    def add(self, message) -> bool:
        """Take one message; True once every parameter is in (stop reading)."""
        # hivemind 1.1.12 internals: the stream of rpc_download_state: MSGPack metadata with "epoch"
        # in the first message, a tensor's first part carries its codec, dtype and shape,
        # parameters come before optimizer statistics (TrainingStateAverager.get_current_state)
        from hivemind.utils.serializer import MSGPackSerializer

        self.messages += 1
        self.received_bytes += message.ByteSize()
        if self.received_bytes > self.limits.max_bytes or self.messages > self.limits.max_messages:
            raise StateRefused(
                f"sent more than the model's parameters allow ({self.received_bytes} bytes in "
                f"{self.messages} messages; limits {self.limits.max_bytes} bytes, "
                f"{self.limits.max_messages} messages for {self.limits.parameter_bytes} parameter bytes)"
            )
        if message.metadata and self.metadata is None:
            self.metadata = MSGPackSerializer.loads(message.metadata)
        checked = len(self.tensors)
        done = self.assembler.add(message.tensor_part)  # the parameters are in: optimizer statistics follow
        self._check(checked)
        return done

    def _check(self, start: int) -> None:
        """Refuse the tensors completed since `start` unless each is finite (and fits: belt and braces)."""
        for index in range(start, len(self.tensors)):
            problem = check_tensor(self.tensors[index], self.limits.expected[index])
            if problem:
                raise StateRefused(problem)

    def finish(self) -> int:
        """The state's epoch once the stream ended; StateRefused if it is not a whole state."""
        checked = len(self.tensors)
        self.assembler.finish()
        self._check(checked)
        if not isinstance(self.metadata, dict) or not isinstance(self.metadata.get("epoch"), int):
            raise StateRefused("sent no state (no epoch in its metadata; it may not share state right now)")
        if len(self.tensors) < len(self.limits.expected):
            raise StateRefused(f"sent {len(self.tensors)} tensors, the model has {len(self.limits.expected)}")
        return self.metadata["epoch"]
