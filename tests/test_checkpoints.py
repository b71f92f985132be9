"""Checkpoint finalisation, HTTP serving with Range, and `pull` verification, in process."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.errors import NotFoundError
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.coordinator.signing import new_key, public_key_hex, sign_hex
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.peer.checkpoints.format import CheckpointError, CheckpointMeta
from crowdtrain.peer.checkpoints.pull import PullError, pull, staging_dir

from tests.helpers import make_run

KEY = new_key()  # the coordinator's signing key in these tests


def _meta(step: int, previous: int | None = None) -> CheckpointMeta:
    return CheckpointMeta(
        run_id="ct_test",
        step=step,
        samples_seen=step * 256,
        eval_loss=5.0,
        created_unix_s=1.0,
        manifest_sha256="m",
        previous_step=previous,
        files=(),
    )


def _publish_real_model(root: Path, tmp_path: Path, small_corpus: Path, step: int) -> CheckpointMeta:
    from crowdtrain.peer.run.model import build_model, save_hf

    manifest, tokenizer_json = make_run(tmp_path, small_corpus)
    staging = archive.new_staging_dir(root, step)
    save_hf(build_model(manifest), tokenizer_json, manifest, staging)
    return archive.finalize(staging, root, _meta(step), signing_key=KEY)


def test_finalize_lists_and_verifies_and_detects_tampering(tmp_path: Path):
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 3)
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    (staging / "README.md").write_text("hello")
    (staging / "notes.txt").write_text("not a checkpoint file kind: never published")
    meta = archive.finalize(staging, root, _meta(3), signing_key=KEY)
    assert [f.name for f in meta.files] == ["README.md", "model.safetensors"]
    assert not (root / "step-00000003" / "notes.txt").exists()
    assert checkpoint.list_checkpoints(root) == [meta]
    assert checkpoint.verify_dir(root / "step-00000003") == meta
    path = root / "step-00000003" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[500] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.verify_dir(root / "step-00000003")
    path.write_bytes(bytes(data[:10]))
    with pytest.raises(CheckpointError, match="bytes"):
        checkpoint.verify_dir(root / "step-00000003")


def test_unfinished_writes_are_never_listed_and_are_cleaned(tmp_path: Path):
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 9)
    (staging / "model.safetensors").write_bytes(b"half")
    assert checkpoint.list_checkpoints(root) == []
    assert archive.clean_staging(root) == 1
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("step", "name", "found", "error"),
    [
        (None, "model.safetensors", 4, None),  # None: the latest
        (2, "model.safetensors", 2, None),
        (4, "crowdtrain.json", 4, None),  # the signed listing itself is served
        (3, "model.safetensors", None, r"no checkpoint at step 3 \(have 2, 4\)"),
        (4, "extra.bin", None, "checkpoint 4 has no file 'extra.bin'"),  # on disk, but not listed
        (4, "../../s.sqlite3", None, "has no file"),
        (4, "/etc/passwd", None, "has no file"),
        (4, "", None, "has no file"),
    ],
)
def test_lookup_serves_only_the_files_a_checkpoint_lists(tmp_path: Path, step, name, found, error):
    root = tmp_path / "ckpt"
    with pytest.raises(NotFoundError, match="no checkpoint has been published yet"):
        archive.lookup_file(root, None, "model.safetensors")
    for published in (2, 4):
        staging = archive.new_staging_dir(root, published)
        (staging / "model.safetensors").write_bytes(b"w" * published)
        archive.finalize(staging, root, _meta(published), signing_key=KEY)
    (root / "step-00000004" / "extra.bin").write_bytes(b"not listed")
    if error is not None:
        with pytest.raises(NotFoundError, match=error):
            archive.lookup_file(root, step, name)
        return
    meta, path = archive.lookup_file(root, step, name)
    assert meta.step == found and path == root / f"step-{found:08d}" / name and path.is_file()


@pytest.fixture
def coordinator_with_checkpoint(tmp_path: Path, small_corpus: Path):
    root = tmp_path / "ckpt"
    meta = _publish_real_model(root, tmp_path, small_corpus, step=5)
    store = Store(tmp_path / "state.sqlite3")
    health = HealthSettings(2.0, 10.0)
    web = WebServer(
        WebContext(
            tmp_path / "d",
            frozenset(),
            root,
            json.dumps({"signing_public_key": public_key_hex(KEY)}),
            store,
            status=lambda: None,
        ),
        "127.0.0.1",
        0,
    ).start()
    base = f"http://127.0.0.1:{web.port}"
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 1, base, root, signing_public_key=public_key_hex(KEY)),
        store,
        health,
        initial_peers=list,
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    try:
        yield f"127.0.0.1:{port}", base, root, meta
    finally:
        server.stop(0).wait()
        web.shutdown()
        store.close()


def test_pull_gives_a_verified_hf_loadable_directory(coordinator_with_checkpoint, tmp_path: Path):
    address, _, _, meta = coordinator_with_checkpoint
    out = tmp_path / "pulled"
    got = pull(address, out)
    assert got.step == meta.step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def f(x):", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    with pytest.raises(PullError, match="available steps: 5"):
        pull(address, tmp_path / "other", step=4)


def test_pull_over_plain_http_and_the_checkpoints_listing(coordinator_with_checkpoint, tmp_path: Path):
    import subprocess

    from crowdtrain.coordinator.demo import cli_command

    address, base, _, meta = coordinator_with_checkpoint
    assert pull(base, tmp_path / "via-http").step == meta.step
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(tmp_path / "via-http"))
    assert generator("def ", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("def ")
    for where in (address, base):
        listing = subprocess.run(
            cli_command("checkpoints", "--coordinator", where), capture_output=True, text=True, timeout=60
        )
        assert listing.returncode == 0, listing.stderr
        assert public_key_hex(KEY) in listing.stdout and f"{meta.step:>8}" in listing.stdout


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_an_interrupted_pull_resumes_and_bad_bytes_are_not_reused(
    coordinator_with_checkpoint, tmp_path: Path, transport: str
):
    grpc_address, base, root, meta = coordinator_with_checkpoint
    address = grpc_address if transport == "grpc" else base
    served = (root / "step-00000005" / "model.safetensors").read_bytes()
    staging = staging_dir(tmp_path / "pulled", meta.step)  # private (mkdtemp), as a killed pull left it
    (staging / "model.safetensors").write_bytes(served[: len(served) // 3])
    assert pull(address, tmp_path / "pulled").step == meta.step  # completes the file, verifies
    assert (tmp_path / "pulled" / "model.safetensors").read_bytes() == served
    assert not staging.exists()

    staging = staging_dir(tmp_path / "again", meta.step)
    garbage = bytearray(served[: len(served) // 3])
    garbage[100] ^= 0xFF  # a partial file that went bad on disk
    (staging / "model.safetensors").write_bytes(bytes(garbage))
    with pytest.raises(PullError, match="corrupted"):
        pull(address, tmp_path / "again")
    assert not (tmp_path / "again").exists() and not staging.exists()
    assert pull(address, tmp_path / "again").step == meta.step  # a fresh try succeeds


def test_pull_refuses_a_corrupted_file_and_writes_nothing(coordinator_with_checkpoint, tmp_path: Path):
    address, _, root, _ = coordinator_with_checkpoint
    served = root / "step-00000005" / "model.safetensors"
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    out = tmp_path / "pulled"
    with pytest.raises(PullError, match="corrupted"):
        pull(address, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")], "staging left behind"


def test_grpc_streaming_download_resumes_at_an_offset_and_refuses_unknown_files(coordinator_with_checkpoint):
    from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected

    address, _, root, meta = coordinator_with_checkpoint
    whole = (root / "step-00000005" / "model.safetensors").read_bytes()
    with CoordinatorClient(address) as client:
        for step in (0, 5):  # 0 is the latest
            chunks = list(client.download_checkpoint_file(step, "model.safetensors", 100, timeout_s=30))
            assert b"".join(c.data for c in chunks) == whole[100:]
            assert chunks[0].offset == 100 and {c.size_bytes for c in chunks} == {len(whole)}
            assert {c.step for c in chunks} == {5}
        assert len(chunks) == -(-(len(whole) - 100) // (1 << 20)), "streamed in 1 MiB chunks"
        signed = b"".join(c.data for c in client.download_checkpoint_file(5, "crowdtrain.json", 0, 30))
        assert CheckpointMeta.from_json(signed.decode()).step == 5
        for step, name, offset, error in (
            (7, "config.json", 0, "NOT_FOUND: no checkpoint at step 7"),
            (5, "../state.sqlite3", 0, "NOT_FOUND"),
            (5, "model.safetensors", len(whole) + 1, "OUT_OF_RANGE"),
        ):
            with pytest.raises(CoordinatorRejected, match=error):
                list(client.download_checkpoint_file(step, name, offset, timeout_s=30))


def test_http_range_requests_resume_downloads(coordinator_with_checkpoint):
    _, base, root, _ = coordinator_with_checkpoint
    whole = (root / "step-00000005" / "model.safetensors").read_bytes()
    for url in (f"{base}/checkpoints/latest/model.safetensors", f"{base}/checkpoints/5/model.safetensors"):
        request = urllib.request.Request(url, headers={"Range": "bytes=100-"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-{len(whole) - 1}/{len(whole)}"
            assert response.read() == whole[100:]
    with urllib.request.urlopen(f"{base}/checkpoints/5/crowdtrain.json", timeout=10) as response:
        assert CheckpointMeta.from_json(response.read().decode()).step == 5
    for bad in ("/checkpoints/5/../../state.sqlite3", "/checkpoints/7/config.json", "/data/../state.sqlite3"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + bad, timeout=10)
        assert e.value.code == 404


def test_signature_pins_the_run_key_and_covers_every_field(tmp_path: Path):
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 4)
    (staging / "model.safetensors").write_bytes(b"weights")
    meta = archive.finalize(staging, root, _meta(4), signing_key=KEY)
    directory = root / "step-00000004"
    assert checkpoint.verify_dir(directory, public_key=public_key_hex(KEY)) == meta
    with pytest.raises(CheckpointError, match="not the run's key"):
        checkpoint.verify_dir(directory, public_key=public_key_hex(new_key()))
    # an attacker edits the listing (new hash for a swapped file) but cannot re-sign it
    text = (directory / "crowdtrain.json").read_text()
    (directory / "crowdtrain.json").write_text(text.replace('"eval_loss": 5.0', '"eval_loss": 1.0'))
    with pytest.raises(CheckpointError, match="signature"):
        checkpoint.verify_dir(directory)
    # ... or re-signs it with their own key: caught once the run's key is pinned
    forged_key = new_key()
    forged = dataclasses.replace(meta, eval_loss=1.0, public_key=public_key_hex(forged_key), signature="")
    forged = dataclasses.replace(forged, signature=sign_hex(forged_key, forged.signing_payload()))
    (directory / "crowdtrain.json").write_text(forged.to_json())
    checkpoint.verify_dir(directory)  # self-consistent...
    with pytest.raises(CheckpointError, match="not the run's key"):
        checkpoint.verify_dir(directory, public_key=public_key_hex(KEY))


def test_verify_dir_with_the_digests_pull_computed_still_checks_everything_else(tmp_path: Path, monkeypatch):
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 4)
    (staging / "model.safetensors").write_bytes(b"weights" * 100)
    (staging / "config.json").write_text("{}")
    meta = archive.finalize(staging, root, _meta(4), signing_key=KEY)
    directory, key = root / "step-00000004", public_key_hex(KEY)
    digests = {f.name: f.sha256 for f in meta.files}
    read = []
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: read.append(path.name) or "0" * 64)
    assert checkpoint.verify_dir(directory, public_key=key, digests=digests) == meta
    assert read == [], "a file with a known digest was read again"
    with pytest.raises(CheckpointError, match="config.json is corrupted"):
        checkpoint.verify_dir(
            directory, public_key=key, digests={"model.safetensors": digests["model.safetensors"]}
        )
    assert read == ["config.json"]  # a file without a known digest is hashed on disk
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        checkpoint.verify_dir(directory, public_key=key, digests={**digests, "model.safetensors": "1" * 64})

    (directory / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list.*extra.bin"):
        checkpoint.verify_dir(directory, public_key=key, digests=digests)
    (directory / "extra.bin").unlink()
    with open(directory / "model.safetensors", "ab") as f:
        f.write(b"!")
    with pytest.raises(CheckpointError, match="bytes, expected"):
        checkpoint.verify_dir(directory, public_key=key, digests=digests)
    (directory / "model.safetensors").write_bytes(b"weights" * 100)
    (directory / "config.json").unlink()
    (directory / "config.json").symlink_to(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.verify_dir(directory, public_key=key, digests=digests)
    (directory / "config.json").unlink()
    (directory / "config.json").write_text("{}")
    assert checkpoint.verify_dir(directory, public_key=key, digests=digests) == meta
    with pytest.raises(CheckpointError, match="not the run's key"):
        checkpoint.verify_dir(directory, public_key=public_key_hex(new_key()), digests=digests)
    text = (directory / "crowdtrain.json").read_text()
    (directory / "crowdtrain.json").write_text(text.replace('"eval_loss": 5.0', '"eval_loss": 1.0'))
    with pytest.raises(CheckpointError, match="signature"):
        checkpoint.verify_dir(directory, public_key=key, digests=digests)


def test_verify_command_checks_a_pulled_directory_offline(coordinator_with_checkpoint, tmp_path: Path):
    import subprocess

    from crowdtrain.coordinator.demo import cli_command

    address = coordinator_with_checkpoint[0]
    out = tmp_path / "pulled"
    pull(address, out)
    key = public_key_hex(KEY)
    ok = subprocess.run(
        cli_command("verify", str(out), "--public-key", key), capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and "signed by the run's key" in ok.stdout, ok.stderr
    data = bytearray((out / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (out / "tokenizer.json").write_bytes(bytes(data))
    bad = subprocess.run(
        cli_command("verify", str(out), "--public-key", key), capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "corrupted" in bad.stderr


@pytest.mark.parametrize(
    ("steps", "keep_last", "keep_every", "in_use", "victims"),
    [
        ([1, 2, 3, 4, 5, 6], 2, 0, set(), [1, 2, 3, 4]),
        ([1, 2, 3, 4, 5, 6], 2, 3, set(), [1, 2, 4]),
        ([1, 2, 3, 4, 5, 6], 2, 0, {1, 4}, [2, 3]),
        ([7], 0, 0, set(), []),  # the latest always survives
        ([2, 9, 4], 1, 0, set(), [2, 4]),
    ],
)
def test_retention_keeps_the_newest_the_milestones_and_what_is_being_downloaded(
    steps, keep_last, keep_every, in_use, victims
):
    assert archive.retention_victims(steps, keep_last, keep_every, in_use) == victims


def test_pruning_never_touches_a_checkpoint_being_downloaded(tmp_path: Path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        staging = archive.new_staging_dir(root, step)
        (staging / "model.safetensors").write_bytes(bytes(range(256)) * (32 << 10))  # 8 MiB
        archive.finalize(staging, root, _meta(step), signing_key=KEY)
    store = Store(tmp_path / "s.sqlite3")
    ctx = WebContext(tmp_path, frozenset(), root, "{}", store, status=lambda: None)
    web = WebServer(ctx, "127.0.0.1", 0).start()
    try:
        response = urllib.request.urlopen(
            f"http://127.0.0.1:{web.port}/checkpoints/1/model.safetensors", timeout=10
        )
        assert len(response.read(1024)) == 1024  # the server is now blocked mid-file
        assert ctx.downloads.in_use() == {1}
        victims = archive.retention_victims([1, 2, 3], 1, 0, ctx.downloads.in_use())
        assert victims == [2]
        for step in victims:
            archive.remove_checkpoint(root, step)
        rest = response.read()
        assert len(rest) + 1024 == 8 << 20  # the download completed despite pruning
        response.close()
        assert [m.step for m in checkpoint.list_checkpoints(root)] == [1, 3]
        assert not list(root.glob(".tmp-*"))
    finally:
        web.shutdown()
        store.close()


def test_a_pull_leaves_readable_files_and_removes_only_its_own_stale_partials(
    coordinator_with_checkpoint, tmp_path: Path, caplog
):
    import logging
    import os
    import stat

    address, _, _, meta = coordinator_with_checkpoint
    out = tmp_path / "pulled"
    stale = staging_dir(out, meta.step - 2)  # an abandoned pull of an older "latest"
    (stale / "model.safetensors").write_bytes(b"half")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("not crowdtrain's")
    (stale / "link").symlink_to(outside)  # removed as a link; its target untouched
    linked = tmp_path / f".pulled.pull-step-{meta.step - 1}-abcdefgh"  # the exact name, but a symlink
    linked.symlink_to(outside)
    others = [
        tmp_path / "pulled.backup",
        tmp_path / ".pulled.pull-step-1-short",
        tmp_path / ".other.pull-step-1-abcdefgh",
    ]
    for path in others:
        path.mkdir(mode=0o700)
        (path / "model.safetensors").write_bytes(b"someone else's")
    with caplog.at_level(logging.INFO, logger="crowdtrain.peer.checkpoints.pull"):
        assert pull(address, out).step == meta.step
    assert not stale.exists()
    assert linked.is_symlink() and (outside / "keep").read_text() == "not crowdtrain's"
    assert all((path / "model.safetensors").exists() for path in others)
    [line] = [r.getMessage() for r in caplog.records if "partial download" in r.getMessage()]
    assert (
        line.startswith(f"removed 1 partial download(s) of other steps beside {out}") and stale.name in line
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes) == {checkpoint.META_NAME, *(f.name for f in meta.files)}
    assert set(modes.values()) == {0o644}, modes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".pulled.pull-step-{meta.step}-")]
    staging = staging_dir(tmp_path / "again", meta.step)  # while filling, staging stays private
    assert stat.S_IMODE(os.stat(staging).st_mode) == 0o700
