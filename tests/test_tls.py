"""TLS for gRPC and HTTP, so a volunteer knows whom it talks to: a coordinator started with a certificate made
by the test serves both only over TLS; a client that trusts it gets through, and one that talks
plaintext or does not trust the certificate fails at once with an error that says why."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import ServerTls, create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.app import Coordinator
from crowdtrain.coordinator.config import CoordinatorConfig
from crowdtrain.coordinator.demo import cli_command
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer.checkpoints.format import CheckpointMeta, list_checkpoints
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorUnavailable
from crowdtrain.peer.link.tls import ClientTls, TlsConfigError, server_ssl_context

from tests.certs import make_self_signed
from tests.identities import signed_join


@pytest.fixture
def tls_site(tmp_path: Path):
    cert, key = make_self_signed(tmp_path / "tls")
    store = Store(tmp_path / "s.sqlite3")
    health = HealthSettings(2.0, 10.0)
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 3)
    (staging / "model.safetensors").write_bytes(b"weights")
    archive.finalize(staging, root, CheckpointMeta("ct_test", 3, 768, 4.0, 1.0, "m", None, ()))

    def status():
        return build_status(
            time.time(), "ct_test", store.list_peers(), {}, health, SwarmProgress(), list_checkpoints(root)
        )

    web = WebServer(
        WebContext(tmp_path, frozenset(), root, "{}", store, status),
        "127.0.0.1",
        0,
        ssl_context=server_ssl_context(str(cert), str(key)),
    ).start()
    base = f"https://127.0.0.1:{web.port}"
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 1, base, root), store, health, initial_peers=list, status=status
    )
    server, port = create_server(servicer, "127.0.0.1", 0, tls=ServerTls(str(cert), str(key)))
    server.start()
    try:
        yield f"127.0.0.1:{port}", base, cert, web
    finally:
        server.stop(0)
        web.shutdown()
        store.close()


def test_a_client_trusting_the_certificate_gets_through(tls_site):
    address, base, cert, web = tls_site
    assert web.scheme == "https"
    tls = ClientTls.from_flags(False, str(cert))
    with CoordinatorClient(address, tls=tls) as client:
        joined = client.join(signed_join(name="alice", device="cpu"))
        assert joined.session_id and joined.settings.http_base_url == base
        assert [c.step for c in client.list_checkpoints().checkpoints] == [3]
        assert client.get_status().summary.run_id == "ct_test"
    context = tls.ssl_context()
    with urllib.request.urlopen(
        f"{base}/checkpoints/latest/model.safetensors", context=context, timeout=10
    ) as r:
        assert r.read() == b"weights"
    with urllib.request.urlopen(f"{base}/api/v1/checkpoints", context=context, timeout=10) as r:
        assert json.loads(r.read())[0]["step"] == 3


@pytest.mark.parametrize("client_tls", ["plaintext", "system store", "another CA"])
def test_grpc_clients_that_do_not_trust_the_server_fail_fast_and_say_why(tls_site, tmp_path, client_tls):
    address, _, _, _ = tls_site
    tls = {
        "plaintext": None,
        "system store": ClientTls.from_flags(True, ""),
        "another CA": ClientTls.from_flags(False, str(make_self_signed(tmp_path / "other")[0])),
    }[client_tls]
    start = time.monotonic()
    with CoordinatorClient(address, rpc_timeout_s=10, tls=tls) as client:
        with pytest.raises(CoordinatorUnavailable) as e:
            client.join(signed_join(name="bob", device="cpu"))
    assert time.monotonic() - start < 8, "failed only at the deadline: a hang, not a refusal"
    message = str(e.value)
    if client_tls == "plaintext":
        assert "--tls-ca" in message and "TLS" in message, message
    else:
        assert "certificate" in message and "--tls-ca" in message, message


def test_https_clients_that_do_not_trust_the_server_fail(tls_site, tmp_path):
    _, base, _, _ = tls_site
    with pytest.raises(urllib.error.URLError) as e:
        urllib.request.urlopen(f"{base}/healthz", context=ssl.create_default_context(), timeout=10)
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
    plain = base.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{plain}/healthz", timeout=10).read()


def test_the_status_command_takes_tls_ca(tls_site):
    address, _, cert, _ = tls_site
    ok = subprocess.run(
        cli_command("status", "--coordinator", address, "--tls-ca", str(cert)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "run ct_test" in ok.stdout, ok.stderr
    plain = subprocess.run(
        cli_command("status", "--coordinator", address), capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 1 and "--tls-ca" in plain.stderr, plain.stderr


def test_the_coordinator_checks_its_certificate_before_starting(tmp_path: Path):
    cert, key = make_self_signed(tmp_path / "tls")
    other_cert, _ = make_self_signed(tmp_path / "other")
    for tls_cert, tls_key, error in (
        (str(cert), "", "go together"),
        (str(cert), str(tmp_path / "missing.pem"), "cannot read the private key"),
        (str(other_cert), str(key), "do not form a usable pair"),
    ):
        with pytest.raises(TlsConfigError, match=error):
            Coordinator(CoordinatorConfig(data_dir=str(tmp_path / "run"), tls_cert=tls_cert, tls_key=tls_key))
    assert Coordinator(CoordinatorConfig(data_dir=str(tmp_path), tls_cert=str(cert), tls_key=str(key))).tls
