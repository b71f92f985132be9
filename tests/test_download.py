"""The one HTTP downloader: verified, atomic, resumable, and bounded by what the listing promised."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from crowdtrain.peer.link import download as download_module
from crowdtrain.peer.link.download import (
    DownloadCorrupted,
    DownloadError,
    HashedFile,
    download,
    download_resumable,
)

BODY = bytes(range(256)) * 4000  # ~1 MB
SHA = hashlib.sha256(BODY).hexdigest()
BAD = BODY[:500_000] + bytes([BODY[500_000] ^ 1]) + BODY[500_001:]  # one byte flipped in the middle


@pytest.fixture
def server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(
            self,
        ):  # /good, /bad (one byte flipped), /huge (more than promised); Range honoured on /good, /bad
            body = {"/good": BODY, "/bad": BAD, "/norange": BODY}.get(self.path, BODY * 3)
            start = 0
            if self.path in ("/good", "/bad") and (rng := self.headers.get("Range", "")).startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_verified_download_is_renamed_into_place(server, tmp_path: Path):
    dest = download(f"{server}/good", tmp_path / "shard.jsonl", sha256=SHA, size=len(BODY))
    assert dest.read_bytes() == BODY and [p.name for p in tmp_path.iterdir()] == ["shard.jsonl"]


def test_a_wrong_hash_leaves_nothing_behind(server, tmp_path: Path):
    with pytest.raises(DownloadCorrupted):
        download(f"{server}/good", tmp_path / "shard.jsonl", sha256="0" * 64, size=len(BODY))
    assert list(tmp_path.iterdir()) == []


def test_a_server_sending_more_than_promised_is_cut_off(server, tmp_path: Path):
    with pytest.raises(DownloadError, match="more than the"):
        download(f"{server}/huge", tmp_path / "shard.jsonl", size=len(BODY))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path: Path):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(BODY[:300_000])  # what an interrupted pull left
    download(f"{server}/good", dest, sha256=SHA, size=len(BODY), resume=True)
    assert dest.read_bytes() == BODY


@pytest.fixture
def no_rereading(monkeypatch):
    """Fails a test that reads a downloaded file again to hash it: the hash is kept while writing."""

    def reread(path, *args):
        raise AssertionError(f"{path} was read again to hash it")

    monkeypatch.setattr(download_module, "sha256_file", reread)


@pytest.mark.parametrize("resume", [False, True])
def test_a_byte_corrupted_in_transit_is_caught_while_downloading(
    server, tmp_path: Path, no_rereading, resume
):
    with pytest.raises(
        DownloadCorrupted, match=f"is corrupted: sha256 {hashlib.sha256(BAD).hexdigest()[:12]}"
    ):
        download(f"{server}/bad", tmp_path / "model.safetensors", sha256=SHA, size=len(BODY), resume=resume)
    assert list(tmp_path.iterdir()) == []  # deleted, as check_file_sha256 always did


def test_a_resumed_download_hashes_the_prefix_on_disk_and_the_rest(server, tmp_path: Path, no_rereading):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(BODY[:300_000])
    assert download_resumable(f"{server}/good", dest, sha256=SHA, size=len(BODY)) == SHA
    assert dest.read_bytes() == BODY
    assert download_resumable(f"{server}/good", dest, sha256=SHA, size=len(BODY)) == SHA  # whole: no request


def test_a_corrupted_prefix_on_disk_is_caught_when_resuming(server, tmp_path: Path, no_rereading):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(BAD[:600_000])  # the flipped byte is in what an earlier try left
    with pytest.raises(DownloadCorrupted, match="is corrupted"):
        download_resumable(f"{server}/good", dest, sha256=SHA, size=len(BODY))
    assert not dest.exists()


def test_a_server_ignoring_range_starts_the_file_and_its_hash_over(server, tmp_path: Path, no_rereading):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(BAD[:600_000])  # bytes the fresh answer replaces: they must not be in the hash
    assert download_resumable(f"{server}/norange", dest, sha256=SHA, size=len(BODY)) == SHA
    assert dest.read_bytes() == BODY


def test_hashed_file_digest_covers_the_prefix_and_every_write(tmp_path: Path):
    path = tmp_path / "f"
    with HashedFile(path, 0) as f:
        f.write(BODY[:1000])
    with HashedFile(path, 1000) as f:
        f.write(memoryview(BODY)[1000:])
        assert f.hexdigest() == SHA
    assert path.read_bytes() == BODY
    with pytest.raises(FileExistsError):
        HashedFile(path, 0)  # O_EXCL: never reused
    with pytest.raises(DownloadError, match="changed while resuming"):
        HashedFile(path, 999)  # not the length an earlier try left
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError):
        HashedFile(tmp_path / "link", len(BODY))  # O_NOFOLLOW
