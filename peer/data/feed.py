"""A volunteer's data feed: which shard it reads, from where, and remembering where it stopped.

Join says where to start (the coordinator's lease: `PeerSettings.shard_index`, `shard_position`,
`shard_pass`); heartbeat answers say which shard to read next (`next_shard`); the trainer tells the
feed the place of every batch it trained on (`trained`), which goes into the heartbeats and, every
`save_every_s` and at the end, into this peer's place file, so a restart continues where it stopped:

    feed = DataFeed(config, manifest, joined, cache_dir, stats, answers=lambda: heartbeat.answer)
    batches = feed.batches(tokenizer)   # endless (blocks, place) pairs, the first shard loaded now
    ...
    feed.trained(place)                 # after each step
    feed.save()                         # when leaving

Everything the coordinator sends here is checked: a shard index outside the manifest, or a
negative position, is ignored (the feed then moves on by itself).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial

from crowdtrain.peer.data.reader import Place, PlaceFile, ShardReader
from crowdtrain.peer.data.shards import load_shard_blocks
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.tls import ClientTls

logger = logging.getLogger(__name__)


def as_tagged_batch(item: tuple[list[list[int]], Place], device) -> tuple[object, Place]:
    """(blocks, place) -> (token tensor on `device`, place): the read-ahead's transform."""
    from crowdtrain.peer.run.model import as_batch

    blocks, place = item
    return as_batch(blocks, device=device), place


class DataFeed:
    """This peer's batches and its place in the run's data: where it starts (Join's lease), which
    shard it reads next (the coordinator's hints), and where it stopped (the place file).

    Called by the volunteer: `load_data()` builds it and calls `batches()`, which loads the first
    shard on the main thread; the rest is read on the training loop's read-ahead thread
    (`peer/data/prefetch.py`), which fetches later shards and, through `answers`, reads the
    heartbeat thread's latest answer for hints. The training loop (main thread) calls `trained()`
    after each step: that updates `stats` for the heartbeats and, every `save_every_s`, the place file.
    Lifecycle: one per volunteer run, from `load_data()` to `Volunteer.shutdown()`, whose `save()`
    writes where a restart continues; it starts no thread itself.
    """

    def __init__(
        self, config, manifest, joined, cache_dir, stats, answers: Callable[[], object] = lambda: None
    ):
        self.config = config  # the PeerConfig: TLS, seed, where the place file lives
        self.manifest = manifest  # the run's shards and sequence length
        self.joined = joined  # Join's answer: `settings` holds the lease and the shard server's URL
        self.cache_dir = cache_dir  # this run's downloaded shards
        self.stats = stats  # the heartbeat's StatsBox: our place goes to the coordinator
        self.answers = answers  # the heartbeat's latest answer (next-shard hints), or None
        self.num_shards = len(manifest.data.shards)
        self.place_file = PlaceFile(config.cache_dir, config.coordinator, config.name or "default")
        settings = joined.settings
        self.start = Place(
            settings.shard_index % self.num_shards, settings.shard_pass, settings.shard_position
        )
        self.place: Place | None = None  # of the last batch trained on
        self.save_every_s = 30.0  # how often `trained()` writes the place file
        self._saved_at = time.monotonic()

    @staticmethod
    def resume_fields(config) -> dict:
        """JoinRequest fields saying where this peer stopped last time (none when it never read)."""
        found = PlaceFile(config.cache_dir, config.coordinator, config.name or "default").read()
        if found is None:
            return {}
        run_id, place = found
        return dict(
            resume_run_id=run_id,
            resume_shard=place.shard,
            resume_position=place.position,
            resume_pass=place.passes,
        )

    def batches(self, tokenizer, batch_size: int) -> Iterator[tuple[list[list[int]], Place]]:
        """Endless (blocks, place) batches; the first shard is fetched now, so a data problem
        fails before the peer joins the swarm."""
        start = self.start
        emit(
            logger,
            "data_start",
            "data: shard %d, pass %d, from sequence %d",
            start.shard,
            start.passes,
            start.position,
            shard=start.shard,
            passes=start.passes,
            position=start.position,
        )
        seed = self.config.seed  # 0: the run's order, the same on every peer (places mean the same)
        load = partial(self._load_shard, tokenizer)
        reader = ShardReader(
            load, self.num_shards, self.start, batch_size, self.manifest.run_id, seed, next_place=self._hint
        )
        batches = iter(reader)
        return itertools.chain([next(batches)], batches)

    def _load_shard(self, tokenizer, index: int) -> list[list[int]] | None:
        """Shard `index` as token blocks; None when it cannot be fetched now (see peer/data/shards.py)."""
        data = self.manifest.data
        ssl_context = ClientTls.from_flags(self.config.tls, self.config.tls_ca).ssl_context()
        return load_shard_blocks(
            self.joined.settings.http_base_url,
            self.cache_dir,
            data.shards[index],
            tokenizer,
            data.seq_len,
            required=index == self.start.shard,
            ssl_context=ssl_context,
        )

    def _hint(self, shard: int) -> Place | None:
        """The place the coordinator reserved for after `shard`, if it sent a sane one."""
        answer = self.answers()
        if answer is None or not answer.HasField("next_shard"):
            return None
        index, position, passes = answer.next_shard, answer.next_shard_position, answer.next_shard_pass
        if index == shard or not 0 <= index < self.num_shards or position < 0:
            return None
        logger.info("data: moving on to shard %d, reserved by the coordinator", index)
        return Place(index, passes, position)

    def trained(self, place: Place) -> None:
        """The trainer stepped on a batch ending at `place`."""
        self.place = place
        self.stats.update(
            shard_index=place.shard,
            shard_position=place.position,
            shard_pass=place.passes,
            shard_sequences=place.sequences,
        )
        if time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()

    def save(self) -> None:
        if self.place is None:
            return
        self._saved_at = time.monotonic()
        try:
            self.place_file.write(self.manifest.run_id, self.place)
        except OSError as e:
            logger.warning(
                "could not remember this peer's place in the data (%s): a restart begins elsewhere", e
            )
