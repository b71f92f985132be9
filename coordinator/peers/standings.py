"""Am I contributing? A peer's accepted samples, its share of the run, its leaderboard rank, and
the page a volunteer bookmarks to see them.

The ledger (`Store.contribution_totals`: samples per DHT identity, written by the swarm monitor
as `credit` settles each epoch the swarm passed) is summed in SQLite; a heartbeat must not wait
for that, so the ranking is rebuilt at most every `refresh_s` and every heartbeat reads the cached
one.

    standings = Standings(store.contribution_totals, clock=time.time)
    standings.of("QmPeer...")   # Standing(accepted_samples=1200, share=0.31, rank=1, ranked_peers=3)

One peer's page: what a volunteer bookmarks to see "am I contributing?" (`/peer/<id>`).

A peer is found by its public id (the short one every view shows, new for every session) or by
its hivemind peer id (the same across restarts: a peer keeps its key in crowdtrain's config
directory, or in `--identity FILE`; so that is the bookmark that lasts). Pure: built from the status snapshot's peer views and the ledger, once per
view refresh, in the status pool, as `{key: JSON bytes}`; a request only looks a key up.

    index = peer_index(status_json["peers"], store.contribution_totals())
    index["3fa9c01b22de"]   # b'{"peer": {...}, "sessions": [...], "standing": {...}}'
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Standing:
    accepted_samples: int = 0
    share: float = 0.0  # of every identity's accepted samples
    rank: int = 0  # 1 = most samples; 0 = none accepted yet
    ranked_peers: int = 0


def rank_totals(totals: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Pure: ({peer: (samples, rank)}, sum, how many ranked). Equal totals share a rank."""
    ordered = sorted((s, p) for p, s in totals.items() if s > 0)
    ordered.reverse()
    ranks: dict[str, tuple[int, int]] = {}
    previous, rank = None, 0
    for i, (samples, peer) in enumerate(ordered, start=1):
        if samples != previous:
            rank, previous = i, samples
        ranks[peer] = (samples, rank)
    return ranks, sum(s for s, _ in ordered), len(ordered)


class Standings:
    def __init__(
        self, totals: Callable[[], dict[str, int]], clock: Callable[[], float], refresh_s: float = 10.0
    ):
        self._totals = totals
        self._clock = clock
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._built_unix_s = -float("inf")
        self._ranks: dict[str, tuple[int, int]] = {}
        self._sum = self._count = 0

    def of(self, dht_peer_id: str) -> Standing:
        now = self._clock()
        with self._lock:
            if now - self._built_unix_s >= self.refresh_s:
                self._ranks, self._sum, self._count = rank_totals(self._totals())
                self._built_unix_s = now
            samples, rank = self._ranks.get(dht_peer_id, (0, 0))
            total, count = self._sum, self._count
        return Standing(samples, samples / total if total else 0.0, rank, count)


# a public peer id (12 hex digits) or a base58 hivemind peer id: nothing else is ever looked up
PEER_KEY = re.compile(r"[0-9a-f]{12}|[1-9A-HJ-NP-Za-km-z]{20,64}", flags=re.ASCII)
MAX_SESSIONS = 20  # sessions listed on one identity's page, newest first


def _standing(view: dict, ranks: dict, total: int, ranked: int) -> dict:
    credited = view.get("dht_verified") or view.get("source") == "dht"
    samples, rank = ranks.get(view.get("dht_peer_id"), (0, 0)) if credited else (0, 0)
    return {
        "accepted_samples": samples,
        "share": samples / total if total else 0.0,
        "rank": rank,
        "ranked_peers": ranked,
        "credited": bool(credited),
    }


def peer_index(peers: list[dict], contribution_totals: dict[str, int]) -> dict[str, bytes]:
    ranks, total, ranked = rank_totals(contribution_totals)
    by_identity: dict[str, list[dict]] = defaultdict(list)
    for view in peers:
        if view.get("dht_peer_id") and (view.get("dht_verified") or view.get("source") == "dht"):
            by_identity[view["dht_peer_id"]].append(view)  # only proven identities group sessions
    index: dict[str, bytes] = {}
    for view in peers:
        page = {"peer": view, "sessions": [view], "standing": _standing(view, ranks, total, ranked)}
        index[view["peer_id"]] = json.dumps(page).encode()
    for identity, views in by_identity.items():
        views.sort(key=lambda v: -v["last_seen_unix_s"])
        latest = views[0]
        page = {
            "peer": latest,
            "sessions": views[:MAX_SESSIONS],
            "standing": _standing(latest, ranks, total, ranked),
        }
        index[identity] = json.dumps(page).encode()
    return index
