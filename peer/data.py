"""The run's text as a peer reads it: shard files and token blocks (batches: peer/shardread.py).

Shards are JSONL files made once per run by the coordinator (`crowdtrain.coordinator.dataset`);
a peer downloads its shard, checks its sha256 against the manifest and cuts it into fixed-length
token blocks. Imports neither torch nor tokenizers (the tokenizer object is passed in), so every
layer above can use `sha256_file` cheaply.

    texts = read_shard(path)                      # or: texts, skipped = read_shard_counted(path)
    blocks = tokenize_blocks(tokenizer, texts, seq_len)

A shard line that is not a JSON object with a string "text" (impossible after the sha256 check,
unless the coordinator itself is broken) is skipped and counted, never a crash; a shard file over
`MAX_SHARD_BYTES` (peer/manifest.py: no manifest may name one, so no download fetches one) is
refused before it is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.manifest import EOS_TOKEN, MAX_SHARD_BYTES

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

EVAL_SHARD_NAME = "eval.jsonl"
# the coordinator keeps documents of at most 4 MiB of text; JSON escapes can grow a line up to 6x
MAX_SHARD_LINE_BYTES = 32 << 20


class DataError(CrowdtrainError):
    """The run's text cannot be read or is unusable; the message says what to do."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def iter_bounded_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """Each line of the binary file `f`; None for a line over `max_line_bytes`, which is read past
    in 1 MiB pieces without ever being held whole."""
    while line := f.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def shard_texts(lines: Iterable[bytes | None]) -> tuple[list[str], int]:
    """Pure: the "text" of each shard line, and how many non-blank lines were not a JSON object with
    a string "text" (or were over the size bound: None)."""
    texts: list[str] = []
    skipped = 0
    for line in lines:
        if line is not None and not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8")) if line is not None else None
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str):
                text.encode("utf-8")  # a lone surrogate (\ud800 in JSON) would crash the tokenizer
                texts.append(text)
                continue
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or absurdly nested
            pass
        skipped += 1
    return texts, skipped


def read_shard_counted(path: Path) -> tuple[list[str], int]:
    """The documents' texts of a shard file, and the number of malformed lines skipped (logged).
    DataError for a file over MAX_SHARD_BYTES, which no manifest may name (it is not read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_SHARD_BYTES:
            raise DataError(
                f"data shard {path} holds {size} bytes, more than the {MAX_SHARD_BYTES} a run's shard "
                "may; delete it so it is downloaded again"
            )
        texts, skipped = shard_texts(iter_bounded_lines(f, MAX_SHARD_LINE_BYTES))
    if skipped:
        logger.warning(
            'data shard %s: skipped %d malformed line(s) (not a JSON object with a string "text"); '
            "if this repeats, delete the cached shard so it is downloaded again",
            path,
            skipped,
        )
    return texts, skipped


def read_shard(path: Path) -> list[str]:
    """The documents' texts of a shard file; malformed lines are skipped (see read_shard_counted)."""
    return read_shard_counted(path)[0]


def tokenize_blocks(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Concatenate documents separated by EOS and cut them into full blocks of `seq_len` tokens."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        stream.extend(encoding.ids)
        stream.append(eos)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
