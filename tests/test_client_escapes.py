"""A hostile coordinator's words (gRPC status details, HTTP reasons, the
key it claims) must not reach the volunteer's terminal raw: no escape sequence retitles, clears or
recolours it. An in-process gRPC server and an HTTP server on 127.0.0.1:0; the real CLI, in process."""

from __future__ import annotations

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from crowdtrain.coordinator import cli
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected
from crowdtrain.peer.link.download import DownloadError, download
from crowdtrain.protos import coordinator_pb2 as pb
from crowdtrain.protos import coordinator_pb2_grpc as pb_grpc

ESCAPES = "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mred\u202e\r\nforged log line"


def _raw(text: str) -> bool:
    return any(c in text for c in ("\x1b", "\x07", "\r", "\u202e"))


class Hostile(pb_grpc.CoordinatorServicer):
    def ListCheckpoints(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, ESCAPES)

    def GetStatus(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, ESCAPES)


class ClaimsAnEscapeKey(pb_grpc.CoordinatorServicer):
    def ListCheckpoints(self, request, context):
        return pb.ListCheckpointsResponse(signing_public_key=ESCAPES)


@pytest.fixture
def grpc_address():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_grpc_error_details_are_cleaned_before_any_message(grpc_address):
    with CoordinatorClient(grpc_address(Hostile())) as client:
        with pytest.raises(CoordinatorRejected) as refused:
            client.list_checkpoints()
    message = str(refused.value)
    assert not _raw(message) and "PWNED-TITLE" in message and "forged log line" in message


@pytest.mark.parametrize("command", ["pull", "status", "checkpoints"])
def test_the_cli_prints_a_hostile_coordinators_error_clean(grpc_address, capsys, tmp_path: Path, command):
    address = grpc_address(Hostile())
    args = [command, "--coordinator", address] + (["--out", str(tmp_path / "m")] if command == "pull" else [])
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert not _raw(captured.err) and not _raw(captured.out)
    assert captured.err.startswith("error: ") and "PWNED-TITLE" in captured.err


def test_the_key_a_coordinator_claims_is_shown_clean(grpc_address, capsys):
    assert cli.main(["checkpoints", "--coordinator", grpc_address(ClaimsAnEscapeKey())]) == 0
    out = capsys.readouterr().out
    assert not _raw(out) and "PWNED-TITLE" in out


def test_an_http_reason_phrase_is_cleaned(tmp_path: Path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            # one latin-1 status line: no CR LF (it would end it), no U+202E (not latin-1)
            self.send_response(403, "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mred")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with pytest.raises(DownloadError) as failed:
            download(f"http://127.0.0.1:{httpd.server_address[1]}/data/x", tmp_path / "x")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert failed.value.http_status == 403
    assert not _raw(str(failed.value)) and "PWNED-TITLE" in str(failed.value)
