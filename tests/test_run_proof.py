"""A coordinator must prove the run it hands out at Join: the manifest (shards with their sha256,
model, tokenizer digest) is signed by the run's key, which the peer trusts per coordinator address
on first use (shard hashes that came in an unproven manifest proved nothing)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from crowdtrain.coordinator.signing import new_key, public_key_hex, sign_hex
from crowdtrain.peer.checkpoints.trust import TrustStore, UntrustedKey, trust_joined_run
from crowdtrain.peer.run.manifest import (
    DataSpec,
    ManifestError,
    ShardSpec,
    TokenizerSpec,
    build_manifest,
    get_preset,
)
from crowdtrain.peer.run.runproof import check_joined_run, signing_payload

TOKENIZER_JSON = '{"model": "a tokenizer"}'


def _manifest(public_key: str, shard_sha: str = "a" * 64):
    preset = get_preset("tiny")
    shard = ShardSpec(name="train-00000.jsonl", sha256=shard_sha, size_bytes=10, num_documents=1)
    return build_manifest(
        preset,
        run_id="ct_tiny_proof",
        created_unix_s=0.0,
        tokenizer=TokenizerSpec(
            kind="byte-level-bpe",
            vocab_size=preset.vocab_size,
            sha256=hashlib.sha256(TOKENIZER_JSON.encode()).hexdigest(),
        ),
        data=DataSpec(
            source="test",
            seq_len=128,
            eval_fraction=0.1,
            eval=dataclasses.replace(shard, name="eval.jsonl"),
            shards=(shard,),
            eval_max_sequences=8,
        ),
        signing_public_key=public_key,
    )


def _joined(manifest, key) -> tuple[str, str, str, str]:
    """What a JoinResponse carries: manifest JSON, its sha256, its signature by `key`, the tokenizer."""
    text = manifest.to_json()
    return text, manifest.sha256(), sign_hex(key, signing_payload(text)), TOKENIZER_JSON


def test_a_manifest_signed_by_the_key_it_names_is_accepted():
    key = new_key()
    manifest = _manifest(public_key_hex(key))
    assert check_joined_run(*_joined(manifest, key)) == manifest


def test_shard_hashes_changed_in_transit_are_refused():
    """An impostor (or a proxy) swaps the shards' sha256 for its own data but cannot re-sign."""
    key = new_key()
    honest = _manifest(public_key_hex(key))
    _, _, signature, tokenizer = _joined(honest, key)
    forged = _manifest(public_key_hex(key), shard_sha="b" * 64)
    with pytest.raises(ManifestError, match="not signed by the run's key"):
        check_joined_run(forged.to_json(), forged.sha256(), signature, tokenizer)


def test_a_manifest_re_signed_with_another_key_is_refused():
    key, attacker = new_key(), new_key()
    manifest = _manifest(public_key_hex(key))
    text, digest, _, tokenizer = _joined(manifest, key)
    with pytest.raises(ManifestError, match="not signed"):
        check_joined_run(text, digest, sign_hex(attacker, signing_payload(text)), tokenizer)
    with pytest.raises(ManifestError, match="not signed"):
        check_joined_run(text, digest, "", tokenizer)  # an old or stripped response: no signature


def test_an_impostor_naming_its_own_key_is_refused_by_trust_on_first_use(tmp_path: Path):
    """Self-consistent but under another key: the signature checks, the trust store refuses."""
    store = TrustStore(tmp_path / "trusted_keys.json")
    key, attacker = new_key(), new_key()
    honest = check_joined_run(*_joined(_manifest(public_key_hex(key)), key))
    assert trust_joined_run("203.0.113.7:50051", honest.run_id, honest.signing_public_key, store)
    impostor = check_joined_run(*_joined(_manifest(public_key_hex(attacker), "c" * 64), attacker))
    with pytest.raises(UntrustedKey):
        trust_joined_run("203.0.113.7:50051", impostor.run_id, impostor.signing_public_key, store)


def test_a_tokenizer_that_is_not_the_signed_one_is_refused():
    key = new_key()
    text, digest, signature, _ = _joined(_manifest(public_key_hex(key)), key)
    with pytest.raises(ManifestError, match="tokenizer"):
        check_joined_run(text, digest, signature, '{"model": "another tokenizer"}')


def test_a_manifest_naming_no_key_is_refused():
    key = new_key()
    manifest = _manifest("")
    text, digest, signature, tokenizer = _joined(manifest, key)
    with pytest.raises(ManifestError, match="names no signing key"):
        check_joined_run(text, digest, signature, tokenizer)


def test_a_coordinator_whose_signing_key_is_not_the_runs_refuses_to_start(tmp_path: Path):
    """A lost signing.key replaced by a new one would make every peer refuse the coordinator:
    the operator is told at start, with what to do."""
    from crowdtrain.coordinator.peers.store import Store
    from crowdtrain.coordinator.run.runs import RunDirError, RunSettings, open_run
    from crowdtrain.coordinator.signing import save_key

    data_dir = tmp_path / "run"
    data_dir.mkdir()
    key, other = new_key(), new_key()
    store = Store(data_dir / "state.sqlite3", flush_interval_s=0)
    store.set_meta(
        {"manifest_json": _manifest(public_key_hex(key)).to_json(), "tokenizer_json": TOKENIZER_JSON}
    )
    store.close()
    save_key(data_dir / "signing.key", other)
    with pytest.raises(RunDirError, match="restore the run's original signing.key"):
        open_run(RunSettings(), data_dir)
    save_key(data_dir / "signing.key", key)
    store, run = open_run(RunSettings(), data_dir)
    store.close()
    assert run.manifest.signing_public_key == public_key_hex(key)
