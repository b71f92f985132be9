"""A peer's walk through the run's data, batch by batch, knowing where it is.

The coordinator leases each peer a shard and a place in it (`coordinator/peers/shardbook.py`); a pass
over a shard reads its sequences in an order fixed by the run, the shard and the pass number, so a
place is (shard, passes finished, sequences read in this pass) and means the same to every peer.
Each batch comes tagged with the place *after* it; the trainer reports the place of the last batch
it trained on (not of what the read-ahead prepared), so no sequence is skipped when a peer stops,
pauses or crashes, and a restarted peer continues from its last place (`PlaceFile`).

    reader = ShardReader(load, num_shards=8, start=Place(3, 0, 120, 0), batch_size=8, run_id=run, seed=0,
                         next_place=hints.next_place)
    for blocks, place in reader: ...   # 8 sequences, then Place(3, 0, 128, 950)

When a pass over its shard ends the reader moves on to the place the coordinator reserved for it
(`next_place`), or, without a word from the coordinator, to the following shard.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from crowdtrain.peer.data.shards import DataError

logger = logging.getLogger(__name__)

MAX_PLACE_FILE_BYTES = 4096


@dataclass(frozen=True)
class Place:
    shard: int
    passes: int  # passes over the shard finished
    position: int  # sequences read in the current pass
    sequences: int = 0  # sequences in the shard (0: not read yet)


def pass_order(num_blocks: int, run_id: str, shard: int, passes: int, seed: int = 0) -> list[int]:
    """The order of one pass over a shard: the same on every peer for the same run, shard and pass."""
    order = list(range(num_blocks))
    random.Random(zlib.crc32(f"{run_id}:{shard}:{passes}:{seed}".encode())).shuffle(order)
    return order


class ShardReader:
    """Endless `(blocks, place)` batches: `load(shard)` gives a shard's token blocks, or None when
    it cannot be fetched now (then the shard in hand is read again, in its next pass)."""

    def __init__(
        self,
        load: Callable[[int], list[list[int]] | None],
        num_shards: int,
        start: Place,
        batch_size: int,
        run_id: str,
        seed: int = 0,
        next_place: Callable[[int], Place | None] = lambda shard: None,
    ):
        self.load = load
        self.num_shards = num_shards
        self.start = start
        self.batch_size = batch_size
        self.run_id = run_id
        self.seed = seed
        self.next_place = next_place

    def __iter__(self) -> Iterator[tuple[list[list[int]], Place]]:
        place, blocks, held = self.start, None, self.start
        while True:
            loaded = self.load(place.shard)
            if loaded is not None and len(loaded) >= self.batch_size:
                blocks, held = loaded, place
            elif blocks is None:
                size = "unavailable" if loaded is None else f"only {len(loaded)} sequences"
                raise DataError(
                    f"data shard {place.shard} is {size}; need at least one batch of {self.batch_size}"
                )
            else:  # keep the shard in hand: read it again (its next pass) rather than stop training
                logger.warning(
                    "data: shard %d is unavailable now; reading shard %d again", place.shard, held.shard
                )
                place = held = Place(held.shard, held.passes + 1, 0, len(blocks))
            yield from self._one_pass(blocks, place)
            place = self._after(place.shard)

    def _one_pass(self, blocks: list[list[int]], place: Place) -> Iterator[tuple[list[list[int]], Place]]:
        n = len(blocks)
        order = pass_order(n, self.run_id, place.shard, place.passes, self.seed)
        if place.position:
            logger.info(
                "data: shard %d continues at sequence %d of %d (pass %d)",
                place.shard,
                place.position,
                n,
                place.passes,
            )
        for i in range(place.position, n - self.batch_size + 1, self.batch_size):
            end = i + self.batch_size
            finished = end + self.batch_size > n  # no full batch left in this pass
            after = (
                Place(place.shard, place.passes + 1, 0, n)
                if finished
                else Place(place.shard, place.passes, end, n)
            )
            yield [blocks[j] for j in order[i:end]], after

    def _after(self, shard: int) -> Place:
        hint = self.next_place(shard)
        if hint is not None and 0 <= hint.shard < self.num_shards:
            return hint
        return Place((shard + 1) % self.num_shards, 0, 0)


class PlaceFile:
    """Where this peer stopped reading a run's data, kept in its cache across restarts: one small
    JSON file per coordinator and peer name. Read back with every field checked (it is a file a
    user may have edited); a damaged one is ignored with a warning."""

    def __init__(self, cache_root: str | Path, coordinator: str, name: str):
        import hashlib

        key = hashlib.sha256(f"{coordinator}\n{name}".encode()).hexdigest()[:24]
        self.path = Path(cache_root).expanduser() / "places" / f"{key}.json"

    def read(self) -> tuple[str, Place] | None:
        try:
            if self.path.stat().st_size > MAX_PLACE_FILE_BYTES:
                raise ValueError("too large")
            data = json.loads(self.path.read_text(encoding="utf-8"))
            run_id = data["run_id"]
            fields = [data[k] for k in ("shard", "passes", "position", "sequences")]
            if not isinstance(run_id, str) or not all(type(v) is int and 0 <= v < 2**40 for v in fields):
                raise ValueError("a field of the wrong type or out of range")
            return run_id, Place(*fields)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring %s (%s); this peer starts where the coordinator says", self.path, e)
            return None

    def write(self, run_id: str, place: Place) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, **asdict(place)}), encoding="utf-8")
        os.replace(tmp, self.path)
