"""Whose checkpoints to believe: the run's signing key, pinned or trusted on first use. No torch.

    store = TrustStore.default()        # $CROWDTRAIN_CONFIG_DIR or the user's config directory
    policy = TrustPolicy(store, pinned_key="")   # or --public-key HEX
    known = policy.check(address, meta.run_id, meta.public_key)   # raises UntrustedKey
    store.remember(address, meta.run_id, meta.public_key, meta.step)   # after verification

A checkpoint is signed (Ed25519) by the coordinator's run key; the signature only means something
if the key is the run's. `crowdtrain pull --public-key HEX` pins it. Without it, the first key seen
at a coordinator address is remembered (trusted_keys.json, mode 0600) and a different key there
later is refused with how to accept it deliberately (`--public-key NEWHEX` or `--trust-new-key`).
Each remembered run also keeps the newest step verified from it: a "latest" older than that is a
replay and refused (`newest_step_decision`). A training peer follows the run Join names, so a new
run at a known address is trusted on first use (`new_run_ok`); a new key for a known run is not.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

CONFIG_DIR_ENV = "CROWDTRAIN_CONFIG_DIR"
STORE_NAME = "trusted_keys.json"
MAX_STORE_BYTES = 4 << 20


class UntrustedKey(CrowdtrainError):
    """The coordinator's checkpoints are signed by a key this machine does not trust."""


@dataclass(frozen=True)
class TrustedRun:
    public_key: str  # hex Ed25519 key that signs the run's checkpoints
    newest_step: int  # newest checkpoint step verified from this run (-1: none yet)


def decide_key(
    known: dict[str, TrustedRun],
    run_id: str,
    served_key: str,
    *,
    pinned_key: str = "",
    accept_new: bool = False,
    new_run_ok: bool = False,
) -> tuple[str, str]:
    """Pure: ("trust" | "first_use" | "refuse", reason) for `served_key` signing `run_id` at an
    address where `known` runs were trusted before."""
    if pinned_key:
        if served_key.lower() != pinned_key.lower():
            return (
                "refuse",
                f"it is signed by key {served_key[:16]}..., not the pinned --public-key {pinned_key[:16]}...",
            )
        return "trust", "the key matches --public-key"
    if accept_new:
        return "first_use", "--trust-new-key accepts the key the coordinator serves"
    run = known.get(run_id)
    if run is not None:
        if run.public_key == served_key:
            return "trust", f"the key trusted for run {run_id} since first use"
        return "refuse", (
            f"run {run_id} is now signed by key {served_key[:16]}..., but this machine trusted key "
            f"{run.public_key[:16]}... for it on first use"
        )
    if not known or new_run_ok:
        return "first_use", f"first contact with run {run_id} at this address"
    others = ", ".join(f"{r} (key {t.public_key[:16]}...)" for r, t in sorted(known.items()))
    return "refuse", (
        f"it serves run {run_id} signed by key {served_key[:16]}..., but this machine trusted {others} "
        "at this address"
    )


def newest_step_decision(known: TrustedRun | None, step: int, explicit_step: bool) -> tuple[bool, str]:
    """Pure: (ok, reason) for taking `step` as the run's checkpoint. A "latest" older than the newest
    step already verified from the run is a replay; an explicitly requested step is fine."""
    if explicit_step or known is None or step >= known.newest_step:
        return True, ""
    return False, (
        f"the coordinator offers step {step} as the latest, but step {known.newest_step} of this run "
        "was already verified here: an old checkpoint replayed as new"
    )


def refusal_message(address: str, reason: str, served_key: str, store_path: Path) -> str:
    return (
        f"refusing checkpoints from {address}: {reason}. Someone may be impersonating the coordinator. "
        f"If the run's operator really changed its key, check the new key with them and accept it "
        f"deliberately: --public-key {served_key} (or --trust-new-key); trusted keys are kept in {store_path}"
    )


def default_config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("crowdtrain"))


def normalise_address(address: str) -> str:
    return address.strip().rstrip("/").lower()


class TrustStore:
    """trusted_keys.json: {address: {run_id: {"public_key": hex, "newest_step": n}}}."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def default(cls) -> TrustStore:
        return cls(default_config_dir() / STORE_NAME)

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = json.loads(f.read(MAX_STORE_BYTES))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise UntrustedKey(
                f"cannot read the trusted keys in {self.path}: {e}; fix or delete that file "
                "(deleting it forgets every key trusted on first use)"
            ) from e
        return raw if isinstance(raw, dict) else {}

    def runs_at(self, address: str) -> dict[str, TrustedRun]:
        entry = self._load().get(normalise_address(address), {})
        runs = {}
        for run_id, v in entry.items() if isinstance(entry, dict) else ():
            if (
                isinstance(v, dict)
                and isinstance(v.get("public_key"), str)
                and isinstance(v.get("newest_step"), int)
            ):
                runs[run_id] = TrustedRun(v["public_key"], v["newest_step"])
        return runs

    def remember(self, address: str, run_id: str, public_key: str, step: int) -> None:
        """Record (atomically) that `public_key` signs `run_id` at `address`, and the newest step."""
        data = self._load()
        entry = data.setdefault(normalise_address(address), {})
        old = entry.get(run_id) if isinstance(entry.get(run_id), dict) else {}
        newest = step if old.get("public_key") != public_key else max(step, int(old.get("newest_step", -1)))
        entry[run_id] = {"public_key": public_key, "newest_step": newest}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class TrustPolicy:
    """How one download decides whom to believe (see the module docstring)."""

    store: TrustStore
    pinned_key: str = ""  # --public-key: only this key
    accept_new: bool = False  # --trust-new-key: accept the key the coordinator serves now
    new_run_ok: bool = False  # a run not seen at this address before is trusted on first use

    def check(self, address: str, run_id: str, served_key: str) -> TrustedRun | None:
        """Apply `decide_key`; raise UntrustedKey on "refuse". Returns what was known of the run
        under this key (None on first use). Nothing is written: `store.remember` once verified."""
        known = self.store.runs_at(address)
        decision, reason = decide_key(
            known,
            run_id,
            served_key,
            pinned_key=self.pinned_key,
            accept_new=self.accept_new,
            new_run_ok=self.new_run_ok,
        )
        if decision == "refuse":
            raise UntrustedKey(refusal_message(address, reason, served_key, self.store.path))
        if decision == "first_use":
            logger.warning(
                "trusting key %s... for run %s at %s on first use (%s); pin it with --public-key %s",
                served_key[:16],
                run_id,
                address,
                reason,
                served_key,
            )
        run = known.get(run_id)
        return run if run is not None and run.public_key == served_key else None


def trust_joined_run(address: str, run_id: str, public_key: str, store: TrustStore | None = None) -> str:
    """A training peer's check at Join: the run's signing key (named in the manifest) must be the one
    trusted for this run at this address before; a run seen for the first time is trusted on first
    use (the peer follows the run Join names). Returns the key to pin for the run's checkpoints."""
    if not public_key:
        return ""
    store = store or TrustStore.default()
    known = TrustPolicy(store, new_run_ok=True).check(address, run_id, public_key)
    if known is None:
        store.remember(address, run_id, public_key, -1)
    return public_key
