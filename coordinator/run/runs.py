"""The run a coordinator serves: created in DATA_DIR on the first start, opened on every later one.

    DATA_DIR/state.sqlite3      run manifest, tokenizer, bound ports, every peer seen (WAL)
    DATA_DIR/signing.key        the run's Ed25519 key; its public half is in the manifest
    DATA_DIR/data/              the run's eval and training shards (served over HTTP)
    DATA_DIR/checkpoints/       published checkpoints, one directory per step

Creating a run builds the dataset from the corpus (`run.dataset`), a manifest from the preset
(`peer.run.manifest`) and a signing key, as its `RunSettings` say; nothing counts as a run until
state.sqlite3 holds its manifest, so an interrupted creation is simply redone. A data dir that
cannot hold a run (not writable, not a directory, a damaged state file) is a `RunDirError` saying
what to do. The public texts among its settings (`--data-name`, `--data-url`, `--data-license`) are
checked on every start before anything is written (`check_settings`); the data's url and license
are not in the signed manifest but kept in state.sqlite3 for the model cards, so a later start
may replace them.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.coordinator.publishing.card import NO_DATA_TERMS, DataTerms
from crowdtrain.coordinator.signing import load_or_create_key, new_key, public_key_hex, save_key
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.run.manifest import RunManifest, build_manifest, get_preset, override_swarm

logger = logging.getLogger(__name__)


class RunDirError(CrowdtrainError):
    """DATA_DIR cannot hold a run, or holds a damaged one; the message names the file and the fix."""


class RunSettingsError(CrowdtrainError):
    """A run setting the operator gave is malformed; the message names the flag and what to pass."""


MAX_DATA_NAME_CHARS = 200  # --data-name, once its whitespace is collapsed
MAX_DATA_URL_CHARS = 500
MAX_DATA_LICENSE_CHARS = 120  # an SPDX id, or a short name: the full terms belong behind --data-url
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})  # controls, format (bidi), private, unassigned
_NOT_IN_URLS = frozenset('<>"\\^`{|}')  # RFC 3986 allows these only percent-encoded


@dataclass(frozen=True)
class RunSettings:
    """What a new run is made of; read only when DATA_DIR holds no run yet (a run's manifest is fixed)."""

    preset: str = "tiny"  # a name in peer.run.manifest's PRESETS: model, data and swarm sizes
    data: tuple[str, ...] = ()  # files, directories, globs or hf:NAME to train on (): the stdlib's source
    data_field: str = "text"  # the record field holding a document's text in JSONL, Parquet and hf: data
    data_name: str = ""  # the data's public name in the manifest and model card ("": named from `data`)
    data_url: str = ""  # where the public can read about the data (http or https), for the model card
    data_license: str = ""  # the data's license, an SPDX id (CC-BY-4.0) or a short text, for the model card
    swarm: tuple[str, ...] = ()  # KEY=VALUE overrides of the preset's swarm settings


@dataclass(frozen=True)
class Run:
    manifest: RunManifest
    tokenizer_json: str
    signing_key: object  # Ed25519PrivateKey; signs the run's checkpoints
    data_terms: DataTerms = NO_DATA_TERMS  # the data's url and license, for the model cards


def check_settings(settings: RunSettings) -> RunSettings:
    """Pure: `settings` with its public texts (`data_name`, `data_url`, `data_license`) checked and
    their whitespace collapsed, else RunSettingsError naming the flag and what to pass instead."""
    return replace(
        settings,
        data_name=_public_text(
            settings.data_name, "--data-name", MAX_DATA_NAME_CHARS, "e.g. 'My notes 2024'"
        ),
        data_url=check_data_url(settings.data_url),
        data_license=_public_text(
            settings.data_license,
            "--data-license",
            MAX_DATA_LICENSE_CHARS,
            "an SPDX id such as CC-BY-4.0 or a short name, with the full terms behind --data-url",
        ),
    )


def _public_text(text: str, flag: str, max_chars: int, what: str) -> str:
    bad = next((c for c in text if not c.isspace() and unicodedata.category(c) in _INVISIBLE), None)
    if bad is not None:
        raise RunSettingsError(
            f"{flag} holds the control or invisible character {bad!r}; pass plain text: {what}"
        )
    text = " ".join(text.split())
    if len(text) > max_chars:
        raise RunSettingsError(f"{flag} is {len(text)} characters long, over {max_chars}; pass {what}")
    return text


def check_data_url(url: str) -> str:
    """Pure: `url` as model cards link it ("" for none): an http(s) address with a host, without
    spaces, control characters or credentials; else RunSettingsError saying what to pass."""
    url = url.strip()
    if not url:
        return ""
    example = "pass the public page about the data, e.g. --data-url https://example.org/my-corpus"
    bad = next(
        (c for c in url if c.isspace() or unicodedata.category(c)[0] == "C" or c in _NOT_IN_URLS), None
    )
    if bad is not None:
        raise RunSettingsError(
            f"--data-url holds {bad!r}, which an address cannot carry; percent-encode it (a space is %20)"
        )
    if len(url) > MAX_DATA_URL_CHARS:
        raise RunSettingsError(
            f"--data-url is {len(url)} characters long, over {MAX_DATA_URL_CHARS}; {example}"
        )
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a port that is not a number
    except ValueError as e:
        raise RunSettingsError(f"--data-url {url[:80]!r} is not a valid address ({e}); {example}") from e
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise RunSettingsError(f"--data-url {url[:80]!r} is not an http:// or https:// address; {example}")
    if parts.username is not None or parts.password is not None:
        raise RunSettingsError(
            "--data-url carries a user name or password (the part before @), which every model card "
            "would publish; pass the address without it"
        )
    return url


def create_run(settings: RunSettings, data_dir: Path, signing_public_key: str) -> tuple[RunManifest, str]:
    """Build a new run from the preset and corpus: shards, tokenizer, manifest. Pure of the store."""
    from crowdtrain.coordinator.run.dataset import build_dataset, default_corpus, public_data_label

    preset = get_preset(settings.preset)
    sources = list(settings.data) or default_corpus()  # files, directories, globs, hf:NAME (see dataset.py)
    # public (the manifest is served and signed): the operator's name for it, else one without local paths
    label = " ".join(settings.data_name.split()) or public_data_label(settings.data)
    t0 = time.monotonic()
    data, tokenizer, tokenizer_json = build_dataset(
        sources,
        data_dir / "data",
        source_label=label,
        num_shards=preset.num_shards,
        eval_fraction=preset.eval_fraction,
        max_bytes=preset.max_corpus_bytes,
        seq_len=preset.seq_len,
        eval_max_sequences=preset.eval_max_sequences,
        vocab_size=preset.vocab_size,
        field=settings.data_field,  # the label then names it, and the corrupted records skipped
    )
    manifest = build_manifest(
        preset,
        run_id=f"ct_{preset.name}_{secrets.token_hex(4)}",
        created_unix_s=time.time(),
        tokenizer=tokenizer,
        data=data,
        signing_public_key=signing_public_key,
        swarm=override_swarm(preset.swarm, settings.swarm),
    )
    logger.info("created run %s (preset %s) in %.1fs", manifest.run_id, preset.name, time.monotonic() - t0)
    return manifest, tokenizer_json


def open_run(settings: RunSettings, data_dir: Path) -> tuple[Store, Run]:
    """The run in `data_dir` and its open store (the caller closes it), creating both from `settings`
    if absent.

    Malformed settings are refused first (`check_settings`), before anything is written. Also
    removes checkpoint writes a crash left unfinished. On any error the store is closed.
    """
    settings = check_settings(settings)
    state_path = data_dir / "state.sqlite3"
    run = None
    if not state_path.exists():
        store, run = _new_run(settings, data_dir, state_path)
    else:
        store = _open_store(state_path, data_dir)
    try:
        run = run or _existing_run(settings, data_dir, store)
        run = replace(run, data_terms=_data_terms(store, settings))
    except BaseException:
        store.close()
        raise
    removed = archive.clean_staging(data_dir / "checkpoints")
    if removed:
        logger.warning("removed %d unfinished checkpoint write(s) left by a previous crash", removed)
    return store, run


def _new_run(settings: RunSettings, data_dir: Path, state_path: Path) -> tuple[Store, Run]:
    # fail on a typo before writing anything
    override_swarm(get_preset(settings.preset).swarm, settings.swarm)
    _check_writable(data_dir)  # and on a data dir that cannot be, before a minute of building
    key = new_key()
    try:
        manifest, tokenizer_json = create_run(settings, data_dir, public_key_hex(key))
        save_key(data_dir / "signing.key", key)  # only once the run exists: nothing half-written
    except OSError as e:
        raise RunDirError(
            f"cannot write the run to {data_dir} ({e.strerror or e}: {e.filename}); "
            "free some space or pass a --data-dir you can write to"
        ) from e
    store = _open_store(state_path, data_dir)
    try:
        store.set_meta({"manifest_json": manifest.to_json(), "tokenizer_json": tokenizer_json})
    except BaseException:
        store.close()
        raise
    return store, Run(manifest, tokenizer_json, key)


def _existing_run(settings: RunSettings, data_dir: Path, store: Store) -> Run:
    manifest_json, tokenizer_json = store.get_meta("manifest_json"), store.get_meta("tokenizer_json")
    if manifest_json is None or tokenizer_json is None:
        raise RunDirError(
            f"{store.path} holds no run (a previous start was interrupted); remove {data_dir} and start again"
        )
    try:
        manifest = RunManifest.from_json(manifest_json)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # ManifestError, or JSON of another shape
        raise RunDirError(
            f"the run manifest in {store.path} cannot be read ({e}); if this crowdtrain is up to date the "
            f"file is damaged: restore {data_dir} from a backup or start a new run with another --data-dir"
        ) from e
    if manifest.preset != settings.preset:
        logger.warning(
            "%s holds run %s with preset %r; ignoring --preset %r",
            data_dir,
            manifest.run_id,
            manifest.preset,
            settings.preset,
        )
    if settings.swarm and override_swarm(manifest.swarm, settings.swarm) != manifest.swarm:
        logger.warning(
            "%s holds run %s, whose swarm settings are fixed in its signed manifest; ignoring --swarm %s",
            data_dir,
            manifest.run_id,
            " ".join(settings.swarm),
        )
    if settings.data_name and not manifest.data.source.startswith(" ".join(settings.data_name.split())):
        logger.warning(
            "%s holds run %s, whose data name is fixed in its signed manifest (%r); ignoring --data-name",
            data_dir,
            manifest.run_id,
            manifest.data.source,
        )
    signing_key = load_or_create_key(data_dir / "signing.key")
    if manifest.signing_public_key and manifest.signing_public_key != public_key_hex(signing_key):
        raise RunDirError(
            f"{data_dir / 'signing.key'} is not the key run {manifest.run_id}'s manifest names "
            f"({manifest.signing_public_key[:16]}...): peers and downloaders would refuse this "
            "coordinator; restore the run's original signing.key from a backup"
        )
    logger.info("resuming run %s from %s", manifest.run_id, data_dir)
    return Run(manifest, tokenizer_json, signing_key)


def _data_terms(store: Store, settings: RunSettings) -> DataTerms:
    """The data's url and license for model cards: those given now (kept for later starts), else
    those a previous start kept."""
    given = {key: value for key in ("data_url", "data_license") if (value := getattr(settings, key))}
    for key, value in given.items():
        kept = store.get_meta(key)
        if kept is not None and kept != value:
            logger.info("model cards now give --%s %r (was %r)", key.replace("_", "-"), value, kept)
    if given:
        store.set_meta(given)
    return DataTerms(url=store.get_meta("data_url") or "", license=store.get_meta("data_license") or "")


def _open_store(state_path: Path, data_dir: Path) -> Store:
    try:
        return Store(state_path)
    except sqlite3.DatabaseError as e:  # not a database, a damaged one, or one we may not write
        raise RunDirError(
            f"cannot open the run's state {state_path} ({e}); if it is damaged, restore {data_dir} from "
            "a backup or start a new run with another --data-dir"
        ) from e


def _check_writable(data_dir: Path) -> None:
    """Raise RunDirError when `data_dir` could not be created or written, without creating it."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{existing} is not a directory; pass a --data-dir that is, or can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write to {existing}; pass a --data-dir you can write to")
