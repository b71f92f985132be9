"""What a coordinator says it has published: its checkpoint listing, checked but not trusted. No torch.

    listed, served_key = list_published("127.0.0.1:50051")              # gRPC
    listed, served_key = list_published("https://host:8443", ClientTls.from_flags(True, ""))

The listing is unsigned: pull uses it only to choose a step and a URL. File names, sizes and
hashes come from that step's signed crowdtrain.json (peer/pull.py). Still, a listing with a name
that is not one allowed checkpoint file name, or a step that is not a plain integer, is refused
here with a PullError, so nothing downstream ever sees it.
"""

from __future__ import annotations

import json
import urllib.error
from dataclasses import dataclass

from crowdtrain.peer import names
from crowdtrain.peer.checkpoint import CheckpointError, CheckpointMeta, FileEntry
from crowdtrain.peer.client import CoordinatorClient
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.download import PlaintextRefused, open_url
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.tls import ClientTls, plaintext_refusal

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
