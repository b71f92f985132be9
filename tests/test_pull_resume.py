"""`crowdtrain pull` across steps: a pull of step 4 takes over the byte-identical files an
interrupted pull of step 2 left (by the signed sha256), downloads only the rest, and leaves no
partial directory behind. Against an in-process coordinator (gRPC and HTTP), requests counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import HttpLimits, WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.coordinator.signing import new_key, public_key_hex
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.peer.checkpoints import pull as pull_module
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.checkpoints.pull import PullError, pull
from crowdtrain.peer.link import download
from crowdtrain.peer.link.client import CoordinatorClient
from crowdtrain.peer.link.download import DownloadError

from tests.helpers import make_run

KEY = new_key()


def _meta(step: int) -> CheckpointMeta:
    return CheckpointMeta("ct_test", step, step * 256, 5.0, 1.0, "m", None, ())


@pytest.fixture
def coordinator(tmp_path: Path, small_corpus: Path):
    """(grpc address, http base, checkpoint root) serving step 2 of a real tiny model."""
    from crowdtrain.peer.run.model import build_model, save_hf

    root = tmp_path / "ckpt"
    manifest, tokenizer_json = make_run(tmp_path, small_corpus)
    staging = archive.new_staging_dir(root, 2)
    save_hf(build_model(manifest), tokenizer_json, manifest, staging)
    archive.finalize(staging, root, _meta(2), signing_key=KEY)
    store = Store(tmp_path / "state.sqlite3")
    context = WebContext(
        tmp_path / "d",
        frozenset(),
        root,
        json.dumps({"signing_public_key": public_key_hex(KEY)}),
        store,
        status=lambda: None,
    )
    web = WebServer(context, "127.0.0.1", 0, HttpLimits(view_max_age_s=0.0)).start()  # no stale listing
    base = f"http://127.0.0.1:{web.port}"
    run = RunInfo("{}", "x", "{}", 1, base, root, signing_public_key=public_key_hex(KEY))
    server, port = create_server(
        CoordinatorServicer(run, store, HealthSettings(2.0, 10.0), list), "127.0.0.1", 0
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}", base, root
    finally:
        server.stop(0).wait()
        web.shutdown()
        store.close()


def _publish_step_4(root: Path, change_weights: bool) -> CheckpointMeta:
    """Step 4: step 2's files, its weights changed in one byte (or not at all)."""
    staging = archive.new_staging_dir(root, 4)
    for path in (root / "step-00000002").iterdir():
        if path.name != checkpoint.META_NAME:
            shutil.copyfile(path, staging / path.name)
    if change_weights:
        weights = bytearray((staging / "model.safetensors").read_bytes())
        weights[-1] ^= 0x01
        (staging / "model.safetensors").write_bytes(bytes(weights))
    return archive.finalize(staging, root, _meta(4), signing_key=KEY)


def _interrupt_a_pull_of_step_2(monkeypatch, address: str, out: Path, last: str) -> Path:
    """Pull step 2 until the connection drops at file `last`; returns the partial directory left."""
    fetch = pull_module._Source.fetch

    def dropped(self, staging, name, *args, **kwargs):
        if name == last:
            raise DownloadError(f"{name}: connection reset by peer")
        return fetch(self, staging, name, *args, **kwargs)

    monkeypatch.setattr(pull_module._Source, "fetch", dropped)
    with pytest.raises(PullError, match="run pull again to resume"):
        pull(address, out, step=2)
    monkeypatch.setattr(pull_module._Source, "fetch", fetch)
    [partial] = out.parent.glob(f".{out.name}.pull-step-2-*")
    return partial


def _count_downloads(monkeypatch) -> list[str]:
    """File names the pull asks the coordinator for, over HTTP or the gRPC stream."""
    asked: list[str] = []
    open_url = download.open_url
    stream = CoordinatorClient.download_checkpoint_file

    def counted_open(request, *args, **kwargs):
        asked.append(request.full_url.rsplit("/", 1)[-1])
        return open_url(request, *args, **kwargs)

    def counted_stream(self, step, name, *args, **kwargs):
        asked.append(name)
        return stream(self, step, name, *args, **kwargs)

    monkeypatch.setattr(download, "open_url", counted_open)
    monkeypatch.setattr(CoordinatorClient, "download_checkpoint_file", counted_stream)
    return asked


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_pull_of_a_later_step_reuses_what_an_interrupted_pull_left(
    coordinator, tmp_path: Path, monkeypatch, transport: str
):
    grpc_address, base, root = coordinator
    address = grpc_address if transport == "grpc" else base
    out = tmp_path / "model"
    step_2 = checkpoint.read_meta(root / "step-00000002")
    names = [f.name for f in step_2.files]
    assert "model.safetensors" in names and "tokenizer.json" in names
    last = names[-1] if names[-1] != "model.safetensors" else names[-2]
    partial = _interrupt_a_pull_of_step_2(monkeypatch, address, out, last)
    assert {p.name for p in partial.iterdir()} == {checkpoint.META_NAME, *names} - {last}

    step_4 = _publish_step_4(root, change_weights=True)
    asked = _count_downloads(monkeypatch)
    assert pull(address, out).step == 4
    # the signed listing, the changed weights, and the file the interruption never fetched
    assert sorted(asked) == sorted([checkpoint.META_NAME, "model.safetensors", last])
    assert not list(tmp_path.glob(".model.pull-step-*")), "a partial directory was left"
    assert checkpoint.verify_dir(out, public_key=public_key_hex(KEY)) == step_4


def test_identical_weights_are_not_downloaded_again_and_a_changed_file_is(
    coordinator, tmp_path: Path, monkeypatch
):
    _, base, root = coordinator
    out = tmp_path / "model"
    partial = _interrupt_a_pull_of_step_2(monkeypatch, base, out, "tokenizer_config.json")
    tampered = bytearray((partial / "tokenizer.json").read_bytes())  # same size, other bytes
    tampered[len(tampered) // 2] ^= 0x20
    (partial / "tokenizer.json").write_bytes(bytes(tampered))

    _publish_step_4(root, change_weights=False)
    asked = _count_downloads(monkeypatch)
    assert pull(base, out).step == 4
    assert sorted(asked) == sorted([checkpoint.META_NAME, "tokenizer.json", "tokenizer_config.json"])
    assert not list(tmp_path.glob(".model.pull-step-*"))
    assert checkpoint.verify_dir(out, public_key=public_key_hex(KEY)).step == 4
