"""Whose checkpoints and runs to believe: the run's signing key, pinned or trusted on first use. No torch.

    store = TrustStore.default()        # $CROWDTRAIN_CONFIG_DIR or the user's config directory
    policy = TrustPolicy(store, pinned_key="")   # or --public-key HEX
    known, how = policy.check(address, meta.run_id, meta.public_key)   # raises UntrustedKey
    store.remember(address, meta.run_id, meta.public_key, meta.step, how)   # after verification

A checkpoint (and a run's manifest) is signed (Ed25519) by the coordinator's run key; the signature
only means something if the key is the run's. `crowdtrain pull --public-key HEX` pins it. Without
it, the first run and key seen at a coordinator address are remembered, and later:
- a different key for a known run is refused (`--public-key NEWHEX` or `--trust-new-key` accept it);
- another run at a known address is refused too: an impostor can always sign the real manifest
  under a run id of its own, so a new run is as suspect as a new key (`--trust-new-run`, for pull
  and for the peer, accepts it; so does pinning its key with pull's `--public-key`).
Each entry records HOW its key came to be trusted (`HOW_*`). A training peer's entries ("joined",
made at Join without the volunteer naming a key) never satisfy a plain pull on their own: pull
still refuses a run or key they contradict, but trusts only what it was told (pin, flag) or saw
first itself. Each run also keeps the newest step verified from it: a "latest" older than that is a
replay and refused (`newest_step_decision`).

Storage: one JSON file per address under `trusted_keys.d/` (directory 0700, files 0600), at
most `MAX_RUNS_PER_ADDRESS` runs each (the least recently used run that was not pinned goes
first). A broken or oversized file fails the lookups of its own address only, with what to do. The
single `trusted_keys.json` of older versions is still read for addresses without a file of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.settings.layered import default_config_dir

logger = logging.getLogger(__name__)

STORE_NAME = "trusted_keys.json"
MAX_RUNS_PER_ADDRESS = 64  # ~200 bytes each: one address's file stays under ~16 KiB
MAX_FILE_BYTES = 1 << 20  # one address's file (pinned runs are never evicted, so allow many)
MAX_LEGACY_BYTES = 64 << 20  # the old single file: read whole, so a grown one still reads

HOW_JOINED = "joined"  # a training peer's Join trusted it (first use, or --trust-new-run)
HOW_FIRST_USE = "first_use"  # pull's first contact with the address
HOW_ACCEPTED = "accepted"  # pull --trust-new-key / --trust-new-run: the volunteer accepted it
HOW_PINNED = "pinned"  # pull --public-key: the volunteer named the key
_RANK = {HOW_JOINED: 0, HOW_FIRST_USE: 1, HOW_ACCEPTED: 2, HOW_PINNED: 3}
_HOW_WORDS = {
    HOW_JOINED: "by a training peer at Join",
    HOW_FIRST_USE: "on first use",
    HOW_ACCEPTED: "as accepted deliberately",
    HOW_PINNED: "as pinned with --public-key",
}


class UntrustedKey(CrowdtrainError):
    """The coordinator's checkpoints are signed by a key this machine does not trust."""


@dataclass(frozen=True)
class TrustedRun:
    public_key: str  # hex Ed25519 key that signs the run's checkpoints
    newest_step: int  # newest checkpoint step verified from this run (-1: none yet)
    how: str = HOW_JOINED  # how the key came to be trusted (HOW_*); older records: the least trust
    seen_unix_s: float = 0.0  # when it was last trusted or verified (the least recent goes first)


def decide_key(
    known: dict[str, TrustedRun],
    run_id: str,
    served_key: str,
    *,
    pinned_key: str = "",
    accept_new: bool = False,
    trust_new_run: bool = False,
    for_pull: bool = True,
) -> tuple[str, str]:
    """Pure: ("trust" | "first_use" | "accept" | "refuse", reason) for `served_key` signing `run_id`
    at an address where `known` runs were trusted before. "accept": a flag accepted it. With
    `for_pull`, entries a training peer made ("joined") can refuse but never trust on their own."""
    if pinned_key:
        if served_key.lower() != pinned_key.lower():
            return (
                "refuse",
                f"it is signed by key {served_key[:16]}..., not the pinned --public-key {pinned_key[:16]}...",
            )
        return "trust", "the key matches --public-key"
    if accept_new:
        return "accept", "--trust-new-key accepts the key the coordinator serves"
    run = known.get(run_id)
    if run is not None and run.public_key != served_key:
        return "refuse", (
            f"run {run_id} is now signed by key {served_key[:16]}..., but this machine trusted key "
            f"{run.public_key[:16]}... for it ({_HOW_WORDS[run.how]})"
        )
    own = {r: t for r, t in known.items() if not (for_pull and t.how == HOW_JOINED)}
    if run_id in own:
        return "trust", f"the key trusted for run {run_id} ({_HOW_WORDS[own[run_id].how]})"
    others = {r: t for r, t in known.items() if r != run_id}
    if not others:  # nothing trusted here, or only a training peer's entry for this run and key
        return "first_use", f"first contact with run {run_id} at this address"
    if trust_new_run:
        return "accept", f"--trust-new-run accepts run {run_id}, new at this address"
    listed = ", ".join(f"run {r} (key {t.public_key[:16]}...)" for r, t in sorted(others.items()))
    return "refuse", (
        f"it serves run {run_id} signed by key {served_key[:16]}..., but this machine trusted {listed} "
        "at this address (an impostor re-signing the real run under a run id of its own looks just so)"
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


def runs_to_keep(runs: dict[str, TrustedRun], keep: str, cap: int) -> dict[str, TrustedRun]:
    """Pure: `runs` cut to `cap` entries. Pinned runs and `keep` (the run just trusted) always stay;
    of the others, the most recently seen ones fill what is left."""
    fixed = {r for r, t in runs.items() if t.how == HOW_PINNED or r == keep}
    rest = sorted((r for r in runs if r not in fixed), key=lambda r: (runs[r].seen_unix_s, r), reverse=True)
    kept = fixed | set(rest[: max(0, cap - len(fixed))])
    return {r: t for r, t in runs.items() if r in kept}


def refusal_message(address: str, reason: str, hint: str, store_file: Path) -> str:
    return (
        f"refusing checkpoints and runs from {address}: {reason}. Someone may be impersonating the "
        f"coordinator. {hint}; what this machine trusts at {address} is kept in {store_file}"
    )


def refusal_hint(kind: str, run_id: str, served_key: str, *, for_pull: bool, store_file: Path) -> str:
    """Pure: what the volunteer may do about a refusal of `kind` ("pinned": not the --public-key;
    "key": a known run's key changed; "run": another run), in the flags of the command refused."""
    if kind == "pinned":
        return "Check the run's key with its operator and pass the key they give with --public-key"
    if for_pull and kind == "key":
        return (
            "If the run's operator really changed its key, check the new key with them and accept it "
            f"deliberately: --public-key {served_key} (or --trust-new-key)"
        )
    if for_pull:
        return (
            f"If its operator really started run {run_id} there, check its key with them and accept it "
            f"deliberately: --public-key {served_key} (or --trust-new-run)"
        )
    if kind == "key":
        return (
            "A coordinator cannot sign its run with another key (it refuses to start), so check the "
            "address and use --tls-ca; only if the operator confirms the new key "
            f"{served_key}, delete {store_file} (it forgets every run trusted at this address)"
        )
    return (
        f"If its operator really started run {run_id} there, check its key {served_key} with them, "
        "then start the peer once with --trust-new-run (or CROWDTRAIN_TRUST_NEW_RUN=1)"
    )


def normalise_address(address: str) -> str:
    return address.strip().rstrip("/").lower()


def _run_of(value: object) -> TrustedRun | None:
    """One stored run entry, or None when it is malformed."""
    if not isinstance(value, dict):
        return None
    key, step = value.get("public_key"), value.get("newest_step")
    how, seen = value.get("how", HOW_JOINED), value.get("seen_unix_s", 0.0)
    if not (isinstance(key, str) and type(step) is int and how in _RANK and type(seen) in (int, float)):
        return None
    return TrustedRun(key, step, how, float(seen))


def _read_json(path: Path, max_bytes: int):
    """The parsed file (FileNotFoundError when it is absent); ValueError when it is larger than
    `max_bytes` or not JSON."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"it is larger than {max_bytes} bytes")
    return json.loads(data)


class TrustStore:
    """What is trusted at each coordinator address: `<sha256 of the address>.json` in `directory`
    (`trusted_keys.d` beside `path`), holding {"address": a, "runs": {run_id: {"public_key",
    "newest_step", "how", "seen_unix_s"}}}. `path` (trusted_keys.json) is what older versions
    wrote: read, never written, for an address that has no file of its own yet."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.directory = self.path.with_suffix(".d")

    @classmethod
    def default(cls) -> TrustStore:
        return cls(default_config_dir() / STORE_NAME)

    def file_for(self, address: str) -> Path:
        digest = hashlib.sha256(normalise_address(address).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def runs_at(self, address: str) -> dict[str, TrustedRun]:
        """The runs trusted at `address`; UntrustedKey (naming the file to fix or delete) when its
        file cannot be read: an unreadable record must not look like a first contact."""
        address, file = normalise_address(address), self.file_for(address)
        try:
            data = _read_json(file, MAX_FILE_BYTES)
        except FileNotFoundError:
            return self._legacy_runs(address)
        except (OSError, ValueError) as e:
            raise self._unreadable(file, address, str(e)) from e
        entries = data.get("runs") if isinstance(data, dict) and data.get("address") == address else None
        if not isinstance(entries, dict):
            raise self._unreadable(file, address, f"it is not the record of {address}")
        return self._parsed(entries, file, address)

    def _legacy_runs(self, address: str) -> dict[str, TrustedRun]:
        try:
            data = _read_json(self.path, MAX_LEGACY_BYTES)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise self._unreadable(self.path, address, str(e), shared=True) from e
        entries = data.get(address, {}) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise self._unreadable(
                self.path, address, f"its entry for {address} is not a set of runs", shared=True
            )
        return self._parsed(entries, self.path, address, shared=True)

    def _parsed(self, entries: dict, file: Path, address: str, shared: bool = False) -> dict[str, TrustedRun]:
        runs = {run_id: _run_of(value) for run_id, value in entries.items()}
        bad = sorted(run_id for run_id, run in runs.items() if run is None)
        if bad:
            raise self._unreadable(file, address, f"the entry of run {bad[0][:64]!r} is malformed", shared)
        return runs

    def _unreadable(self, file: Path, address: str, why: str, shared: bool = False) -> UntrustedKey:
        forgets = (
            f"what older crowdtrain versions trusted at every address without a file in {self.directory}"
            if shared
            else f"the keys this machine trusted at {address}; other coordinators are not affected"
        )
        return UntrustedKey(
            f"cannot read the keys trusted at {address} in {file}: {why}; fix or delete that file "
            f"(deleting it forgets {forgets})"
        )

    def remember(
        self, address: str, run_id: str, public_key: str, step: int, how: str, now_unix_s: float | None = None
    ) -> None:
        """Record (atomically) that `public_key` signs `run_id` at `address`, `how` it was trusted
        (the strongest reason given so far is kept while the key stays the same) and the newest step;
        then cut the address's runs to MAX_RUNS_PER_ADDRESS (`runs_to_keep`)."""
        runs = self.runs_at(address)
        old = runs.get(run_id)
        if old is not None and old.public_key == public_key:
            step, how = max(step, old.newest_step), max(how, old.how, key=_RANK.__getitem__)
        seen = time.time() if now_unix_s is None else now_unix_s
        runs[run_id] = TrustedRun(public_key, step, how, seen)
        self._write(address, runs_to_keep(runs, run_id, MAX_RUNS_PER_ADDRESS))

    def _write(self, address: str, runs: dict[str, TrustedRun]) -> None:
        record = {
            "address": normalise_address(address),
            "runs": {
                r: {
                    "public_key": t.public_key,
                    "newest_step": t.newest_step,
                    "how": t.how,
                    "seen_unix_s": t.seen_unix_s,
                }
                for r, t in runs.items()
            },
        }
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2, sort_keys=True)
            os.replace(tmp, self.file_for(address))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class TrustPolicy:
    """How one download or Join decides whom to believe (see the module docstring)."""

    store: TrustStore
    pinned_key: str = ""  # --public-key: only this key
    accept_new: bool = False  # --trust-new-key: accept the key the coordinator serves now
    trust_new_run: bool = False  # --trust-new-run: accept a run not trusted at this address before
    joined: bool = False  # a training peer (Join, its checkpoint pulls): its trust is recorded as "joined"

    def check(self, address: str, run_id: str, served_key: str) -> tuple[TrustedRun | None, str]:
        """Apply `decide_key`; raise UntrustedKey on "refuse". Returns (what was known of the run
        under this key, None if nothing; how to record it once verified). Nothing is written here."""
        known = self._known(address)
        decision, reason = decide_key(
            known,
            run_id,
            served_key,
            pinned_key=self.pinned_key,
            accept_new=self.accept_new,
            trust_new_run=self.trust_new_run,
            for_pull=not self.joined,
        )
        if decision == "refuse":
            changed = run_id in known and known[run_id].public_key != served_key
            kind = "pinned" if self.pinned_key else "key" if changed else "run"
            file = self.store.file_for(address)
            hint = refusal_hint(kind, run_id, served_key, for_pull=not self.joined, store_file=file)
            raise UntrustedKey(refusal_message(address, reason, hint, file))
        if decision in ("first_use", "accept"):
            logger.warning(
                "trusting key %s... for run %s at %s (%s); pin it with --public-key %s",
                served_key[:16],
                run_id,
                address,
                reason,
                served_key,
            )
        run = known.get(run_id)
        return (run if run is not None and run.public_key == served_key else None), self._how(decision)

    def _known(self, address: str) -> dict[str, TrustedRun]:
        """The runs trusted at `address`; with a pinned key an unreadable record is no obstacle (the
        pin decides alone; only the replay check goes without it)."""
        try:
            return self.store.runs_at(address)
        except UntrustedKey as e:
            if not self.pinned_key:
                raise
            logger.warning("%s; going on with the pinned key alone", e)
            return {}

    def _how(self, decision: str) -> str:
        if self.joined:
            return HOW_JOINED
        if self.pinned_key:
            return HOW_PINNED
        return HOW_ACCEPTED if decision == "accept" else HOW_FIRST_USE


def trust_joined_run(
    address: str,
    run_id: str,
    public_key: str,
    store: TrustStore | None = None,
    *,
    trust_new_run: bool = False,
) -> str:
    """A training peer's check at Join: the run's signing key (named in the signed manifest) must be
    the key trusted for this run at this address, or this is a first contact with the address. A
    changed key is refused; so is another run, unless the volunteer passed `trust_new_run`.
    Recorded as "joined" (never pull's own trust). Returns the key to pin for the run's checkpoints."""
    if not public_key:
        return ""
    store = store or TrustStore.default()
    policy = TrustPolicy(store, trust_new_run=trust_new_run, joined=True)
    _, how = policy.check(address, run_id, public_key)
    store.remember(address, run_id, public_key, -1, how)
    return public_key
