"""Download a published checkpoint, verify every file, and leave an HF-loadable directory.

    crowdtrain pull --coordinator 127.0.0.1:50051 --out ./model            # gRPC stream
    crowdtrain pull --coordinator http://127.0.0.1:8080 --out ./model      # via plain HTTP
    python -c "from transformers import pipeline; print(pipeline('text-generation', model='./model')('def '))"

Files land in a hidden staging directory beside OUT (`.OUT.pull-step-N`) and are checked before
OUT is renamed into place: crowdtrain.json's Ed25519 signature against the run's public key (from
the coordinator), then every file's size and sha256 against both crowdtrain.json and the
coordinator's listing. OUT is either the complete, verified checkpoint or untouched. An
interrupted pull resumes where it stopped (HTTP Range, or the gRPC stream's offset); a staging directory that fails
verification is deleted. `crowdtrain verify OUT --public-key KEY` repeats the check offline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer import checkpoint
from crowdtrain.peer.checkpoint import CheckpointError, CheckpointMeta, FileEntry
from crowdtrain.peer.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.peer.download import (
    DownloadCorrupted,
    DownloadError,
    bytes_already_here,
    check_sha256,
    download,
)
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)


class PullError(CrowdtrainError):
    """The checkpoint could not be downloaded or verified; OUT was left untouched."""


@dataclass(frozen=True)
class Listed:
    """One checkpoint as the coordinator lists it."""

    step: int
    eval_loss: float
    created_unix_s: float
    files: tuple[FileEntry, ...]
    url: str  # base URL of the checkpoint's files


def list_published(coordinator: str) -> tuple[list[Listed], str]:
    """(checkpoints oldest first, the run's signing public key) from `HOST:PORT` (gRPC) or an HTTP URL."""
    if coordinator.startswith(("http://", "https://")):
        base = coordinator.rstrip("/")
        try:
            metas = [CheckpointMeta.from_json(json.dumps(m)) for m in _get_json(f"{base}/api/v1/checkpoints")]
            public_key = _get_json(f"{base}/api/v1/run").get("signing_public_key", "")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PullError(
                f"could not list checkpoints at {base}: {e}; is that the coordinator's HTTP address?"
            ) from e
        listed = [
            Listed(m.step, m.eval_loss, m.created_unix_s, m.files, f"{base}/checkpoints/{m.step}")
            for m in metas
        ]
        return listed, public_key
    with CoordinatorClient(coordinator) as client:
        listing = client.list_checkpoints()
    listed = [
        Listed(
            c.step,
            c.eval_loss,
            c.created_unix_s,
            tuple(sorted((FileEntry(f.name, f.sha256, f.size_bytes) for f in c.files), key=lambda f: f.name)),
            c.url,
        )
        for c in listing.checkpoints
    ]
    return listed, listing.signing_public_key


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _progress_bar(total_bytes: int):
    """One tqdm line on a terminal (bytes, percent, rate); silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def _download_grpc(
    client: CoordinatorClient, step: int, dest: Path, size: int, deadline: float, progress
) -> None:
    """Fetch one file over the DownloadCheckpointFile stream, continuing a partial file."""
    have = bytes_already_here(dest, size, progress)
    if have == size:
        return
    chunks = client.download_checkpoint_file(
        step, dest.name, have, timeout_s=max(1.0, deadline - time.monotonic())
    )
    try:
        with open(dest, "ab" if have else "wb") as f:
            for chunk in chunks:
                if chunk.offset != have:
                    raise PullError(
                        f"{dest.name}: the coordinator sent bytes at {chunk.offset}, expected {have}"
                    )
                f.write(chunk.data)
                have += len(chunk.data)
                if progress is not None:
                    progress.update(len(chunk.data))
    except CoordinatorRejected as e:
        raise PullError(f"{e}; the checkpoint may have been pruned, pull again") from e
    except (CoordinatorUnavailable, OSError) as e:
        raise PullError(f"downloading {dest.name} failed: {e}; run pull again to resume") from e


def _choose(listed: list[Listed], step: int, coordinator: str) -> Listed:
    if not listed:
        raise PullError(f"the coordinator at {coordinator} has published no checkpoint yet; try again later")
    if step < 0:
        return listed[-1]
    info = next((c for c in listed if c.step == step), None)
    if info is None:
        raise PullError(
            f"no checkpoint at step {step}; available steps: {', '.join(str(c.step) for c in listed)}"
        )
    return info


def _fetch_all(coordinator: str, info: Listed, staging: Path, out: Path, timeout_s: float) -> None:
    """Every file of `info` into `staging`, each checked against the listing's sha256 as it lands;
    bytes that fail the check take the whole staging directory with them."""
    deadline = time.monotonic() + timeout_s
    client = None if coordinator.startswith(("http://", "https://")) else CoordinatorClient(coordinator)

    def fetch(name: str, size: int, sha256: str, progress) -> None:
        if client is not None:  # gRPC stream from HOST:PORT, else HTTP from the URL
            _download_grpc(client, info.step, staging / name, size, deadline, progress)
            check_sha256(staging / name, sha256, name)
        else:
            download(
                f"{info.url}/{name}",
                staging / name,
                sha256=sha256,
                size=size,
                resume=True,
                deadline=deadline,
                progress=progress,
            )

    progress = _progress_bar(sum(f.size_bytes for f in info.files))
    try:
        # crowdtrain.json is small and must be fetched whole; it may have changed since an earlier try
        (staging / checkpoint.META_NAME).unlink(missing_ok=True)
        fetch(checkpoint.META_NAME, 1 << 30 if client else -1, "", None)
        for entry in info.files:
            progress.set_description_str(entry.name)
            fetch(entry.name, entry.size_bytes, entry.sha256, progress)
    except DownloadCorrupted as e:
        shutil.rmtree(staging, ignore_errors=True)  # never resume from bytes that failed verification
        raise PullError(f"verification failed, nothing was written to {out}: {e}") from e
    except DownloadError as e:
        hint = (
            "the checkpoint may have been pruned, pull again" if e.http_status else "run pull again to resume"
        )
        raise PullError(f"{e}; {hint}") from e
    finally:
        progress.close()
        if client is not None:
            client.close()


def pull(coordinator: str, out: Path, step: int = -1, timeout_s: float = 600.0) -> CheckpointMeta:
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / checkpoint.META_NAME).exists():
        raise PullError(f"{out} exists and is not a crowdtrain checkpoint; choose another --out or empty it")
    listed, public_key = list_published(coordinator)
    info = _choose(listed, step, coordinator)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.pull-step-{info.step}"  # stable name: an interrupted pull resumes
    staging.mkdir(exist_ok=True)
    t0 = time.monotonic()
    _fetch_all(coordinator, info, staging, out, timeout_s)
    try:
        meta = checkpoint.verify_dir(
            staging,
            expected=CheckpointMeta(
                run_id="",
                step=info.step,
                samples_seen=0,
                eval_loss=0.0,
                created_unix_s=0.0,
                manifest_sha256="",
                previous_step=None,
                files=info.files,
            ),
            public_key=public_key or None,
        )
    except CheckpointError as e:
        shutil.rmtree(staging, ignore_errors=True)  # never resume from bytes that failed verification
        raise PullError(f"verification failed, nothing was written to {out}: {e}") from e
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    elapsed = time.monotonic() - t0
    total = sum(f.size_bytes for f in info.files)
    logger.info(
        "pulled step %d (eval loss %.4f) to %s: %.1f MB in %.1fs, signature and every sha256 verified",
        meta.step,
        meta.eval_loss,
        out,
        total / 1e6,
        elapsed,
    )
    return meta
