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

from crowdtrain.coordinator.agreement import FetchedState

logger = logging.getLogger(__name__)


async def _daemon_maddr(_dht, node):
    """Runs inside hivemind's DHT process: where our p2p daemon listens for local clients."""
    # hivemind 1.1.12 internals: DHTNode.p2p and P2P.daemon_listen_maddr, so that P2P.replicate can
    # open a client of the DHT's own p2pd instead of starting a second daemon and identity
    return node.p2p.daemon_listen_maddr


class StateFetcher:
    """Lists the swarm's state donors and downloads the state of the ones we choose.

    Owns a private event loop (on a thread of its own) so that it can be used from any thread.
    """

    def __init__(self, dht, run_id: str, num_parameters: int, timeout_s: float):
        self.dht, self.num_parameters, self.timeout_s = dht, num_parameters, timeout_s
        # hivemind 1.1.12 internals: Optimizer._make_state_averager names its averager this way;
        # the donor key and the RPC namespace below both derive from it
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
            from crowdtrain.peer.swarm import finish_event_loop

            finish_event_loop(self._loop)

    def _run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    def donors(self) -> list[str]:
        """Peers that declared they serve state, highest declared priority (their epoch) first."""
        from hivemind.utils import ValueWithExpiration

        # hivemind 1.1.12 internals: DecentralizedAverager._declare_for_download_periodically stores
        # {peer id bytes: priority} under `<prefix>.all_averagers`, read as load_state_from_peers does
        found = self.dht.get(f"{self.prefix}.all_averagers", latest=True, return_future=True)
        entry = found.result(timeout=self.timeout_s)
        if entry is None or not isinstance(entry.value, dict):
            return []
        priorities = {}
        for subkey, info in entry.value.items():
            if isinstance(info, ValueWithExpiration) and isinstance(info.value, (int, float)):
                priorities[subkey] = float(info.value)
        from hivemind.p2p import PeerID

        return [PeerID(k).to_base58() for k in sorted(priorities, key=priorities.get, reverse=True)]

    def fetch_all(self, peers: list[str]) -> list[FetchedState]:
        """The states `peers` serve, downloaded at once (as close in time as can be); a donor that
        fails is logged and left out."""

        async def one(peer: str) -> FetchedState | None:
            try:
                return await asyncio.wait_for(self._fetch(peer), self.timeout_s)
            except Exception as e:  # a donor that left, refused, timed out or sent garbage
                logger.warning("could not download the state of peer %s: %s: %s", peer, type(e).__name__, e)
                return None

        async def gather():
            return await asyncio.gather(*(one(peer) for peer in peers))

        return [s for s in self._run(gather(), self.timeout_s + 10) if s is not None]

    async def _fetch(self, peer: str) -> FetchedState | None:
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.optim.state_averager import TrainingStateAverager
        from hivemind.p2p import P2P, PeerID
        from hivemind.proto import averaging_pb2
        from hivemind.utils.serializer import MSGPackSerializer
        from hivemind.utils.streaming import combine_from_streaming

        if self._p2p is None:
            maddr = self.dht.run_coroutine(_daemon_maddr)
            self._p2p = await P2P.replicate(maddr)
        # hivemind 1.1.12 internals: the averager's RPC (get_stub, namespace=prefix) and its stream:
        # MSGPack metadata with "epoch" in the first message, a tensor's first part carries its
        # dtype, parameters come before optimizer statistics (TrainingStateAverager.get_current_state)
        stub = TrainingStateAverager.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, tensors, parts = None, [], []
        try:
            async for message in stream:
                if message.metadata:
                    metadata = MSGPackSerializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                    if len(tensors) >= self.num_parameters:
                        break  # optimizer statistics follow: not needed to publish the model
                parts.append(message.tensor_part)
        finally:
            if hasattr(stream, "aclose"):
                await stream.aclose()  # tell the donor to stop sending
        if parts and len(tensors) < self.num_parameters:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
            logger.info("peer %s did not send its state (it may not share state right now)", peer)
            return None
        if len(tensors) < self.num_parameters:
            raise ValueError(f"sent {len(tensors)} tensors, the model has {self.num_parameters} parameters")
        return FetchedState(peer=peer, epoch=metadata["epoch"], tensors=tensors[: self.num_parameters])
