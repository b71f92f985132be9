"""The one HTTP downloader: verified, atomic, resumable, and bounded by what the listing promised."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from crowdtrain.peer.download import DownloadCorrupted, DownloadError, download

BODY = bytes(range(256)) * 4000  # ~1 MB
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # /good, /huge (more than promised); Range honoured on /good
            body = BODY if self.path == "/good" else BODY * 3
            start = 0
            if self.path == "/good" and (rng := self.headers.get("Range", "")).startswith("bytes="):
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
