"""Download a published checkpoint, verify every file, and leave an HF-loadable directory.

    crowdtrain pull --coordinator 127.0.0.1:50051 --out ./model            # gRPC stream
    crowdtrain pull --coordinator http://127.0.0.1:8080 --out ./model      # via plain HTTP
    crowdtrain pull --coordinator 127.0.0.1:50051 --out ./model --public-key HEX   # pin the run's key
    python -c "from transformers import pipeline; print(pipeline('text-generation', model='./model')('def '))"

Order of trust: the (unsigned) listing only chooses the step. crowdtrain.json is fetched first (at
most 1 MiB), its Ed25519 signature checked, and its key checked against the pinned `--public-key` or
the key trusted for this coordinator address (peer/checkpoints/trust.py: on first use or by a flag, never on a
training peer's word alone); a "latest" older than a step already verified from the run is refused
(replay). Only then are the files it lists fetched, each name one allowed checkpoint file name, each
download stopped at its signed size. Files land in a private staging directory beside OUT
(`mkdtemp`, mode 0700, files created with O_EXCL|O_NOFOLLOW) and OUT is renamed into place only
after `verify_dir` (exactly the listed files, regular, right sizes and sha256), its files made
0644 and itself 0755 (readable by other users, like any download). Each sha256 is
computed while the file is written (a resumed file's earlier bytes are read back first,
`download.HashedFile`): no file is read again. An interrupted pull resumes in its own staging
directory (HTTP Range, or the gRPC stream's offset); one that fails verification is deleted. A pull
of another step first takes over the files an interrupted pull of an earlier step left whose sha256
is one the signed crowdtrain.json lists (`reuse_identical`: the tokenizer and config files, a tensor
file that did not change), so they are not downloaded again, then removes those partial staging
directories (`remove_stale_staging`: only directories of that exact name, ours and private, never a
symlink).
`crowdtrain verify OUT --public-key KEY` repeats the check offline.

What a coordinator says it has published: its checkpoint listing, checked but not trusted. No torch.

    listed, served_key = list_published("127.0.0.1:50051")              # gRPC
    listed, served_key = list_published("https://host:8443", ClientTls.from_flags(True, ""))

The listing is unsigned: pull uses it only to choose a step and a URL. File names, sizes and
hashes come from that step's signed crowdtrain.json (above). Still, a listing with a name
that is not one allowed checkpoint file name, or a step that is not a plain integer, is refused
here with a PullError, so nothing downstream ever sees it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer import checks as names
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.peer.checkpoints import trust
from crowdtrain.peer.checkpoints.format import CheckpointError, CheckpointMeta, FileEntry
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import Progress
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.peer.link.download import (
    UNKNOWN_SIZE_LIMIT_BYTES,
    DownloadCorrupted,
    DownloadError,
    HashedFile,
    PlaintextRefused,
    bytes_already_here,
    check_file_sha256,
    download_resumable,
    open_url,
)
from crowdtrain.peer.link.tls import ClientTls, plaintext_refusal

logger = logging.getLogger(__name__)


def _progress_bar(total_bytes: int):
    """The pull's progress, as every long download shows it (peer/events.py `Progress`): a tqdm bar on
    a terminal (bytes, percent, rate; named after the file being fetched), a line every 10 s elsewhere."""
    return Progress(total_bytes, "checkpoint", log=logger, leave=True)


def _download_grpc(
    client: CoordinatorClient, step: int, dest: Path, size: int, deadline: float, progress
) -> str:
    """Fetch one file over the DownloadCheckpointFile stream, continuing a partial file; at most
    `size` bytes (-1: unknown, then at most UNKNOWN_SIZE_LIMIT_BYTES). Returns the sha256 of the
    whole file as it was read back and written (`HashedFile`)."""
    limit = size if size >= 0 else UNKNOWN_SIZE_LIMIT_BYTES
    have = bytes_already_here(dest, size, progress)
    try:
        with HashedFile(dest, have) as f:
            if have == size:
                return f.hexdigest()
            chunks = client.download_checkpoint_file(
                step, dest.name, have, timeout_s=max(1.0, deadline - time.monotonic())
            )
            for chunk in chunks:
                if chunk.offset != have:
                    raise PullError(
                        f"{dest.name}: the coordinator sent bytes at {chunk.offset}, expected {have}"
                    )
                data = chunk.data  # once: every read of a bytes field copies it (upb protobuf)
                if have + len(data) > limit:
                    raise PullError(f"{dest.name}: the coordinator sent more than the {limit} bytes expected")
                f.write(data)
                have += len(data)
                if progress is not None:
                    progress.update(len(data))
            return f.hexdigest()
    except CoordinatorRejected as e:
        raise PullError(f"{e}; the checkpoint may have been pruned, pull again") from e
    except (CoordinatorUnavailable, OSError) as e:
        raise PullError(f"downloading {dest.name} failed: {e}; run pull again to resume") from e


def _choose(listed: list[Listed], step: int, coordinator: str) -> Listed:
    if not listed:
        raise PullError(f"the coordinator at {coordinator} has published no checkpoint yet; try again later")
    if step < 0:
        return max(listed, key=lambda c: c.step)
    info = next((c for c in listed if c.step == step), None)
    if info is None:
        raise PullError(
            f"no checkpoint at step {step}; available steps: {', '.join(str(c.step) for c in listed)}"
        )
    return info


def staging_dir(out: Path, step: int) -> Path:
    """A private directory beside `out` for step `step`: one an interrupted pull of this user left
    (a real directory, owned by us, mode 0700), else a fresh `mkdtemp` one."""
    prefix = f".{out.name}.pull-step-{step}-"
    for candidate in sorted(out.parent.glob(glob.escape(prefix) + "*")):
        if _is_our_private_dir(candidate):
            return candidate
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def _is_our_private_dir(path: Path) -> bool:
    """A real directory (not a symlink), owned by this user, mode 0700 or stricter."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def stale_staging(out: Path, step: int) -> list[Path]:
    """The staging directories interrupted pulls of steps other than `step` left beside `out`:
    only `staging_dir`'s exact names (`.OUT.pull-step-N-` and mkdtemp's 8 characters), only ours
    and private, never a symlink."""
    pattern = re.compile(re.escape(f".{out.name}.pull-step-") + r"(\d{1,19})-[a-z0-9_]{8}")
    return [
        candidate
        for candidate in sorted(out.parent.glob(glob.escape(f".{out.name}.pull-step-") + "*"))
        if (found := pattern.fullmatch(candidate.name)) is not None
        and int(found[1]) != step
        and _is_our_private_dir(candidate)
    ]


def _sha256_no_follow(path: Path) -> str:
    """sha256 of a regular file, opened without following a symlink; "" if it is anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()


def reuse_identical(sources: list[Path], meta: CheckpointMeta, staging: Path) -> dict[str, str]:
    """Move into `staging` each file of `sources` (stale staging directories) whose size and sha256
    are those `meta` signs for one of its files, under that file's name; returns {name: sha256} of
    the files taken over. A file `staging` already holds whole is left to the ordinary resume;
    only regular files are read (no symlink followed), each at most once."""
    by_size: dict[int, list[Path]] = {}
    for directory in sources:
        try:  # another pull beside OUT may be removing it right now
            found = [(path, path.lstat()) for path in sorted(directory.iterdir())]
        except OSError:
            continue
        for path, st in found:
            if stat.S_ISREG(st.st_mode) and path.name != checkpoint.META_NAME:
                by_size.setdefault(st.st_size, []).append(path)
    digests: dict[Path, str] = {}
    reused: dict[str, str] = {}
    for entry in meta.files:
        here = staging / entry.name
        if here.is_file() and not here.is_symlink() and here.stat().st_size == entry.size_bytes:
            continue
        candidates = by_size.get(entry.size_bytes, [])
        for path in list(candidates):
            if path not in digests:
                digests[path] = _sha256_no_follow(path)
            if digests[path] == entry.sha256:
                candidates.remove(path)
                try:
                    os.replace(path, here)
                except OSError:  # gone meanwhile: downloaded as usual
                    continue
                reused[entry.name] = entry.sha256
                break
    if reused:
        logger.info(
            "took over %d file(s) an interrupted pull of another step left, byte-identical by sha256: %s",
            len(reused),
            ", ".join(sorted(reused)),
        )
    return reused


def remove_stale_staging(out: Path, step: int) -> list[str]:
    """Remove the staging directories interrupted pulls of steps other than `step` left beside
    `out` (`stale_staging`; a pull resumes only its own step, after `reuse_identical` took what it
    could); returns their names. rmtree removes symlinks inside, never their targets."""
    removed = []
    for candidate in stale_staging(out, step):
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate.name)
    if removed:
        logger.info(
            "removed %d partial download(s) of other steps beside %s (interrupted pulls): %s",
            len(removed),
            out,
            ", ".join(removed),
        )
    return removed


def _share_files(staging: Path, meta: CheckpointMeta) -> None:
    """Make the verified files 0644 (HashedFile created them 0600) while `staging` is still private;
    each opened without following a symlink and changed through that descriptor."""
    for name in [checkpoint.META_NAME, *(f.name for f in meta.files)]:
        fd = os.open(staging / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)


class _Source:
    """Where a checkpoint's files come from: the gRPC stream of HOST:PORT, or an http(s) URL."""

    def __init__(self, coordinator: str, info: Listed, tls: ClientTls | None, deadline: float):
        self.info, self.deadline = info, deadline
        self.context = tls.ssl_context() if tls is not None and is_http(coordinator) else None
        self.client = None if is_http(coordinator) else CoordinatorClient(coordinator, tls=tls)

    def fetch(self, staging: Path, name: str, size: int, sha256: str, progress=None) -> str:
        """Download `name` into `staging`, checked against `sha256` ("" = unknown) as it lands;
        returns the sha256 of the bytes written to the file, hashed while they were written."""
        if self.client is not None:
            digest = _download_grpc(
                self.client, self.info.step, staging / name, size, self.deadline, progress
            )
            check_file_sha256(staging / name, sha256, name, digest)
            return digest
        return download_resumable(
            f"{self.info.url}/{name}",
            staging / name,
            sha256=sha256,
            size=size,
            deadline=self.deadline,
            progress=progress,
            ssl_context=self.context,
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _fetch_meta(source: _Source, staging: Path) -> CheckpointMeta:
    """crowdtrain.json, fetched whole (it may have changed since an earlier try), size-capped,
    parsed strictly and its signature checked against the key it names."""
    (staging / checkpoint.META_NAME).unlink(missing_ok=True)
    source.fetch(staging, checkpoint.META_NAME, -1, "")
    meta = checkpoint.read_meta(staging)
    checkpoint.verify_signature(meta, None)
    return meta


def _fetch_files(
    source: _Source, meta: CheckpointMeta, staging: Path, reused: dict[str, str]
) -> dict[str, str]:
    """Every file crowdtrain.json lists (and nothing else stays in `staging`), each bounded by its
    signed size and checked against its signed sha256 as it lands, except those `reused` (already
    hashed: `reuse_identical`); returns {name: sha256 of the bytes written to it}, for `verify_dir`
    not to read every file again."""
    listed = {f.name for f in meta.files} | {checkpoint.META_NAME}
    for path in staging.iterdir():  # leftovers of an earlier try at another version: not ours
        if path.name not in listed:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    progress = _progress_bar(sum(f.size_bytes for f in meta.files))
    progress.update(sum(f.size_bytes for f in meta.files if f.name in reused))
    digests = dict(reused)
    try:
        for entry in meta.files:
            if entry.name in reused:
                continue
            progress.set_description_str(entry.name)
            digests[entry.name] = source.fetch(staging, entry.name, entry.size_bytes, entry.sha256, progress)
    finally:
        progress.close()
    return digests


def _check_trust(
    coordinator: str, meta: CheckpointMeta, info: Listed, step: int, policy: trust.TrustPolicy
) -> str:
    """The signer is the run's key (pinned or trusted on first use) and "latest" is no replay.
    Returns how to record the key once the checkpoint is verified (trust.HOW_*)."""
    if meta.step != info.step:
        raise CheckpointError(
            f"{checkpoint.META_NAME} is for step {meta.step}, not the listed step {info.step}"
        )
    known, how = policy.check(coordinator, meta.run_id, meta.public_key)
    ok, reason = trust.newest_step_decision(known, meta.step, explicit_step=step >= 0)
    if not ok:
        raise trust.UntrustedKey(
            f"refusing step {meta.step} from {coordinator}: {reason}; pass --step to want it"
        )
    return how


def _download_verified(
    coordinator: str,
    info: Listed,
    step: int,
    staging: Path,
    timeout_s: float,
    tls,
    policy: trust.TrustPolicy,
    stale: list[Path],
) -> tuple[CheckpointMeta, str]:
    """(the verified crowdtrain.json, how to record its key) for `info`, downloaded into `staging`,
    taking over what `stale` staging directories hold of it (`reuse_identical`)."""
    source = _Source(coordinator, info, tls, time.monotonic() + timeout_s)
    try:
        meta = _fetch_meta(source, staging)
        how = _check_trust(coordinator, meta, info, step, policy)
        digests = _fetch_files(source, meta, staging, reuse_identical(stale, meta, staging))
        return checkpoint.verify_dir(staging, public_key=meta.public_key, digests=digests), how
    except trust.UntrustedKey as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise PullError(f"nothing was written: {e}") from e
    except (CheckpointError, DownloadCorrupted) as e:
        shutil.rmtree(staging, ignore_errors=True)  # never resume from bytes that failed verification
        raise PullError(f"verification failed, nothing was written: {e}") from e
    except PlaintextRefused as e:  # a redirect out of https: trying again would not help
        raise PullError(str(e)) from e
    except DownloadError as e:
        hint = (
            "the checkpoint may have been pruned, pull again" if e.http_status else "run pull again to resume"
        )
        raise PullError(f"{e}; {hint}") from e
    finally:
        source.close()


def pull(
    coordinator: str,
    out: Path,
    step: int = -1,
    timeout_s: float = 600.0,
    *,
    public_key: str = "",
    trust_new_key: bool = False,
    new_run_ok: bool = False,
    trust_new_run: bool = False,
    tls: ClientTls | None = None,
    store: trust.TrustStore | None = None,
) -> CheckpointMeta:
    """Download step `step` (-1: the latest) into `out`, verified (see the module docstring).
    `public_key` pins the run's key; else the key is trusted on first use per coordinator address
    in `store` (default: the user's config directory); `trust_new_key` accepts a changed key,
    `trust_new_run` a run not trusted at this address before. `new_run_ok`: the caller is a training
    peer (peer/volunteer/recovery.py) pulling its run with the key trusted at Join pinned as `public_key`;
    what it verifies is recorded as a peer's trust ("joined"), never as a volunteer's pin."""
    out = Path(out).expanduser()
    if out.is_symlink() or (
        out.exists() and any(out.iterdir()) and not (out / checkpoint.META_NAME).exists()
    ):
        raise PullError(f"{out} exists and is not a crowdtrain checkpoint; choose another --out or empty it")
    policy = trust.TrustPolicy(
        store or trust.TrustStore.default(), public_key, trust_new_key, trust_new_run, joined=new_run_ok
    )
    info = _choose(list_published(coordinator, tls)[0], step, coordinator)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out, info.step)
    t0 = time.monotonic()
    try:
        meta, how = _download_verified(
            coordinator, info, step, staging, timeout_s, tls, policy, stale_staging(out, info.step)
        )
    finally:  # what could be taken over was; what is left can never be resumed
        remove_stale_staging(out, info.step)
    _share_files(staging, meta)
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    os.chmod(out, 0o755)  # mkdtemp made it private while it was being filled
    try:
        policy.store.remember(coordinator, meta.run_id, meta.public_key, meta.step, how)
    except trust.UntrustedKey as e:  # only with a pinned key: the pin decided, the record is unreadable
        logger.warning("%s; step %d was verified with the pinned key but is not recorded", e, meta.step)
    elapsed = time.monotonic() - t0
    total = sum(f.size_bytes for f in meta.files)
    logger.info(
        "pulled step %d (eval loss %.4f) of run %s to %s: %.1f MB in %.1fs, signed by the run's key %s..., "
        "every sha256 verified",
        meta.step,
        meta.eval_loss,
        meta.run_id,
        out,
        total / 1e6,
        elapsed,
        meta.public_key[:16],
    )
    return meta


MAX_LISTING_BYTES = 16 << 20


class PullError(CrowdtrainError):
    """The checkpoint could not be downloaded or verified; OUT was left untouched."""


@dataclass(frozen=True)
class Listed:
    """One checkpoint as the coordinator lists it (unsigned: a hint, never the file list's source)."""

    step: int
    eval_loss: float
    created_unix_s: float
    files: tuple[FileEntry, ...]
    url: str  # base URL of the checkpoint's files


def is_http(coordinator: str) -> bool:
    return coordinator.startswith(("http://", "https://"))


def list_published(coordinator: str, tls: ClientTls | None = None) -> tuple[list[Listed], str]:
    """(checkpoints oldest first, the signing key the coordinator claims) from `HOST:PORT` (gRPC)
    or an http(s):// URL. Raises PullError for an unreachable coordinator, a malformed listing, or
    an http:// URL with TLS asked for (`plaintext_refusal`)."""
    refused = plaintext_refusal(coordinator, tls)
    if refused:
        raise PullError(refused)
    if is_http(coordinator):
        return _list_http(coordinator.rstrip("/"), tls)
    with CoordinatorClient(coordinator, tls=tls) as client:
        listing = client.list_checkpoints()
    try:
        listed = [
            Listed(
                names.check_int(c.step, "a listed step"),
                c.eval_loss,
                c.created_unix_s,
                tuple(
                    sorted(
                        (
                            FileEntry(
                                names.safe_component(f.name, names.CHECKPOINT_FILE, "a listed file"),
                                f.sha256,
                                f.size_bytes,
                            )
                            for f in c.files
                        ),
                        key=lambda f: f.name,
                    )
                ),
                c.url,
            )
            for c in listing.checkpoints
        ]
    except names.NetworkValueError as e:
        raise PullError(
            f"the coordinator at {coordinator} sent a malformed listing: {clean_display(str(e), 300)}"
        ) from e
    return sorted(listed, key=lambda c: c.step), listing.signing_public_key


def _list_http(base: str, tls: ClientTls | None) -> tuple[list[Listed], str]:
    context = tls.ssl_context() if tls is not None else None
    try:
        raw = _get_json(f"{base}/api/v1/checkpoints", context)
        run = _get_json(f"{base}/api/v1/run", context)
    except PlaintextRefused as e:
        raise PullError(str(e)) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PullError(
            f"could not list checkpoints at {base}: {clean_display(str(e), 300)}; is that the "
            "coordinator's HTTP address?"
        ) from e
    if not isinstance(raw, list) or not isinstance(run, dict):
        raise PullError(f"{base} answered with something that is not a checkpoint listing")
    try:
        metas = [CheckpointMeta.from_json(json.dumps(m)) for m in raw]
    except CheckpointError as e:
        raise PullError(
            f"the coordinator at {base} sent a malformed listing: {clean_display(str(e), 300)}"
        ) from e
    listed = [
        Listed(m.step, m.eval_loss, m.created_unix_s, m.files, f"{base}/checkpoints/{m.step}") for m in metas
    ]
    key = run.get("signing_public_key", "")
    return sorted(listed, key=lambda c: c.step), key if isinstance(key, str) else ""


def _get_json(url: str, context):
    with open_url(url, 30, context) as response:
        data = response.read(MAX_LISTING_BYTES + 1)
    if len(data) > MAX_LISTING_BYTES:
        raise ValueError(f"{url} sent more than {MAX_LISTING_BYTES} bytes")
    return json.loads(data)
