"""Names, numbers, digests and signatures that arrive over the network. No torch.

Names and numbers end up as paths or sizes.

A coordinator (or someone pretending to be one) chooses every file name in a checkpoint listing,
`crowdtrain.json` and the run manifest, and every number in an HTTP header. Before any of them
touches the file system they pass these checks:

    check_component("model.safetensors", CHECKPOINT_FILE)  -> (True, "")
    check_component("../../x", SHARD_FILE)                 -> (False, "... not one plain file name ...")
    parse_ascii_int("²", "step")                           -> raises NetworkValueError

A name is ONE plain path component that matches an allow-list pattern (ASCII letters, digits,
`_`, `.`, `-`; never `.`/`..`, never hidden); a number is ASCII digits only, at most 19 of them,
so a superscript digit or a 4,300-digit header is a clear error rather than an exception from int().
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Files a published checkpoint may hold: what `save_pretrained` (model and tokenizer), the model
# card and archive.finalize write. Anything else in a listing or crowdtrain.json is refused.
CHECKPOINT_FILE = re.compile(
    r"(crowdtrain\.json|config\.json|generation_config\.json|model\.safetensors"
    r"|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors|tokenizer\.json"
    r"|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
    r"|README\.md)"
)
SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # train-00000.jsonl, eval.jsonl
RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # ct_tiny_1a2b3c4d
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_DIGITS = 19  # every value below 10**19 fits an int64 step, offset or size


class NetworkValueError(CrowdtrainError, ValueError):
    """A name or number from the coordinator is malformed; the message says which and why."""


def check_component(name: object, pattern: re.Pattern) -> tuple[bool, str]:
    """Pure: (ok, reason) for `name` as one file-system path component matching `pattern`."""
    if not isinstance(name, str):
        return False, f"{name!r} is not a string"
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        return False, f"{name[:80]!r} is not one plain file name"
    if not pattern.fullmatch(name):
        return False, f"{name[:80]!r} is not an accepted name (allowed: {pattern.pattern[:120]})"
    return True, ""


def safe_component(name: object, pattern: re.Pattern, what: str) -> str:
    """`name` if it passes `check_component`, else NetworkValueError naming `what` it was."""
    ok, reason = check_component(name, pattern)
    if not ok:
        raise NetworkValueError(f"refusing {what}: {reason}")
    return name  # type: ignore[return-value]


def check_run_id(run_id: object) -> str:
    """The run id (it names the peer's cache directory), or NetworkValueError."""
    return safe_component(run_id, RUN_ID, "the run id")


def check_int(value: object, what: str, minimum: int = 0, maximum: int = 10**MAX_DIGITS - 1) -> int:
    """A JSON number that must be an integer in [minimum, maximum] (bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise NetworkValueError(
            f"{what} must be an integer from {minimum} to {maximum}, got {str(value)[:40]!r}"
        )
    return value


def parse_ascii_int(text: str, what: str) -> int:
    """An HTTP header's number: ASCII digits only, at most MAX_DIGITS of them."""
    if not (0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()):
        raise NetworkValueError(f"{what} {text[:40]!r} is not a number of at most {MAX_DIGITS} ASCII digits")
    return int(text)


def check_sha256(value: object, what: str) -> str:
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise NetworkValueError(f"{what} is not a sha256 (64 lowercase hex digits): {str(value)[:80]!r}")
    return value


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in `chunk_bytes` pieces (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def verify_hex(public_hex: str, payload: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is `public_hex`'s signature of `payload`; False on any mismatch."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature_hex), payload
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def version_verdict(peer_version: str, minimum: str) -> tuple[bool, str]:
    """Pure: may a peer that says it runs `peer_version` join a run whose minimum is `minimum`? The
    coordinator's join refusal and `crowdtrain doctor` (which reads the minimum from the coordinator)
    both ask this. A courtesy to honest peers that are out of date (they are told the command that
    fixes it), not a defence: any client can claim any version, so one that is not a version number
    (a modified or unknown client), or a minimum that is not one, is let through like before."""
    from packaging.version import InvalidVersion, Version

    if not minimum:
        return True, "no minimum version"
    try:
        have, floor = Version(peer_version), Version(minimum)
    except InvalidVersion:
        return True, f"version {peer_version!r} or minimum {minimum!r:.40} unreadable: not checked"
    if have < floor:
        return False, (
            f"this run needs crowdtrain >= {minimum} and this peer runs {have}; upgrade crowdtrain to "
            f">= {minimum} the way you installed it: `pipx upgrade crowdtrain` (or `pipx install --force` "
            "with the new wheel or git URL the run's operator gives), `pip install -U` with that "
            "wheel or 'crowdtrain @ git+URL' in your venv, or `git pull && pip install -e .` in a checkout"
        )
    return True, f"{have} >= {minimum}"
