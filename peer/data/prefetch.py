"""Read ahead of training: an iterator's next items are made on a background thread.

A peer's batches come from `peer/data/reader.py`'s `ShardReader`, which at the end of each pass over
a shard downloads and tokenizes the next one: without read-ahead the training loop (and with it the
swarm's epoch) waits for that. `Prefetcher` runs the iterator `depth` items ahead of its consumer; an
exception the iterator raises reaches the consumer at the item where it happened, and a consumer that
stops early stops the thread (`shutdown()`, or leaving the `with` block).

Start it only after the last `fork()` of the process (hivemind forks its averagers when the
optimizer is created): a thread that holds a lock at fork time leaves that lock held forever in the
child.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[U]):
    """`iter(source)` mapped through `transform`, `depth` items ahead, on one daemon thread."""

    def __init__(
        self,
        source: Iterator[T],
        transform: Callable[[T], U] | None = None,
        *,
        depth: int = 4,
        name: str = "prefetch",
    ):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._source, self._transform = source, transform
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
        self._done = False
        self.waits = 0  # items the consumer had to wait for (the read-ahead was empty)

    def start(self) -> Prefetcher[U]:
        self._thread.start()
        return self

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop reading ahead; idempotent. Items not yet consumed are dropped."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> Prefetcher[U]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __iter__(self) -> Prefetcher[U]:
        return self

    def __next__(self) -> U:
        if self._done:
            raise StopIteration
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            self.waits += 1
            item = self._get_blocking()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def _get_blocking(self):
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    if self._stop.is_set():
                        return _END
                    raise RuntimeError("the read-ahead thread died without a word") from None

    def _fill(self) -> None:
        try:
            for item in self._source:
                if self._transform is not None:
                    item = self._transform(item)
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised where the item would have been
            self._put(_Raised(e))

    def _put(self, item) -> bool:
        """Queue `item` unless stopped first; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False
