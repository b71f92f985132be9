"""Where the run's data lives on a peer, and fetching one shard of it. No torch.

    cache_dir = run_cache_dir("~/.cache/crowdtrain", manifest.run_id)   # ~/.cache/crowdtrain/ct_tiny_1a2b
    blocks = load_shard_blocks(base_url, cache_dir, shard, tokenizer, seq_len, required=True)

The run id and shard names come from the coordinator's manifest: each must be one plain path
component (peer/checks.py) before it names a directory or file. A shard's sha256 comes from the same
manifest, so it proves the bytes are the ones the coordinator meant (not what an HTTP mirror or a
broken disk made of them), not that the coordinator is honest: the manifest arrives over the Join
channel, checked against Join's manifest_sha256, and is as trustworthy as that channel (use TLS).

The run's text as a peer reads it: shard files and token blocks (batches: peer/data/reader.py).

Shards are JSONL files made once per run by the coordinator (`crowdtrain.coordinator.run.dataset`);
a peer downloads its shard, checks its sha256 against the manifest and cuts it into fixed-length
token blocks. Imports neither torch nor tokenizers (the tokenizer object is passed in).

    texts = read_shard(path)                      # or: texts, skipped = read_shard_counted(path)
    blocks = tokenize_blocks(tokenizer, texts, seq_len)

A shard line that is not a JSON object with a string "text" (impossible after the sha256 check,
unless the coordinator itself is broken) is skipped and counted, never a crash; a shard file over
`MAX_SHARD_BYTES` (peer/run/manifest.py: no manifest may name one, so no download fetches one) is
refused before it is read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from crowdtrain.peer import checks as names
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import Progress
from crowdtrain.peer.link.download import DownloadCorrupted, DownloadError, download
from crowdtrain.peer.run.manifest import EOS_TOKEN, MAX_SHARD_BYTES, ShardSpec

logger = logging.getLogger(__name__)


def run_cache_dir(cache_root: str, run_id: str) -> Path:
    """CACHE_ROOT/<run_id>: the run id comes from the coordinator, so it must be one plain name."""
    return Path(cache_root).expanduser() / names.check_run_id(run_id)


def shard_path(cache_dir: Path, shard_name: str) -> Path:
    """Where a data shard named by the manifest is cached: one plain file name inside `cache_dir`."""
    return cache_dir / names.safe_component(shard_name, names.SHARD_FILE, "a data shard name")


def load_shard_blocks(
    base_url: str,
    cache_dir: Path,
    shard: ShardSpec,
    tokenizer,
    seq_len: int,
    *,
    required: bool,
    ssl_context=None,
) -> list[list[int]] | None:
    """The shard as token blocks (downloaded, verified, cached); None when it cannot be fetched now
    and it is not `required` (an earlier shard can stand in for it); DataError when it is."""
    try:  # a bar on a terminal, a line every 10 s elsewhere; nothing for a shard already cached
        with Progress(shard.size_bytes, f"data shard {shard.name}", log=logger) as progress:
            path = download(
                f"{base_url}/data/{shard.name}",
                shard_path(cache_dir, shard.name),
                sha256=shard.sha256,
                size=shard.size_bytes,
                ssl_context=ssl_context,
                progress=progress,
            )
    except (DownloadError, names.NetworkValueError) as e:
        advice = "retry" if isinstance(e, DownloadCorrupted) else "is the coordinator's HTTP port reachable?"
        error = DataError(f"data shard {shard.name}: {e}; {advice}")
        if required or isinstance(e, names.NetworkValueError):
            raise error from e
        logger.warning("%s; training on the previous shard again", error)
        return None
    blocks = tokenize_blocks(tokenizer, read_shard(path), seq_len)
    logger.info("data: %s, %d sequences of %d tokens", shard.name, len(blocks), seq_len)
    return blocks


if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

EVAL_SHARD_NAME = "eval.jsonl"
# the coordinator keeps documents of at most 4 MiB of text; JSON escapes can grow a line up to 6x
MAX_SHARD_LINE_BYTES = 32 << 20


class DataError(CrowdtrainError):
    """The run's text cannot be read or is unusable; the message says what to do."""


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
