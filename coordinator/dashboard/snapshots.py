"""Status views built at most once per second, off the event loops, and shared by every reader.

The swarm's status (every peer's state, the leaderboard, the history) costs tens of milliseconds to
build with thousands of peers. Built per request, on the loop that serves heartbeats, a few
anonymous readers of /api/v1/peers starved the peers (heartbeat p50 above 1 s). Here:

- `Memo` keeps one value and rebuilds it at most once per `max_age_s`, whoever asks;
- `ViewCache` keeps each view's encoded body the same way and builds it in a small thread pool, so
  a thousand readers cost one build per second and never run on an event loop.

A symptom that means "raise max_age_s": the status-views thread busy most of the time
(`py-spy top` shows build_status) while a dashboard or scrapers read the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Memo(Generic[T]):
    """`get()` returns `build()`'s value, rebuilt when older than `max_age_s`; thread-safe, and
    concurrent callers of a stale value wait for one rebuild instead of each doing their own."""

    def __init__(self, build: Callable[[], T], max_age_s: float = 1.0, clock=time.monotonic):
        self._build = build
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._built_at = -float("inf")

    def get(self) -> T:
        with self._lock:
            if self._clock() - self._built_at >= self.max_age_s:
                self._value = self._build()
                self._built_at = self._clock()
            return self._value


class ViewCache:
    """Encoded views (`name -> build() -> bytes`), each rebuilt at most once per `max_age_s`, in a
    pool of `workers` threads. `future(name)` is shared by every reader that asks while a build is
    under way, so readers never queue more than one build per view."""

    def __init__(
        self,
        builders: Mapping[str, Callable[[], bytes]],
        max_age_s: float = 1.0,
        workers: int = 1,
        clock=time.monotonic,
    ):
        self._builders = dict(builders)
        self.max_age_s = max_age_s
        self._clock = clock
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="status-views")
        self._lock = threading.Lock()
        self._done: dict[str, tuple[float, Future]] = {}
        self._pending: dict[str, Future] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def future(self, name: str) -> Future:
        """The view's bytes (a concurrent Future); KeyError for an unknown view."""
        build = self._builders[name]
        with self._lock:
            done = self._done.get(name)
            if done is not None and self._clock() - done[0] < self.max_age_s:
                return done[1]
            pending = self._pending.get(name)
            if pending is None:
                pending = self._pending[name] = self._pool.submit(self._build, name, build)
            return pending

    def _build(self, name: str, build: Callable[[], bytes]) -> bytes:
        try:
            value = build()
        except BaseException:
            with self._lock:
                self._pending.pop(name, None)  # a failure is not cached: the next reader retries
            logger.exception("building the %s view failed", name)
            raise
        with self._lock:
            finished: Future = Future()
            finished.set_result(value)
            self._done[name] = (self._clock(), finished)
            self._pending.pop(name, None)
        return value

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
