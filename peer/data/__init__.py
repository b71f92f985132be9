"""The run's text on a peer: shards, token blocks, the walk through them, the feed and read-ahead.

cache.py     The peer's cache: a directory per run, capped, other runs evicted LRU first
feed.py      A volunteer's data feed: which shard it reads, from where
prefetch.py  Read ahead of training: an iterator's next items are made on a background thread
reader.py    A peer's walk through the run's data, batch by batch, knowing where it is
shards.py    Where the run's data lives on a peer, fetching a shard, its token blocks
"""
