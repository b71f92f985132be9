"""The run's text as a peer reads it: shard files, token blocks, endless shuffled batches.

Shards are JSONL files made once per run by the coordinator (`crowdtrain.coordinator.dataset`);
a peer downloads its shard, checks its sha256 against the manifest and cuts it into fixed-length
token blocks. Imports neither torch nor tokenizers (the tokenizer object is passed in), so every
layer above can use `sha256_file` cheaply.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.manifest import EOS_TOKEN

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EVAL_SHARD_NAME = "eval.jsonl"


class DataError(CrowdtrainError):
    """The run's text cannot be read or is unusable; the message says what to do."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def read_shard(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenize_blocks(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Concatenate documents separated by EOS and cut them into full blocks of `seq_len` tokens."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        stream.extend(encoding.ids)
        stream.append(eos)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def rotating_batches(
    num_shards: int,
    first_shard: int,
    load_blocks: Callable[[int], list[list[int]] | None],
    batch_size: int,
    seed: int,
) -> Iterator[list[list[int]]]:
    """Endless shuffled mini-batches: one pass over the peer's own shard, then the next shard, ...

    Peers start on different shards (the coordinator assigns them round-robin) and then walk the
    whole dataset, so a small swarm still sees all of it. `load_blocks(i)` returns shard i's blocks,
    or None when it cannot be fetched right now (coordinator down): the previous shard is reused.
    """
    blocks: list[list[int]] | None = None
    for k in itertools.count():
        loaded = load_blocks((first_shard + k) % num_shards)
        if loaded is not None and len(loaded) >= batch_size:
            blocks = loaded
        elif blocks is None:
            size = "unavailable" if loaded is None else f"only {len(loaded)} sequences"
            raise DataError(f"data shard {first_shard} is {size}; need at least one batch of {batch_size}")
        rng = random.Random(seed * 1_000_003 + k)
        order = list(range(len(blocks)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [blocks[j] for j in order[i : i + batch_size]]
