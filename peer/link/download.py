"""The one HTTP downloader of a peer: data shards (trainer) and checkpoint files (`crowdtrain pull`).

    download(f"{base}/data/{name}", cache / name, sha256=shard.sha256)      # atomic, verified, cached
    download(url, staging / "model.safetensors", sha256=entry.sha256,      # continues a partial file
             resume=True, deadline=time.monotonic() + 600, progress=bar)
    digest = download_resumable(url, dest, sha256=..., size=...)        # the same, and the sha256 it kept

Without `resume`, the bytes go to a hidden, randomly named `.NAME.*.part` beside `dest` and replace `dest` (atomic
rename) only once complete and verified: `dest` is the whole verified file or absent, and a verified
`dest` is not downloaded again. With `resume`, `dest` itself is the partial file (its caller stages
a whole directory and renames that): an interrupted download continues with an HTTP Range request.
Files are created with O_EXCL|O_NOFOLLOW (a symlink planted at a name is never followed, an existing
file is never appended to unless it is the regular file a download left); at most the promised
`size` is accepted, and Content-Range/Content-Length are parsed strictly (ASCII digits) and checked
against it. The sha256 is computed as the bytes are written (`HashedFile`; a partial file's bytes
are read back first), not by reading the downloaded file again. Bytes that do not match a known
sha256 are deleted (DownloadCorrupted); any other failure is a DownloadError. Both say what failed
(the server's own words cleaned for the terminal); callers add what to do about it in their own terms.
With an `ssl_context` (the volunteer asked for TLS) only https:// URLs are fetched and a redirect
to anything else is refused (`open_url`): asking for TLS never ends in plaintext, silently.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from crowdtrain.peer.checks import NetworkValueError, parse_ascii_int, sha256_file
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError

CHUNK_BYTES = 1 << 20
READ_BYTES = 1 << 18  # read at a time from the network: a progress bar moves at least this often
UNKNOWN_SIZE_LIMIT_BYTES = 1 << 20  # a file of unknown size (crowdtrain.json) may be at most this big


class DownloadError(CrowdtrainError):
    """A download failed; `http_status` is set when the server answered with an error."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


class DownloadCorrupted(DownloadError):
    """The bytes did not match their sha256 and were deleted: downloading again starts afresh."""


def check_file_sha256(path: Path, sha256: str, what: str, digest: str = "") -> None:
    """Raise DownloadCorrupted (after deleting `path`) unless its sha256 is `sha256` ("" = unknown).
    `digest`: the sha256 of the bytes this process wrote to `path` (a `HashedFile`'s); without it
    the file is read again."""
    if not sha256:
        return
    digest = digest or sha256_file(path)
    if digest != sha256:
        path.unlink(missing_ok=True)
        raise DownloadCorrupted(f"{what} is corrupted: sha256 {digest[:12]}..., expected {sha256[:12]}...")


class HashedFile:
    """The file a download writes, and the sha256 of every byte in it, kept as the bytes go in.

    `have` bytes an interrupted download left are read back first, through the very descriptor the
    new bytes are appended to (regular file, no symlink, exactly `have` bytes long); with `have` 0
    the file is created (O_EXCL|O_NOFOLLOW: a symlink planted at the name is never followed, an
    existing file never reused). So `hexdigest()` is the digest of what this process read and wrote
    through that descriptor, and no file needs reading again once it is complete. A change made to
    the file on disk by someone else meanwhile is not seen (nor was it by hashing the file after
    download: it can change after any check).
    """

    def __init__(self, path: Path, have: int):
        self.path, self._hash = path, hashlib.sha256()
        if not have:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            return
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != have:
                raise DownloadError(f"{path} changed while resuming its download; pull again")
            self._hash_prefix(have)
        except BaseException:
            os.close(self._fd)
            raise

    def _hash_prefix(self, have: int) -> None:
        offset = 0
        while offset < have:
            data = os.pread(self._fd, min(CHUNK_BYTES, have - offset), offset)
            if not data:
                raise DownloadError(f"{self.path} changed while resuming its download; pull again")
            self._hash.update(data)
            offset += len(data)

    def write(self, data) -> None:
        """Append `data` (bytes or a memoryview, never copied) and hash it."""
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> HashedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    ssl_context=None,
) -> Path:
    """Fetch `url` into `dest` (see the module docstring). `size` (bytes, -1 = unknown: then at most
    UNKNOWN_SIZE_LIMIT_BYTES) bounds what is accepted and lets a resumed download skip a file that is
    already whole; `deadline` is a time.monotonic() bound on the whole download; `progress` is
    anything with `update(n_bytes)` (peer/events.py `Progress`: what a person sees of a long
    download; n_bytes < 0 when bytes counted are thrown away); `ssl_context` verifies https://
    servers."""
    fetch = dict(timeout_s=timeout_s, deadline=deadline, progress=progress, ssl_context=ssl_context)
    if resume:
        download_resumable(url, dest, sha256=sha256, size=size, **fetch)
        return dest
    if sha256 and _is_regular(dest) and sha256_file(dest) == sha256:
        return dest  # cached
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    part = Path(name)
    try:
        part.unlink()  # _fetch creates it again with O_EXCL: nobody can swap in a symlink unseen
        check_file_sha256(part, sha256, clean_display(url, 300), _fetch(url, part, size, **fetch))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)  # replaces a symlink at `dest` itself, never its target
    return dest


def download_resumable(
    url: str,
    dest: Path,
    *,
    sha256: str = "",
    size: int = -1,
    timeout_s: float = 120.0,
    deadline: float | None = None,
    progress=None,
    ssl_context=None,
) -> str:
    """`download(..., resume=True)`, returning the sha256 of `dest`'s bytes as this process read and
    wrote them (`HashedFile`), already checked against `sha256` when that is known."""
    digest = _fetch(url, dest, size, timeout_s, deadline, progress, ssl_context)
    check_file_sha256(dest, sha256, clean_display(url, 300), digest)
    return digest


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def bytes_already_here(dest: Path, size: int, progress=None) -> int:
    """Bytes of `dest` an interrupted download left (0 if none, or if they cannot be a prefix of a
    file of `size` bytes, or if `dest` is not a regular file: then it is removed); counted into
    `progress`. Shared with pull's gRPC stream."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        return 0
    have = st.st_size
    if not stat.S_ISREG(st.st_mode) or (size >= 0 and have > size):
        dest.unlink()
        have = 0
    if progress is not None and have:
        progress.update(have)
    return have


def expected_body_bytes(headers, status: int, have: int, size: int) -> tuple[int, int | None]:
    """(offset the body starts at, its length or None) from a response's headers, checked against
    what we asked for (`have` bytes onwards) and the promised `size` (-1 unknown). Raises
    NetworkValueError for a malformed or inconsistent Content-Range/Content-Length."""
    start = 0
    if status == 206:
        unit, _, spec = (headers.get("Content-Range") or "").partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit != "bytes" or parse_ascii_int(first, "Content-Range start") != have:
            raise NetworkValueError(
                f"Content-Range {headers.get('Content-Range', '')[:60]!r} is not bytes {have}-"
            )
        start = have
        end = parse_ascii_int(last, "Content-Range end")
        if total != "*" and size >= 0 and parse_ascii_int(total, "Content-Range total") != size:
            raise NetworkValueError(f"Content-Range total {total[:40]!r} is not the promised {size} bytes")
        if end < start or (size >= 0 and end >= size):
            raise NetworkValueError(f"Content-Range end {end} is outside the promised {size} bytes")
    length = headers.get("Content-Length")
    if length is None:
        return start, None
    n = parse_ascii_int(length.strip(), "Content-Length")
    if size >= 0 and start + n > size:
        raise NetworkValueError(
            f"Content-Length {n} from offset {start}: more than the {size} bytes expected"
        )
    return start, n


class PlaintextRefused(DownloadError):
    """TLS was asked for (an ssl_context), but the URL, or a redirect, is not https://."""


def _refuse_plaintext(url: str, what: str) -> None:
    if not url.lower().startswith("https://"):
        raise PlaintextRefused(
            f"{what} {clean_display(url, 200)} is not https://, but TLS was asked for (--tls or --tls-ca); "
            "use the coordinator's https:// address, or leave out --tls/--tls-ca to accept plaintext"
        )


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another https:// URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _refuse_plaintext(newurl, f"{clean_display(req.full_url, 200)} redirects to")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(request: urllib.request.Request | str, timeout_s: float, ssl_context=None):
    """`urllib.request.urlopen`, except that with `ssl_context` (TLS asked for) a URL or a redirect
    that is not https:// raises PlaintextRefused instead of going on in plaintext."""
    if ssl_context is None:
        return urllib.request.urlopen(request, timeout=timeout_s)
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    _refuse_plaintext(url, "the URL")
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl_context), _HttpsOnlyRedirects()
    )
    return opener.open(request, timeout=timeout_s)


def _fetch(url: str, dest: Path, size: int, timeout_s: float, deadline, progress, ssl_context) -> str:
    """Append to `dest` what is missing of `url` (a Range request when it holds bytes already);
    returns the sha256 of all of `dest`, hashed as it was read back and written."""
    have = bytes_already_here(dest, size, progress)
    if have and have == size:
        with HashedFile(dest, have) as f:
            return f.hexdigest()
    limit = size if size >= 0 else UNKNOWN_SIZE_LIMIT_BYTES
    shown = clean_display(url, 300)  # a shard's URL starts with what the coordinator named
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    if deadline is not None:
        timeout_s = max(1.0, min(timeout_s, deadline - time.monotonic()))
    try:
        with open_url(request, timeout_s, ssl_context) as response:
            start, _ = expected_body_bytes(response.headers, response.status, have, size)
            if progress is not None:
                progress.update(0)  # the transfer starts: its progress is shown from now on
            if not start:  # nothing yet, or a server ignoring Range: start over
                dest.unlink(missing_ok=True)
                if progress is not None and have:
                    progress.update(-have)  # counted by bytes_already_here, now thrown away
            written = start
            # one buffer for the whole body: `response.read(n)` would allocate and copy every chunk
            buffer = memoryview(bytearray(READ_BYTES))
            with HashedFile(dest, start) as f:
                while n := response.readinto(buffer):
                    written += n
                    if written > limit:  # a server sending more than was promised: stop
                        raise DownloadError(f"{shown} sent more than the {limit} bytes expected")
                    f.write(buffer[:n])
                    if progress is not None:
                        progress.update(n)
                    if deadline is not None and time.monotonic() > deadline:
                        raise DownloadError(f"download of {shown} exceeded the time limit")
                return f.hexdigest()
    except NetworkValueError as e:
        raise DownloadError(f"{shown}: the server's answer is malformed: {clean_display(str(e))}") from e
    except urllib.error.HTTPError as e:
        reason = clean_display(str(e.reason), 200)  # the server's words
        raise DownloadError(f"{shown}: HTTP {e.code} {reason}", http_status=e.code) from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {shown}: {clean_display(str(e), 300)}") from e
