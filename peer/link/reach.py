"""Reachable, or told why: after its DHT starts, a full peer asks the coordinator to dial it.

A peer behind NAT that accepts no connections but announces itself as a full peer stalls the
averaging rounds of others, which wait for it. So a peer not started with `--client-mode` sends
its announced multiaddrs to the coordinator (`CheckReachability`, see coordinator/api/reachability.py),
and when nobody can connect to it, it restarts its DHT node in client mode (it then connects out
and averages through full peers), and prints the coordinator's advice: what would make it a full
peer (a public IP, forwarding port N, `--announce-host`).

    dht, reachable = ensure_reachable(dht, client, session, restart_in_client_mode)

A coordinator that cannot be asked (down, or too old for the RPC) changes nothing: the peer stays
a full peer. The answer is a stranger's word too: it can only make this peer more careful (client
mode), never expose it, and its advice is printed as text, cut to a bounded length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from crowdtrain.peer.events import emit
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable

logger = logging.getLogger(__name__)

MAX_ADVICE_CHARS = 600


def _printable(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


def ensure_reachable(
    dht,
    client: CoordinatorClient,
    session_id: str,
    session_token: str,
    restart_in_client_mode: Callable[[], object],
) -> tuple[object, bool]:
    """(the DHT to use, whether others can reach this peer)."""
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    try:
        answer = client.check_reachability(session_id, session_token, maddrs)
    except (CoordinatorUnavailable, CoordinatorRejected) as e:
        logger.info("could not ask the coordinator whether other peers can reach this one (%s)", e)
        return dht, True
    seen = _printable(answer.seen_host, 64)
    if answer.reachable:
        emit(
            logger,
            "reachability",
            "other peers can reach this peer (dialed %s)",
            _printable(answer.dialed, 200),
            reachable=True,
            seen_host=seen,
            advice="",
        )
        return dht, True
    advice = _printable(answer.advice, MAX_ADVICE_CHARS)
    emit(
        logger,
        "reachability",
        "other peers cannot reach this peer: switching to client mode. %s",
        advice,
        reachable=False,
        seen_host=seen,
        advice=advice,
        level=logging.WARNING,
    )
    dht.shutdown()
    return restart_in_client_mode(), False
