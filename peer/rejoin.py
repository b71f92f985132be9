"""Finding the coordinator's DHT node again after it restarted.

hivemind drops a peer from the routing table once it stops answering; after the coordinator
restarts (same identity and address, empty memory) neither side would otherwise look for the
other, and the swarm would split from the coordinator's publisher and monitor. When heartbeats
reach the coordinator again, the peer pings its bootstrap node(s) from a background thread
(never the heartbeat thread: a ping can take seconds), retrying while none answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from functools import partial

from crowdtrain.peer.events import emit

logger = logging.getLogger(__name__)


def rejoin_bootstrap_peers(
    dht,
    initial_peers: Sequence[str],
    *,
    attempts: int = 4,
    retry_s: float = 5.0,
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
) -> int:
    """Ping the bootstrap node(s) until at least one answers (`attempts` tries, `retry_s` apart);
    returns how many answered the last try and logs the `swarm_rejoined` event."""
    if dht is None or not initial_peers:
        return 0
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    stop = stop or threading.Event()
    peer_ids = list({PeerID.from_base58(Multiaddr(m)["p2p"]) for m in initial_peers})
    answered = 0
    for attempt in range(1, attempts + 1):
        try:
            future = dht.run_coroutine(partial(_ping_all, peer_ids), return_future=True)
            answered = future.result(timeout=timeout_s)
        except Exception as e:  # the DHT is shutting down, or the ping timed out
            logger.info("pinging the bootstrap peers failed (%r), try %d/%d", e, attempt, attempts)
            answered = 0
        if answered or attempt == attempts or stop.wait(retry_s):
            break
    emit(
        logger,
        "swarm_rejoined",
        "re-joined the swarm through %d of %d bootstrap peer(s)",
        answered,
        len(peer_ids),
        reached=answered,
        bootstrap_peers=len(peer_ids),
    )
    return answered


def rejoin_in_background(dht, initial_peers: Sequence[str]) -> threading.Thread:
    """`rejoin_bootstrap_peers` on a daemon thread (a failure is logged, never raised)."""

    def run() -> None:
        try:
            rejoin_bootstrap_peers(dht, initial_peers)
        except Exception as e:
            logger.warning("could not re-join the coordinator's DHT node: %r", e)

    thread = threading.Thread(target=run, name="dht-rejoin", daemon=True)
    thread.start()
    return thread


async def _ping_all(peer_ids, _dht, node) -> int:
    """Runs inside hivemind's DHT process (so it must be a picklable module-level function).
    hivemind 1.1.12: `DHTNode.protocol.call_ping` is how a node (re)adds a peer to its routing table;
    DHT has no public "ping" or "add peer" call."""
    results = await asyncio.gather(*(node.protocol.call_ping(p) for p in peer_ids), return_exceptions=True)
    return sum(1 for r in results if r is not None and not isinstance(r, BaseException))
