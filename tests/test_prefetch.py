"""peer/data/prefetch.py: batches are made ahead on a thread; order, errors and stopping are kept."""

import threading
import time

import pytest
from crowdtrain.peer.data.prefetch import Prefetcher
from crowdtrain.peer.data.reader import Place, ShardReader
from crowdtrain.peer.data.shards import DataError


def test_items_arrive_in_order_and_transformed():
    with Prefetcher(iter(range(100)), lambda x: x * 2, depth=3) as ahead:
        assert list(ahead) == [2 * i for i in range(100)]
        with pytest.raises(StopIteration):
            next(ahead)


def test_reads_ahead_while_the_consumer_works():
    """A slow shard load (every 5th item) is hidden behind the consumer's own work."""

    def slow_every_fifth():
        for i in range(20):
            if i % 5 == 0:
                time.sleep(0.2)
            yield i

    with Prefetcher(slow_every_fifth(), depth=8) as ahead:
        time.sleep(1.5)  # the consumer's first "training step": the thread fills the read-ahead
        got = []
        for item in ahead:
            got.append(item)
            time.sleep(0.3)  # longer than any load
    assert got == list(range(20))
    assert ahead.waits <= 1  # only the very end can find the read-ahead empty


def test_an_error_reaches_the_consumer_where_it_happened():
    def broken():
        yield 1
        yield 2
        raise DataError("data shard 3 is unavailable")

    ahead = Prefetcher(broken(), depth=4).start()
    assert next(ahead) == 1
    assert next(ahead) == 2
    with pytest.raises(DataError, match="shard 3"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.shutdown()


def test_shutdown_stops_an_endless_source_and_is_idempotent():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    ahead = Prefetcher(endless(), depth=2).start()
    assert next(ahead) == 0
    ahead.shutdown()
    ahead.shutdown()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    settled = len(produced)
    time.sleep(0.3)
    assert len(produced) == settled <= 4  # bounded by depth, and nothing after shutdown


def test_a_peers_batches_through_the_prefetcher_are_unchanged():
    shards = {i: [[i, j] for j in range(10)] for i in range(3)}
    direct = iter(ShardReader(shards.get, 3, Place(1, 0, 0), 4, "r", seed=7))
    expected = [next(direct) for _ in range(12)]
    with Prefetcher(iter(ShardReader(shards.get, 3, Place(1, 0, 0), 4, "r", seed=7)), depth=5) as ahead:
        assert [next(ahead) for _ in range(12)] == expected


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        Prefetcher(iter(()), depth=0)
