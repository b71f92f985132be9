"""Download a published checkpoint, verify every file, and leave an HF-loadable directory.

    crowdtrain pull --coordinator 127.0.0.1:50051 --out ./model
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('./model')"

Files land in a hidden staging directory beside OUT and are checked before OUT is renamed into
place: crowdtrain.json's Ed25519 signature against the run's public key (from the coordinator),
then every file's size and sha256 against both crowdtrain.json and the coordinator's listing. OUT
is either the complete, verified checkpoint or untouched. `crowdtrain verify OUT --public-key KEY`
repeats the check offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from coordinator import checkpoints
from coordinator.checkpoints import CheckpointError, CheckpointMeta, FileEntry
from coordinator.client import CoordinatorClient

logger = logging.getLogger(__name__)


class PullError(RuntimeError):
    """The checkpoint could not be downloaded or verified; OUT was left untouched."""


def _download(url: str, dest: Path, deadline: float) -> None:
    timeout = max(1.0, deadline - time.monotonic())
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                if time.monotonic() > deadline:
                    raise PullError(f"download of {url} exceeded the time limit; raise --timeout-s")
    except urllib.error.HTTPError as e:
        raise PullError(
            f"{url}: HTTP {e.code} {e.reason}; the checkpoint may have been pruned, pull again"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise PullError(f"could not download {url}: {e}; is the coordinator's HTTP port reachable?") from e


def pull(coordinator: str, out: Path, step: int = -1, timeout_s: float = 600.0) -> CheckpointMeta:
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / checkpoints.META_NAME).exists():
        raise PullError(f"{out} exists and is not a crowdtrain checkpoint; choose another --out or empty it")
    with CoordinatorClient(coordinator) as client:
        listing = client.list_checkpoints()
    if not listing.checkpoints:
        raise PullError(f"the coordinator at {coordinator} has published no checkpoint yet; try again later")
    if step < 0:
        info = listing.checkpoints[-1]
    else:
        info = next((c for c in listing.checkpoints if c.step == step), None)
        if info is None:
            steps = ", ".join(str(c.step) for c in listing.checkpoints)
            raise PullError(f"no checkpoint at step {step}; available steps: {steps}")
    expected_files = tuple(
        sorted((FileEntry(f.name, f.sha256, f.size_bytes) for f in info.files), key=lambda f: f.name)
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.pull-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    deadline = time.monotonic() + timeout_s
    t0, total = time.monotonic(), 0
    try:
        for name in [checkpoints.META_NAME, *(f.name for f in expected_files)]:
            _download(f"{info.url}/{name}", staging / name, deadline)
            total += (staging / name).stat().st_size
        meta = checkpoints.verify_dir(
            staging,
            expected=CheckpointMeta(
                run_id="",
                step=info.step,
                samples_seen=0,
                eval_loss=0.0,
                created_unix_s=0.0,
                manifest_sha256="",
                previous_step=None,
                files=expected_files,
            ),
            public_key=listing.signing_public_key or None,
        )
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except CheckpointError as e:
        raise PullError(f"verification failed, nothing was written to {out}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.monotonic() - t0
    logger.info(
        "pulled step %d (eval loss %.4f) to %s: %.1f MB in %.1fs, every sha256 verified",
        meta.step,
        meta.eval_loss,
        out,
        total / 1e6,
        elapsed,
    )
    return meta
