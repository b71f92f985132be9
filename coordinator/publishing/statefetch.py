"""Download the training state from chosen peers (hivemind wiring, no decisions).

hivemind's `load_state_from_peers` picks the donor itself (the highest self-declared priority) and
stops at the first answer, so the publisher could never get a second opinion. This asks the same
`rpc_download_state` of a peer we name, through our own client of the DHT's p2p daemon, and keeps
the model's parameters only (the first tensors of hivemind's flat state, in the order of
`model.parameters()`, see `peer.swarm.wiring.make_optimizer`). The stream is read, bounded and
checked by the one reader joiners use too (peer/swarm/statewire.py, `publisher_limits`): a state
that comes out of `fetch_all` fits the model (count, shape, dtype, finite), and a donor whose
state was refused is told apart from one that left (`FetchFailed.refused`).

It relies on internals of hivemind 1.1.12 (no public API offers this), each marked "hivemind
1.1.12 internals" below: the state averager's DHT prefix, its donor key, its download RPC and that
RPC's stream format. Check them when upgrading hivemind.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from crowdtrain.coordinator.limits import MAX_EPOCH
from crowdtrain.coordinator.publishing.agreement import FetchedState, FetchFailed
from crowdtrain.peer.run.tensors import ExpectedTensor
from crowdtrain.peer.swarm.statewire import (
    PUBLISHER_BYTE_SLACK,
    StateLimits,
    StateRefused,
    StateStreamReader,
    read_state,
)

logger = logging.getLogger(__name__)


async def _daemon_maddr(_dht, node):
    """Runs inside hivemind's DHT process: where our p2p daemon listens for local clients."""
    # hivemind 1.1.12 internals: DHTNode.p2p and P2P.daemon_listen_maddr, so that P2P.replicate can
    # open a client of the DHT's own p2pd instead of starting a second daemon and identity
    return node.p2p.daemon_listen_maddr


def publisher_limits(
    parameters: tuple[ExpectedTensor, ...], byte_slack: float = PUBLISHER_BYTE_SLACK
) -> StateLimits:
    """What a donor may send the publisher: the model's parameters (the first tensors of its state;
    the optimizer statistics after them are not read), within `byte_slack` x their bytes."""
    return StateLimits(tuple(parameters), byte_slack=byte_slack, read_all=False)


def fetched_state(peer: str, metadata, tensors: list) -> FetchedState:
    """The state a stream read by `StateStreamReader` gave (its tensors already checked), with its
    epoch; StateRefused if it carries none (it may not share state right now)."""
    # hivemind 1.1.12 internals: the metadata of rpc_download_state is a dict with "epoch"
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
        raise StateRefused("sent no state (no epoch in its metadata; it may not share state right now)")
    return FetchedState(peer=peer, epoch=metadata["epoch"], tensors=tensors)


class StateFetcher:
    """Lists the swarm's state donors and downloads the state of the ones we choose.

    Owns a private event loop (on a thread of its own) so that it can be used from any thread.
    """

    def __init__(self, dht, run_id: str, limits: StateLimits, timeout_s: float):
        self.dht = dht
        self.run_id = run_id
        self.limits = limits
        self.timeout_s = timeout_s
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

    def fetch_all(self, peers: list[str]) -> tuple[list[FetchedState], dict[str, FetchFailed]]:
        """The states `peers` serve, downloaded at once (as close in time as can be), and why each
        other peer gave none: refused (`StateRefused`: it sent a state we do not load), or it left,
        timed out or failed to answer."""

        async def one(peer: str) -> FetchedState | FetchFailed:
            try:
                return await asyncio.wait_for(self._fetch(peer), self.timeout_s)
            except StateRefused as e:
                logger.warning("refused the state of peer %s: %s", peer, e)
                return FetchFailed(str(e), refused=True)
            except Exception as e:  # a donor that left, timed out or failed to answer
                logger.warning("could not download the state of peer %s: %s: %s", peer, type(e).__name__, e)
                return FetchFailed(f"{type(e).__name__}: {e}")

        async def gather():
            return await asyncio.gather(*(one(peer) for peer in peers))

        results = self._run(gather(), self.timeout_s + 10)
        states = [r for r in results if isinstance(r, FetchedState)]
        failed = {peer: r for peer, r in zip(peers, results, strict=True) if isinstance(r, FetchFailed)}
        return states, failed

    async def _fetch(self, peer: str) -> FetchedState:
        """The model's parameters as `peer` serves them, read and checked by statewire's reader."""
        stream = await self._open_stream(peer)
        metadata, tensors = await read_state(stream, StateStreamReader(self.limits))
        return fetched_state(peer, metadata, tensors)

    async def _open_stream(self, peer: str):
        """`peer`'s `rpc_download_state` stream, through our client of the DHT's p2p daemon."""
        from hivemind.optim.state_averager import TrainingStateAverager
        from hivemind.p2p import P2P, PeerID
        from hivemind.proto import averaging_pb2

        if self._p2p is None:
            maddr = self.dht.run_coroutine(_daemon_maddr)
            self._p2p = await P2P.replicate(maddr)
        # hivemind 1.1.12 internals: the averager's RPC (get_stub, namespace=prefix); its stream:
        # metadata with "epoch" first, then the parameters before the optimizer statistics
        # (TrainingStateAverager.get_current_state)
        stub = TrainingStateAverager.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        return await stub.rpc_download_state(averaging_pb2.DownloadRequest())
