"""Is the run a coordinator hands us at Join the run its key signed?

The manifest names the run's data shards with their sha256, the model and the tokenizer's
sha256: proof of the data only if the manifest itself is proven. The coordinator signs it with the
run's Ed25519 key (the key that signs every checkpoint, `manifest.signing_public_key`); the peer
checks the signature, then trusts that key for the run at this coordinator address on first use
and refuses a changed one later (peer/checkpoints/trust.py). So a coordinator without the run's key (an
impostor at a known address, or a tampering middlebox) cannot hand out other shards, hashes or a
different tokenizer. Pure apart from the trust store: no torch.
"""

from __future__ import annotations

import hashlib

from crowdtrain.peer.checks import verify_hex
from crowdtrain.peer.run.manifest import ManifestError, RunManifest

SIGNING_CONTEXT = b"crowdtrain run manifest v1\n"  # a manifest signature is never a checkpoint's


def signing_payload(manifest_json: str) -> bytes:
    """The bytes the run's key signs: a fixed context, then the manifest's JSON text."""
    return SIGNING_CONTEXT + manifest_json.encode()


def check_joined_run(
    manifest_json: str, manifest_sha256: str, signature_hex: str, tokenizer_json: str
) -> RunManifest:
    """The manifest of a JoinResponse, once its digest, its signature by the key it names and its
    tokenizer's digest check; ManifestError saying which check failed otherwise."""
    manifest = RunManifest.from_json(manifest_json)
    if manifest.sha256() != manifest_sha256:
        raise ManifestError("the run manifest arrived corrupted (sha256 mismatch); restart the peer")
    if not manifest.signing_public_key:
        raise ManifestError(
            f"run {manifest.run_id}'s manifest names no signing key, so nothing it says can be checked; "
            "the coordinator runs an older crowdtrain: ask its operator to upgrade"
        )
    if not verify_hex(manifest.signing_public_key, signing_payload(manifest_json), signature_hex):
        raise ManifestError(
            f"run {manifest.run_id}'s manifest is not signed by the run's key "
            f"{manifest.signing_public_key[:16]}...: this coordinator cannot prove it serves the run "
            "(an impostor, or a proxy that altered it); check the address or use --tls-ca"
        )
    if hashlib.sha256(tokenizer_json.encode()).hexdigest() != manifest.tokenizer.sha256:
        raise ManifestError("the run's tokenizer does not match the sha256 its signed manifest names")
    return manifest
