"""The dashboard's address given where the gRPC API is wanted: the coordinator's HTTP API says where
its gRPC API is (/api/v1/grpc), a client asks it and goes on there, and a hostile or malformed
answer is refused with the line that names the gRPC port. In process, on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.peer.checks import NetworkValueError
from crowdtrain.peer.link import client as client_module
from crowdtrain.peer.link.client import (
    CoordinatorAddressError,
    CoordinatorClient,
    CoordinatorSpeaksHttp,
    checked_grpc_address,
    http_port_refusal,
    parse_address,
)
from crowdtrain.peer.link.tls import ClientTls

DISCOVERED = "the coordinator's gRPC API is at {} (from its dashboard)"


@pytest.fixture(autouse=True)
def nothing_remembered(monkeypatch):
    """Each test starts as a fresh process would: no dashboard asked yet."""
    monkeypatch.setattr(client_module, "_RESOLVED", {})


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[WebServer, str]]:
    """The coordinator's HTTP server and gRPC API; yields (the web server, gRPC HOST:PORT), the gRPC
    address not yet announced on the HTTP API."""
    store = Store(tmp_path / "s.sqlite3")
    root = tmp_path / "ckpt"
    web = WebServer(WebContext(tmp_path, frozenset(), root, "{}", store, lambda: None), "127.0.0.1", 0)
    web.start()
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 1, f"http://127.0.0.1:{web.port}", root),
        store,
        HealthSettings(2.0, 10.0),
        initial_peers=list,
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    try:
        yield web, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()
        web.shutdown()
        store.close()


def _discovered(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "(from its dashboard)" in r.getMessage()]


def test_the_http_api_says_where_the_grpc_api_is_once_it_is_up(coordinator):
    web, grpc_address = coordinator
    url = f"http://127.0.0.1:{web.port}/api/v1/grpc"
    with pytest.raises(urllib.error.HTTPError) as early:
        urllib.request.urlopen(url, timeout=10)
    assert early.value.code == 503 and early.value.headers["Retry-After"] == "2"
    web.announce_grpc(grpc_address, tls=False)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.read()) == {"grpc": grpc_address, "tls": False}


@pytest.mark.parametrize(
    "form", ["http://127.0.0.1:{}", "http://127.0.0.1:{}/", "HTTP://127.0.0.1:{}/peer/x"]
)
def test_a_client_given_the_dashboard_url_goes_on_at_the_grpc_api(coordinator, caplog, form: str):
    web, grpc_address = coordinator
    web.announce_grpc(grpc_address, tls=False)
    given = form.format(web.port)
    assert parse_address(given) == given  # the peer's early check lets it through
    with caplog.at_level(logging.INFO, logger="crowdtrain.peer.link.client"):
        with CoordinatorClient(given) as client:
            assert client.address == grpc_address
            assert client.list_checkpoints().checkpoints == []
        with CoordinatorClient(given) as again:  # asked once per process
            assert again.address == grpc_address
    assert _discovered(caplog) == [DISCOVERED.format(grpc_address)]


def test_the_http_port_given_as_host_port_goes_on_at_the_grpc_api(coordinator, caplog):
    web, grpc_address = coordinator
    web.announce_grpc(grpc_address, tls=False)
    given = f"127.0.0.1:{web.port}"
    with caplog.at_level(logging.INFO, logger="crowdtrain.peer.link.client"):
        with CoordinatorClient(given) as client:
            assert client.list_checkpoints().checkpoints == []  # answered HTTP/1, then asked there
            assert client.address == grpc_address
        with CoordinatorClient(given) as again:  # remembered: straight to the gRPC API
            assert again.address == grpc_address
    assert _discovered(caplog) == [DISCOVERED.format(grpc_address)]


def test_a_coordinator_without_the_answer_gets_the_refusal_naming_the_grpc_port(coordinator):
    web, _ = coordinator  # the gRPC address never announced: 503, as an older coordinator's 404
    given = f"http://127.0.0.1:{web.port}"
    with pytest.raises(CoordinatorAddressError) as refused:
        CoordinatorClient(given)
    assert str(refused.value) == http_port_refusal(given)


class _Hostile(BaseHTTPRequestHandler):
    answer = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(type(self).answer)
        except OSError:  # the client stopped reading at its cap
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile() -> Iterator[type[_Hostile]]:
    """An HTTP/1 server at `handler.address` answering every GET with `handler.answer`."""
    handler = type("Handler", (_Hostile,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


HOSTILE_ANSWERS = {
    "huge": json.dumps({"grpc": "127.0.0.1:50051", "tls": False, "pad": "x" * (1 << 20)}).encode(),
    "not json": b"<html>hello</html>",
    "not an object": b'["127.0.0.1:50051"]',
    "port 0": b'{"grpc": "127.0.0.1:0", "tls": false}',
    "port 65536": b'{"grpc": "127.0.0.1:65536", "tls": false}',
    "no port": b'{"grpc": "127.0.0.1", "tls": false}',
    "unicode digits": '{"grpc": "127.0.0.1:５００５１", "tls": false}'.encode(),
    "escape sequences": b'{"grpc": "\\u001b[31mevil:50051", "tls": false}',
    "a path": b'{"grpc": "evil.example/x:50051", "tls": false}',
    "a URL": b'{"grpc": "http://evil.example:50051", "tls": false}',
    "tls not a bool": b'{"grpc": "127.0.0.1:50051", "tls": "no"}',
    "grpc not a string": b'{"grpc": 50051, "tls": false}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ANSWERS))
def test_a_hostile_answer_is_refused_with_the_line_naming_the_grpc_port(hostile, caplog, kind: str):
    hostile.answer = HOSTILE_ANSWERS[kind]
    given = f"http://{hostile.address}/"
    with pytest.raises(CoordinatorAddressError) as refused:
        CoordinatorClient(given)
    assert str(refused.value) == http_port_refusal(given)
    with pytest.raises(CoordinatorSpeaksHttp) as as_host_port:  # the HTTP port given as HOST:PORT
        with CoordinatorClient(hostile.address) as client:
            client.list_checkpoints()
    assert str(as_host_port.value) == http_port_refusal(hostile.address)
    assert not _discovered(caplog)


def test_tls_asked_for_is_never_dropped_for_the_dashboards_word(hostile):
    hostile.answer = b'{"grpc": "127.0.0.1:50051", "tls": false}'
    with pytest.raises(CoordinatorAddressError, match="--tls-ca FILE asks for TLS|--tls asks for TLS"):
        CoordinatorClient(f"http://{hostile.address}", tls=ClientTls(enabled=True))
    hostile.answer = b'{"grpc": "127.0.0.1:50051", "tls": true}'  # a plaintext dashboard naming a TLS API
    with pytest.raises(
        CoordinatorAddressError, match="takes TLS: pass --coordinator 127.0.0.1:50051 with --tls"
    ):
        CoordinatorClient(f"http://{hostile.address}")


@pytest.mark.parametrize(
    ("given", "checked"),
    [
        ("203.0.113.7:50051", "203.0.113.7:50051"),
        ("coordinator.example.org:1", "coordinator.example.org:1"),
        ("localhost:65535", "localhost:65535"),
        ("[2001:db8::1]:50051", "[2001:db8::1]:50051"),
        ("2001:db8::1:50051", "[2001:db8::1]:50051"),  # unbracketed, as `HOST:PORT` with an IPv6 host
    ],
)
def test_a_plain_host_and_port_pass(given: str, checked: str):
    assert checked_grpc_address(given) == checked


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ":50051",
        "host:",
        "host:-1",
        "host:+1",
        "-host:1",
        "host_name:1",
        "a..b:1",
        "[host]:1",
        "[fe80::1%eth0]:1",
        "a" * 300 + ":1",
        "host :1",
        "host\n:1",
        None,
        50051,
    ],
)
def test_anything_else_is_refused(bad):
    with pytest.raises(NetworkValueError):
        checked_grpc_address(bad)


@pytest.mark.parametrize("bad", ["http://", "http://:8080", "https://host:99999", "http://host:port"])
def test_a_dashboard_url_without_a_host_or_with_a_bad_port_is_refused_at_once(bad: str):
    with pytest.raises(CoordinatorAddressError, match="neither HOST:PORT"):
        parse_address(bad)
