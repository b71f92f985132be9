"""Am I contributing? A peer's accepted samples, its share of the run and its leaderboard rank.

The ledger (`Store.contribution_totals`: samples per DHT identity, written by the swarm monitor
as `credit` settles each epoch the swarm passed) is summed in SQLite; a heartbeat must not wait
for that, so the ranking is rebuilt at most every `refresh_s` and every heartbeat reads the cached
one.

    standings = Standings(store.contribution_totals, clock=time.time)
    standings.of("QmPeer...")   # Standing(accepted_samples=1200, share=0.31, rank=1, ranked_peers=3)
"""

from __future__ import annotations

import threading
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
        self._totals, self._clock, self.refresh_s = totals, clock, refresh_s
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
