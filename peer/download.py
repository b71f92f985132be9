"""The one HTTP downloader of a peer: data shards (trainer) and checkpoint files (`crowdtrain pull`).

    download(f"{base}/data/{name}", cache / name, sha256=shard.sha256)      # atomic, verified, cached
    download(url, staging / "model.safetensors", sha256=entry.sha256,      # continues a partial file
             resume=True, deadline=time.monotonic() + 600, progress=bar)

Without `resume`, the bytes go to a hidden `.NAME.PID.part` beside `dest` and replace `dest` (atomic
rename) only once complete and verified: `dest` is the whole verified file or absent, and a verified
`dest` is not downloaded again. With `resume`, `dest` itself is the partial file (its caller stages
a whole directory and renames that): an interrupted download continues with an HTTP Range request.
Bytes that do not match a known sha256 are deleted (DownloadCorrupted); any other failure is a
DownloadError. Both say what failed; callers add what to do about it in their own terms.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from crowdtrain.peer.data import sha256_file
from crowdtrain.peer.errors import CrowdtrainError

CHUNK_BYTES = 1 << 20


class DownloadError(CrowdtrainError):
    """A download failed; `http_status` is set when the server answered with an error."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


class DownloadCorrupted(DownloadError):
    """The bytes did not match their sha256 and were deleted: downloading again starts afresh."""


def check_sha256(path: Path, sha256: str, what: str) -> None:
    """Raise DownloadCorrupted (after deleting `path`) unless its sha256 is `sha256` ("" = unknown)."""
    if not sha256:
        return
    digest = sha256_file(path)
    if digest != sha256:
        path.unlink(missing_ok=True)
        raise DownloadCorrupted(f"{what} is corrupted: sha256 {digest[:12]}..., expected {sha256[:12]}...")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str = "",
    size: int = -1,
    resume: bool = False,
    timeout_s: float = 120.0,
    deadline: float | None = None,
    progress=None,
) -> Path:
    """Fetch `url` into `dest` (see the module docstring). `size` (bytes, -1 = unknown) lets a resumed
    download skip a file that is already whole; `deadline` is a time.monotonic() bound on the whole
    download; `progress` is anything with `update(n_bytes)` (a tqdm bar)."""
    if resume:
        _fetch(url, dest, size, timeout_s, deadline, progress)
        check_sha256(dest, sha256, url)
        return dest
    if sha256 and dest.is_file() and sha256_file(dest) == sha256:
        return dest  # cached
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    part.unlink(missing_ok=True)
    try:
        _fetch(url, part, size, timeout_s, deadline, progress)
        check_sha256(part, sha256, url)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def bytes_already_here(dest: Path, size: int, progress=None) -> int:
    """Bytes of `dest` an interrupted download left (0 if none, or if they cannot be a prefix of a
    file of `size` bytes); counted into `progress`. Shared with pull's gRPC stream."""
    have = dest.stat().st_size if dest.exists() else 0
    if size >= 0 and have > size:
        dest.unlink()
        have = 0
    if progress is not None and have:
        progress.update(have)
    return have


def _fetch(url: str, dest: Path, size: int, timeout_s: float, deadline, progress) -> None:
    """Append to `dest` what is missing of `url` (a Range request when it holds bytes already)."""
    have = bytes_already_here(dest, size, progress)
    if have and have == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    if deadline is not None:
        timeout_s = max(1.0, min(timeout_s, deadline - time.monotonic()))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            mode = "ab" if have and response.status == 206 else "wb"  # a server ignoring Range: start over
            written = have if mode == "ab" else 0
            with open(dest, mode) as f:
                while chunk := response.read(CHUNK_BYTES):
                    written += len(chunk)
                    if 0 <= size < written:  # a server sending more than the listing said: stop
                        raise DownloadError(f"{url} sent more than the {size} bytes expected")
                    f.write(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
                    if deadline is not None and time.monotonic() > deadline:
                        raise DownloadError(f"download of {url} exceeded the time limit")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}", http_status=e.code) from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {url}: {e}") from e
