"""Where the run's data lives on a peer, and fetching one shard of it. No torch.

    cache_dir = run_cache_dir("~/.cache/crowdtrain", manifest.run_id)   # ~/.cache/crowdtrain/ct_tiny_1a2b
    blocks = load_shard_blocks(base_url, cache_dir, shard, tokenizer, seq_len, required=True)

The run id and shard names come from the coordinator's manifest: each must be one plain path
component (peer/names.py) before it names a directory or file. A shard's sha256 comes from the same
manifest, so it proves the bytes are the ones the coordinator meant (not what an HTTP mirror or a
broken disk made of them), not that the coordinator is honest: the manifest arrives over the Join
channel, checked against Join's manifest_sha256, and is as trustworthy as that channel (use TLS).
"""

from __future__ import annotations

import logging
from pathlib import Path

from crowdtrain.peer import names
from crowdtrain.peer.data import DataError, read_shard, tokenize_blocks
from crowdtrain.peer.download import DownloadCorrupted, DownloadError, download
from crowdtrain.peer.manifest import ShardSpec

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
    try:
        path = download(
            f"{base_url}/data/{shard.name}",
            shard_path(cache_dir, shard.name),
            sha256=shard.sha256,
            size=shard.size_bytes,
            ssl_context=ssl_context,
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
