"""A malicious coordinator against `crowdtrain pull`, `verify` and a peer's data cache: hostile
file names, manifest names, keys and sizes. The coordinator here is a small HTTP (or gRPC)
server on 127.0.0.1:0 that serves whatever listing, crowdtrain.json and files a test crafts; no
swarm, seconds in all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import ssl
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator.signing import new_key, public_key_hex, sign_hex
from crowdtrain.peer import checks as names
from crowdtrain.peer.checkpoints.format import CheckpointError, CheckpointMeta, FileEntry, verify_dir
from crowdtrain.peer.checkpoints.pull import PullError, pull
from crowdtrain.peer.checkpoints.trust import (
    TrustedRun,
    TrustStore,
    UntrustedKey,
    decide_key,
    trust_joined_run,
)
from crowdtrain.peer.data.shards import run_cache_dir, shard_path
from crowdtrain.peer.link.download import expected_body_bytes
from crowdtrain.peer.link.tls import ClientTls
from crowdtrain.peer.run.manifest import (
    DataSpec,
    ManifestError,
    RunManifest,
    ShardSpec,
    TokenizerSpec,
    build_manifest,
    get_preset,
)
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

from tests.certs import make_self_signed

CONFIG = b'{"model_type": "llama"}'
WEIGHTS = b"\x00" * 64


def signed(key, step: int, files: dict[str, bytes], run_id: str = "ct_run", **extra) -> CheckpointMeta:
    """crowdtrain.json for `files`, signed by `key` (names are whatever the test wants, even hostile)."""
    entries = tuple(FileEntry(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in sorted(files.items()))
    meta = CheckpointMeta(run_id, step, 0, 4.0, 1.0, "m", None, entries, public_key_hex(key), "", **extra)
    return dataclasses.replace(meta, signature=sign_hex(key, meta.signing_payload()))


class Hostile:
    """The malicious coordinator's HTTP side. `routes[path]` is bytes (served whole, honouring a Range
    request with a correct 206) or a function(handler) that answers however it likes."""

    def __init__(self, context: ssl.SSLContext | None = None):
        self.routes: dict[str, object] = {}
        self.sent_bytes: dict[str, int] = {}
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                route = hostile.routes.get(self.path)
                if route is None:
                    return self.send_error(404)
                if callable(route):
                    return route(self)
                start = 0
                if (rng := self.headers.get("Range", "")).startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(route) - 1}/{len(route)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(route) - start))
                self.end_headers()
                self.wfile.write(route[start:])
                hostile.sent_bytes[self.path] = hostile.sent_bytes.get(self.path, 0) + len(route) - start

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.base = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def publish(
        self, meta: CheckpointMeta, files: dict[str, bytes], listed: list[dict] | None = None
    ) -> None:
        """Serve `meta` as the checkpoint at its step, listed as `listed` (default: itself)."""
        self.routes["/api/v1/checkpoints"] = json.dumps(listed or [json.loads(meta.to_json())]).encode()
        self.routes["/api/v1/run"] = json.dumps({"signing_public_key": meta.public_key}).encode()
        self.routes[f"/checkpoints/{meta.step}/crowdtrain.json"] = meta.to_json().encode()
        for name, data in files.items():
            self.routes[f"/checkpoints/{meta.step}/{name}"] = data

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile():
    server = Hostile()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "config" / "trusted_keys.json")


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- names become paths


@pytest.mark.parametrize("where", ["listing", "signed crowdtrain.json"])
@pytest.mark.parametrize("name", ["../../escaped.txt", "ABSOLUTE"])
def test_a_hostile_file_name_writes_nothing_outside_the_output(hostile, store, tmp_path: Path, where, name):
    victim = tmp_path / "victim.txt"  # stands in for ~/.bashrc
    victim.write_text("original\n")
    name = str(victim) if name == "ABSOLUTE" else name
    appended = b"original\nevil line\n"
    key = new_key()
    honest = signed(key, 3, {"config.json": CONFIG})
    evil = dataclasses.replace(
        honest, files=(*honest.files, FileEntry(name, hashlib.sha256(appended).hexdigest(), len(appended)))
    )
    if where == "signed crowdtrain.json":  # a coordinator signing its own lies with its own key
        evil = dataclasses.replace(evil, signature=sign_hex(key, evil.signing_payload()))
    hostile.publish(evil if where != "listing" else honest, {"config.json": CONFIG})
    hostile.routes["/api/v1/checkpoints"] = json.dumps([json.loads(evil.to_json())]).encode()

    def resume_the_victim(handler):  # answers as if the victim were a partial download to continue
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 9-{len(appended) - 1}/{len(appended)}")
        handler.send_header("Content-Length", str(len(appended) - 9))
        handler.end_headers()
        handler.wfile.write(appended[9:])

    for path in (f"/checkpoints/3/{name}", f"/checkpoints/3/{name.lstrip('/')}", "/escaped.txt"):
        hostile.routes[path] = resume_the_victim
    before = _files_under(tmp_path)
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    with pytest.raises(PullError, match="not one plain file name|malformed"):
        pull(hostile.base, out, store=store)
    assert victim.read_text() == "original\n"
    assert _files_under(tmp_path) == before, "pull wrote a file"
    assert not out.exists()


def test_a_grpc_listing_naming_a_path_is_refused(store, tmp_path: Path):
    key = new_key()
    meta = signed(key, 3, {"config.json": CONFIG})
    served: list[str] = []

    class Evil(pb_grpc.CoordinatorServicer):
        def ListCheckpoints(self, request, context):
            files = [pb.CheckpointFile(name="../../escaped.txt", sha256="0" * 64, size_bytes=5)]
            return pb.ListCheckpointsResponse(
                checkpoints=[pb.CheckpointInfo(step=3, files=files)], signing_public_key=meta.public_key
            )

        def DownloadCheckpointFile(self, request, context):
            served.append(request.name)
            data = meta.to_json().encode() if request.name == "crowdtrain.json" else b"pwned"
            yield pb.FileChunk(data=data, offset=0, size_bytes=len(data), step=3)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(Evil(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        (tmp_path / "a" / "b").mkdir(parents=True)
        with pytest.raises(PullError, match="not one plain file name"):
            pull(f"127.0.0.1:{port}", tmp_path / "a" / "b" / "out", store=store, timeout_s=10)
    finally:
        server.stop(0).wait()
    assert not list(tmp_path.rglob("escaped.txt")) and "../../escaped.txt" not in served


# ---------------------------------------------------------------- the manifest's names


def _manifest_json(run_id: str = "ct_tiny_1a2b3c4d", shard_name: str = "train-00000.jsonl") -> str:
    shard = ShardSpec(shard_name, "a" * 64, 10, 1)
    manifest = build_manifest(
        get_preset("tiny"),
        run_id=run_id,
        created_unix_s=1.0,
        tokenizer=TokenizerSpec("byte-level-bpe", 2048, "b" * 64),
        data=DataSpec("t", 128, 0.02, ShardSpec("eval.jsonl", "c" * 64, 10, 1), (shard,), 8),
    )
    return manifest.to_json()


@pytest.mark.parametrize(
    "shard_name", ["../../escaped.jsonl", "/etc/cron.d/x", "..", "sub/dir.jsonl", ".hidden"]
)
def test_a_manifest_naming_a_path_as_a_shard_is_refused(shard_name, tmp_path: Path):
    assert RunManifest.from_json(_manifest_json()).run_id == "ct_tiny_1a2b3c4d"  # an honest one is fine
    with pytest.raises(ManifestError, match="data shard name"):
        RunManifest.from_json(_manifest_json(shard_name=shard_name))
    with pytest.raises(names.NetworkValueError):
        shard_path(tmp_path, shard_name)


@pytest.mark.parametrize("run_id", ["../../home", "a/b", "..", ".", "", "x" * 65, "run\nid"])
def test_a_manifest_run_id_that_is_not_one_name_is_refused(run_id, tmp_path: Path):
    with pytest.raises(ManifestError, match="run id"):
        RunManifest.from_json(_manifest_json(run_id=run_id))
    with pytest.raises(names.NetworkValueError):
        run_cache_dir(str(tmp_path), run_id)


# ---------------------------------------------------------------- whom to trust


def test_a_coordinator_resigning_with_a_fresh_key_is_refused(hostile, store, tmp_path: Path):
    honest_key, fresh_key = new_key(), new_key()
    hostile.publish(signed(honest_key, 3, {"config.json": CONFIG}), {"config.json": CONFIG})
    assert pull(hostile.base, tmp_path / "first", store=store).step == 3  # trusted on first use

    forged = signed(fresh_key, 4, {"config.json": b'{"evil": 1}'})
    hostile.publish(forged, {"config.json": b'{"evil": 1}'})
    with pytest.raises(PullError, match=f"--public-key {public_key_hex(fresh_key)}") as refused:
        pull(hostile.base, tmp_path / "second", store=store)
    assert "--trust-new-key" in str(refused.value) and str(store.file_for(hostile.base)) in str(refused.value)
    assert not (tmp_path / "second").exists()

    # a pinned key refuses it even on a machine that never saw the run
    with pytest.raises(PullError, match="not the pinned --public-key"):
        pull(
            hostile.base,
            tmp_path / "pinned",
            store=TrustStore(tmp_path / "other.json"),
            public_key=public_key_hex(honest_key),
        )
    # accepting the new key deliberately works, and is remembered
    assert pull(hostile.base, tmp_path / "accepted", store=store, trust_new_key=True).step == 4
    assert pull(hostile.base, tmp_path / "again", store=store).step == 4


def test_an_old_checkpoint_replayed_as_the_latest_is_refused(hostile, store, tmp_path: Path):
    key = new_key()
    old, new = signed(key, 2, {"config.json": CONFIG}), signed(key, 4, {"config.json": WEIGHTS})
    hostile.publish(old, {"config.json": CONFIG})
    hostile.publish(new, {"config.json": WEIGHTS})
    assert pull(hostile.base, tmp_path / "new", store=store).step == 4
    hostile.routes["/api/v1/checkpoints"] = json.dumps([json.loads(old.to_json())]).encode()
    with pytest.raises(PullError, match="replayed"):
        pull(hostile.base, tmp_path / "replayed", store=store)
    assert pull(hostile.base, tmp_path / "explicit", step=2, store=store).step == 2  # asked for: fine


def test_a_checkpoint_of_another_run_at_a_known_address_is_refused(hostile, store, tmp_path: Path):
    key = new_key()
    hostile.publish(signed(key, 3, {"config.json": CONFIG}), {"config.json": CONFIG})
    pull(hostile.base, tmp_path / "first", store=store)
    other = new_key()
    hostile.publish(signed(other, 9, {"config.json": CONFIG}, run_id="ct_other"), {"config.json": CONFIG})
    with pytest.raises(PullError, match="ct_other"):
        pull(hostile.base, tmp_path / "second", store=store)


def test_a_peer_refuses_a_new_key_for_a_known_run(store):
    key, fresh = public_key_hex(new_key()), public_key_hex(new_key())
    assert trust_joined_run("10.0.0.1:50051", "ct_a", key, store) == key  # first use
    assert trust_joined_run("10.0.0.1:50051", "ct_a", key, store) == key  # the same run again
    with pytest.raises(UntrustedKey, match="ct_a") as refused:
        trust_joined_run("10.0.0.1:50051", "ct_a", fresh, store)
    assert "cannot sign its run with another key" in str(refused.value)


def test_an_impostor_renaming_the_run_neither_joins_nor_poisons_pull(hostile, store, tmp_path: Path):
    """An impostor re-signs the real manifest with its own key under a new run id. The
    peer refuses it (it used to trust any new run id on first use), and even once a volunteer let a
    peer accept it (--trust-new-run), a plain pull does not take the peer's word for it."""
    honest, impostor = new_key(), new_key()
    address = hostile.base  # the address the volunteer gave both the peer and pull
    trust_joined_run(address, "ct_run", public_key_hex(honest), store)  # the real run, first contact
    with pytest.raises(UntrustedKey, match="ct_impostor") as refused:
        trust_joined_run(address, "ct_impostor", public_key_hex(impostor), store)
    assert "--trust-new-run" in str(refused.value) and "ct_run" in str(refused.value)
    assert set(store.runs_at(address)) == {"ct_run"}, "nothing of the impostor's was recorded"

    # the volunteer is talked into accepting it for the peer: recorded as a peer's trust only
    trust_joined_run(address, "ct_impostor", public_key_hex(impostor), store, trust_new_run=True)
    assert store.runs_at(address)["ct_impostor"].how == "joined"
    evil = b'{"model_type": "llama", "note": "attacker-made weights"}'
    hostile.publish(signed(impostor, 1, {"config.json": evil}, run_id="ct_impostor"), {"config.json": evil})
    with pytest.raises(PullError, match="ct_impostor.*--trust-new-run"):
        pull(address, tmp_path / "poisoned", store=store)
    assert not (tmp_path / "poisoned").exists()

    # the real run's checkpoint: pull trusts what the peer saw first (the same key, no other run)
    other = tmp_path / "other-store" / "trusted_keys.json"
    trust_joined_run(address, "ct_run", public_key_hex(honest), TrustStore(other))
    hostile.publish(signed(honest, 2, {"config.json": CONFIG}), {"config.json": CONFIG})
    assert pull(address, tmp_path / "real", store=TrustStore(other)).step == 2
    assert TrustStore(other).runs_at(address)["ct_run"].how == "first_use"


def test_pull_accepts_a_new_run_only_deliberately(hostile, store, tmp_path: Path):
    key, other = new_key(), new_key()
    hostile.publish(signed(key, 3, {"config.json": CONFIG}), {"config.json": CONFIG})
    pull(hostile.base, tmp_path / "first", store=store)
    hostile.publish(signed(other, 9, {"config.json": CONFIG}, run_id="ct_next"), {"config.json": CONFIG})
    with pytest.raises(PullError, match=f"--public-key {public_key_hex(other)} \\(or --trust-new-run\\)"):
        pull(hostile.base, tmp_path / "second", store=store)
    assert pull(hostile.base, tmp_path / "second", store=store, trust_new_run=True).step == 9
    assert store.runs_at(hostile.base)["ct_next"].how == "accepted"
    assert pull(hostile.base, tmp_path / "third", store=store).step == 9  # remembered


@pytest.mark.parametrize(
    ("known", "run", "served", "kw", "decision"),
    [
        ({}, "r", "k1", {}, "first_use"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "r", "k1", {}, "trust"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "r", "k2", {}, "refuse"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "r", "k2", {"accept_new": True}, "accept"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "s", "k2", {}, "refuse"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "s", "k2", {"trust_new_run": True}, "accept"),
        ({"r": TrustedRun("k1", 3, "first_use")}, "s", "k1", {}, "refuse"),  # another run: even one key
        ({}, "r", "k2", {"pinned_key": "k1"}, "refuse"),
        ({"r": TrustedRun("k2", 3)}, "r", "k1", {"pinned_key": "k1"}, "trust"),
        # a training peer's entries refuse, but never trust for pull on their own
        ({"r": TrustedRun("k1", 3, "joined")}, "r", "k2", {}, "refuse"),
        ({"r": TrustedRun("k1", 3, "joined")}, "r", "k1", {}, "first_use"),
        ({"r": TrustedRun("k1", 3, "joined"), "s": TrustedRun("k2", 3, "joined")}, "s", "k2", {}, "refuse"),
        (
            {"r": TrustedRun("k1", 3, "joined"), "s": TrustedRun("k2", 3, "joined")},
            "s",
            "k2",
            {"for_pull": False},
            "trust",
        ),
        ({"r": TrustedRun("k1", 3, "joined")}, "s", "k1", {"for_pull": False}, "refuse"),
        (
            {"r": TrustedRun("k1", 3, "joined")},
            "s",
            "k1",
            {"for_pull": False, "trust_new_run": True},
            "accept",
        ),
        (
            {"r": TrustedRun("k1", 3, "first_use"), "s": TrustedRun("k2", 3, "joined")},
            "s",
            "k2",
            {},
            "refuse",
        ),
    ],
)
def test_decide_key(known, run, served, kw, decision):
    assert decide_key(known, run, served, **kw)[0] == decision


# ---------------------------------------------------------------- sizes, numbers, verify


def test_a_file_served_larger_than_its_signed_size_is_cut_off(hostile, store, tmp_path: Path):
    key = new_key()
    meta = signed(key, 3, {"config.json": CONFIG})
    inflated = dataclasses.replace(meta, files=(FileEntry("config.json", meta.files[0].sha256, 50_000_000),))
    hostile.publish(meta, {"config.json": CONFIG + b"x" * 5_000_000}, listed=[json.loads(inflated.to_json())])
    with pytest.raises(PullError, match=f"more than the {len(CONFIG)} bytes"):
        pull(hostile.base, tmp_path / "out", store=store)
    staged = [p.stat().st_size for p in tmp_path.glob(".out.pull-step-3-*/config.json")]
    assert all(size <= len(CONFIG) for size in staged) and not (tmp_path / "out").exists()


def test_a_huge_crowdtrain_json_is_refused_at_its_cap(hostile, store, tmp_path: Path):
    key = new_key()
    meta = signed(key, 3, {"config.json": CONFIG})
    hostile.publish(meta, {"config.json": CONFIG})
    hostile.routes["/checkpoints/3/crowdtrain.json"] = b" " * (8 << 20) + meta.to_json().encode()
    with pytest.raises(PullError, match="more than the 1048576 bytes"):
        pull(hostile.base, tmp_path / "out", store=store)


def test_a_superscript_step_in_the_listing_is_a_clear_error(hostile, store, tmp_path: Path):
    meta = signed(new_key(), 3, {"config.json": CONFIG})
    hostile.publish(meta, {"config.json": CONFIG})
    listed = json.loads(meta.to_json())
    listed["step"] = "²"
    hostile.routes["/api/v1/checkpoints"] = json.dumps([listed]).encode()
    with pytest.raises(PullError, match="malformed listing: .*step"):
        pull(hostile.base, tmp_path / "out", store=store)


@pytest.mark.parametrize("header", ["Content-Length", "Content-Range"])
def test_a_4300_digit_header_number_is_a_clear_error(hostile, store, tmp_path: Path, header):
    meta = signed(new_key(), 3, {"config.json": CONFIG})
    hostile.publish(meta, {"config.json": CONFIG})
    huge = "9" * 4300

    def answer(handler):
        handler.send_response(206 if header == "Content-Range" else 200)
        if header == "Content-Range":
            handler.send_header("Content-Range", f"bytes 0-{huge}/{huge}")
        handler.send_header("Content-Length", huge if header == "Content-Length" else str(len(CONFIG)))
        handler.end_headers()
        handler.wfile.write(CONFIG)

    hostile.routes["/checkpoints/3/config.json"] = answer
    with pytest.raises(PullError, match=f"{header} .*ASCII digits"):
        pull(hostile.base, tmp_path / "out", store=store)


@pytest.mark.parametrize(
    ("status", "headers", "have", "size", "error"),
    [
        (200, {"Content-Length": "10"}, 0, 10, None),
        (206, {"Content-Range": "bytes 4-9/10", "Content-Length": "6"}, 4, 10, None),
        (206, {"Content-Range": "bytes 0-9/10"}, 4, 10, "not bytes 4-"),  # not where we asked
        (206, {"Content-Range": "bytes 4-9/99"}, 4, 10, "not the promised"),
        (206, {"Content-Range": "bytes ²-9/10"}, 0, 10, "ASCII digits"),
        (200, {"Content-Length": "11"}, 0, 10, "more than the 10 bytes"),
        (200, {"Content-Length": "-1"}, 0, 10, "ASCII digits"),
        (200, {"Content-Length": "１０"}, 0, 10, "ASCII digits"),  # fullwidth digits
    ],
)
def test_header_numbers_are_checked_against_the_signed_size(status, headers, have, size, error):
    if error is None:
        assert expected_body_bytes(headers, status, have, size)[0] == have
    else:
        with pytest.raises(names.NetworkValueError, match=error):
            expected_body_bytes(headers, status, have, size)


def test_verify_refuses_unlisted_files_and_symlinks(tmp_path: Path):
    key = new_key()
    meta = signed(key, 3, {"config.json": CONFIG})
    good = tmp_path / "ckpt"
    good.mkdir()
    (good / "config.json").write_bytes(CONFIG)
    (good / "crowdtrain.json").write_text(meta.to_json())
    assert verify_dir(good, public_key=public_key_hex(key)).step == 3

    (good / "evil.py").write_text("import os")
    with pytest.raises(CheckpointError, match="does not list.*evil.py"):
        verify_dir(good, public_key=public_key_hex(key))
    (good / "evil.py").unlink()

    (tmp_path / "elsewhere.json").write_bytes(CONFIG)
    (good / "config.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", good / "config.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        verify_dir(good, public_key=public_key_hex(key))

    (good / "config.json").unlink()
    (good / "config.json").write_bytes(CONFIG)
    (tmp_path / "meta.json").write_text(meta.to_json())
    (good / "crowdtrain.json").unlink()
    os.symlink(tmp_path / "meta.json", good / "crowdtrain.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        verify_dir(good, public_key=public_key_hex(key))


def test_pull_never_follows_a_symlink_planted_in_its_staging_directory(hostile, store, tmp_path: Path):
    """Another user who can write beside OUT plants a staging directory full of symlinks: pull uses
    its own private one (mkdtemp, 0700) and the target stays untouched."""
    target = tmp_path / "target.txt"
    target.write_text("keep me\n")
    # the old predictable name, and one matching the new prefix
    for planted in (tmp_path / ".out.pull-step-3", tmp_path / ".out.pull-step-3-planted"):
        planted.mkdir()
        os.chmod(planted, 0o777)  # not private: never reused
        os.symlink(target, planted / "config.json")
    meta = signed(new_key(), 3, {"config.json": CONFIG})
    hostile.publish(meta, {"config.json": CONFIG})
    assert pull(hostile.base, tmp_path / "out", store=store).step == 3
    assert target.read_text() == "keep me\n" and (tmp_path / "out" / "config.json").read_bytes() == CONFIG
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o755)


def test_https_pull_with_a_self_signed_certificate(store, tmp_path: Path):
    cert, key_file = make_self_signed(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key_file))
    server = Hostile(context)
    try:
        meta = signed(new_key(), 3, {"config.json": CONFIG})
        server.publish(meta, {"config.json": CONFIG})
        with pytest.raises(PullError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            pull(server.base, tmp_path / "untrusted", store=store, tls=ClientTls.from_flags(True, ""))
        tls = ClientTls.from_flags(False, str(cert))
        assert pull(server.base, tmp_path / "out", store=store, tls=tls).step == 3
    finally:
        server.close()


def test_grpc_pull_over_tls_with_a_self_signed_certificate(store, tmp_path: Path):
    cert, key_file = make_self_signed(tmp_path / "tls")
    meta = signed(new_key(), 3, {"config.json": CONFIG})
    files = {"crowdtrain.json": meta.to_json().encode(), "config.json": CONFIG}

    class Honest(pb_grpc.CoordinatorServicer):
        def ListCheckpoints(self, request, context):
            listed = [
                pb.CheckpointFile(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in meta.files
            ]
            info = pb.CheckpointInfo(step=3, files=listed)
            return pb.ListCheckpointsResponse(checkpoints=[info], signing_public_key=meta.public_key)

        def DownloadCheckpointFile(self, request, context):
            data = files[request.name][request.offset :]
            yield pb.FileChunk(data=data, offset=request.offset, size_bytes=len(files[request.name]), step=3)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(Honest(), server)
    credentials = grpc.ssl_server_credentials([(key_file.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        tls = ClientTls.from_flags(False, str(cert))
        assert pull(f"127.0.0.1:{port}", tmp_path / "out", store=store, tls=tls, timeout_s=20).step == 3
        assert (tmp_path / "out" / "config.json").read_bytes() == CONFIG
    finally:
        server.stop(0).wait()


# ---------------------------------------------------------------- TLS flags


def _https_hostile(tmp_path: Path, name: str) -> tuple[Hostile, Path]:
    cert, key_file = make_self_signed(tmp_path / name, common_name=name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key_file))
    return Hostile(context), cert


def test_tls_flags_with_an_http_url_are_refused_not_ignored(hostile, store, tmp_path: Path):
    """`pull --coordinator http://... --tls` used to download in plaintext, the flag ignored."""
    hostile.publish(signed(new_key(), 3, {"config.json": CONFIG}), {"config.json": CONFIG})
    for tls in (ClientTls.from_flags(True, ""), ClientTls.from_flags(False, str(tmp_path / "ca.pem"))):
        with pytest.raises(PullError, match="plaintext HTTP; use https://127.0.0.1"):
            pull(hostile.base, tmp_path / "out", store=store, tls=tls)
    assert not (tmp_path / "out").exists() and not hostile.sent_bytes, "nothing was fetched in plaintext"


def test_tls_ca_trusts_that_ca_alone_not_the_system_store(store, tmp_path: Path, monkeypatch):
    """With --tls-ca, a certificate the system store trusts (here: SSL_CERT_FILE, which OpenSSL reads
    as the system store) is refused, as gRPC refuses it; with --tls it is the store to use."""
    server, system_ca = _https_hostile(tmp_path, "system-ca")
    runs_ca, _ = make_self_signed(tmp_path / "runs-ca", common_name="the run's CA")
    monkeypatch.setenv("SSL_CERT_FILE", str(system_ca))
    try:
        server.publish(signed(new_key(), 3, {"config.json": CONFIG}), {"config.json": CONFIG})
        tls = ClientTls.from_flags(False, str(runs_ca))
        with pytest.raises(PullError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            pull(server.base, tmp_path / "out", store=store, tls=tls)
        assert pull(server.base, tmp_path / "out", store=store, tls=ClientTls.from_flags(True, "")).step == 3
    finally:
        server.close()


def test_a_redirect_out_of_https_is_refused(hostile, store, tmp_path: Path):
    server, cert = _https_hostile(tmp_path, "tls")
    meta = signed(new_key(), 3, {"config.json": CONFIG})
    hostile.publish(meta, {"config.json": CONFIG})
    server.publish(meta, {"config.json": CONFIG})

    def to_plaintext(handler):
        handler.send_response(302)
        handler.send_header("Location", hostile.base + handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server.routes["/checkpoints/3/config.json"] = to_plaintext
    try:
        with pytest.raises(PullError, match="redirects to http://127.0.0.1.*is not https://"):
            pull(server.base, tmp_path / "out", store=store, tls=ClientTls.from_flags(False, str(cert)))
    finally:
        server.close()
    assert "/checkpoints/3/config.json" not in hostile.sent_bytes
