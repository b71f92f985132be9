"""A newcomer's first commands, as typed, with their common mistakes: `--version`, "did you mean",
logging flags after the subcommand, the dashboard's address where the gRPC API is wanted, `--json`
on the listing commands, and Ctrl+C before a pull starts. No coordinator runs: the HTTP API is a
small stand-in serving the JSON the real one serves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from crowdtrain.coordinator.cli import build_parser, main
from crowdtrain.coordinator.demo import cli_command

STATE = {
    "global_epoch": 3,
    "samples_per_s": 12.5,
    "latest_eval_loss": None,  # NaN before the first checkpoint, as the HTTP API writes it
    "latest_checkpoint_step": -1,
    "peers_by_state": {"ONLINE": 1},
    "total_contributed_samples": 640,
    "run_id": "fake-run",
    "a_field_the_proto_lacks": "skipped",
}
PEERS = [{"peer_id": "abc123", "name": "alice", "state": "ONLINE", "samples_per_s": 12.5, "shard_index": 0}]
ROUTES = {
    "/api/v1/state": STATE,
    "/api/v1/peers": PEERS,
    "/api/v1/checkpoints": [],
    "/api/v1/run": {"run_id": "fake-run", "signing_public_key": "ab" * 32},
}


class _Dashboard(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps(ROUTES[self.path]).encode() if self.path in ROUTES else b"{}"
        self.send_response(200 if self.path in ROUTES else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard() -> Iterator[str]:
    """HOST:PORT of an HTTP server that answers like the coordinator's HTTP API (and HTTP/1 only)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_version(capsys):
    from crowdtrain.peer import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"crowdtrain {__version__}\n"


def test_a_mistyped_subcommand_or_flag_is_named_with_the_closest_one(capsys):
    line = _usage_error(capsys, ["pul"])
    assert "invalid choice: 'pul'" in line and line.endswith("; did you mean pull?")
    line = _usage_error(capsys, ["peer", "--cordinator", "203.0.113.7:50051"])
    assert line == "crowdtrain peer: error: unrecognized argument --cordinator; did you mean --coordinator?"
    # the typo is named, not the required flag its mistyping left out
    line = _usage_error(capsys, ["status", "--coordinater", "203.0.113.7:50051"])
    assert (
        line == "crowdtrain status: error: unrecognized argument --coordinater; did you mean --coordinator?"
    )
    line = _usage_error(capsys, ["invite", "list", "--data-dir", "runs/mine", "--jsn"])
    assert line == "crowdtrain invite list: error: unrecognized argument --jsn; did you mean --json?"
    line = _usage_error(capsys, ["--log-level", "warnin", "status"])
    assert line.endswith("; did you mean warning?")
    # a unique prefix is still a flag, as argparse has always taken it
    args = build_parser("status").parse_args(["status", "--coord", "203.0.113.7:50051"])
    assert args.coordinator == "203.0.113.7:50051"


def test_logging_flags_work_before_or_after_the_subcommand(capsys):
    def parsed(*argv: str):
        args = build_parser(argv[argv.index("status")]).parse_args(list(argv))
        return args.log_level, args.log_format

    tail = ("--coordinator", "203.0.113.7:50051")
    assert parsed("status", *tail) == ("info", "text")
    assert parsed("status", *tail, "--log-format", "json", "--log-level", "debug") == ("debug", "json")
    assert parsed("--log-format", "json", "status", *tail) == ("info", "json")
    assert parsed("--log-level", "error", "status", *tail, "--log-level", "debug") == ("debug", "text")
    assert parsed("-v", "status", *tail) == parsed("status", *tail, "--verbose") == ("debug", "text")
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    assert "--log-format" in capsys.readouterr().out


def test_an_unreachable_coordinator_is_one_plain_line(capsys):
    assert main(["status", "--coordinator", "127.0.0.1:1"]) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert line == (
        "error: coordinator at 127.0.0.1:1 is unreachable: nothing accepts connections on that port; "
        "check the address and that the coordinator is running and reachable from this machine"
    )


def test_the_dashboard_url_given_to_a_peer_says_which_port_to_use_at_once():
    start = time.monotonic()
    result = subprocess.run(
        cli_command("peer", "--coordinator", "http://127.0.0.1:34977/"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    [line] = _error_lines(result.stderr)
    assert line.startswith("error: http://127.0.0.1:34977/ is the coordinator's HTTP address (its dashboard)")
    assert "--coordinator 127.0.0.1:50051" in line and "--grpc-port" in line
    assert time.monotonic() - start < 30, "refused at once, not after the join timeout"


def test_the_http_port_given_to_a_peer_as_host_port_says_which_port_to_use(dashboard: str):
    start = time.monotonic()
    result = subprocess.run(
        cli_command("peer", "--coordinator", dashboard, "--join-timeout-s", "120"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr
    [line] = _error_lines(result.stderr)
    assert f"{dashboard} is the coordinator's HTTP address" in line and "127.0.0.1:50051" in line
    assert "SETTINGS" not in result.stderr and "http1.x" not in line
    assert time.monotonic() - start < 100, "not retried for the whole join timeout"


@pytest.mark.parametrize("form", ["http://{}", "http://{}/", "{}"])
def test_status_takes_the_dashboard_address_in_either_form(capsys, dashboard: str, form: str):
    assert main(["status", "--coordinator", form.format(dashboard)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "run fake-run: global epoch 3, swarm 12.5 samples/s, latest checkpoint eval loss none yet"
    )
    assert "abc123" in out and "alice" in out


def test_status_json_is_one_document_with_stable_keys(capsys, dashboard: str):
    assert main(["status", "--coordinator", f"http://{dashboard}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"summary", "peers"}
    assert doc["summary"]["run_id"] == "fake-run" and doc["summary"]["global_epoch"] == 3
    assert doc["summary"]["peers_by_state"] == {"ONLINE": 1}
    assert "a_field_the_proto_lacks" not in doc["summary"]
    [peer] = doc["peers"]
    assert peer["peer_id"] == "abc123" and peer["state"] == "ONLINE" and peer["loss"] == 0.0
    assert {"version", "reachability", "contributed_samples", "last_seen_unix_s"} <= set(peer)


def test_status_json_writes_a_non_finite_number_as_null():
    from crowdtrain.coordinator.dashboard.render import status_json
    from crowdtrain.protos import coordinator_pb2 as pb

    status = pb.GetStatusResponse()
    status.summary.latest_eval_loss = math.nan
    status.summary.global_epoch = 2**40
    doc = status_json(status)
    assert doc["summary"]["latest_eval_loss"] is None and doc["summary"]["global_epoch"] == 2**40
    json.dumps(doc, allow_nan=False)


def test_checkpoints_json(capsys, dashboard: str):
    from crowdtrain.peer.checkpoints.format import FileEntry
    from crowdtrain.peer.checkpoints.pull import Listed
    from crowdtrain.peer.cli import checkpoints_json

    assert main(["checkpoints", "--coordinator", f"http://{dashboard}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"signing_public_key": "ab" * 32, "checkpoints": []}
    listed = Listed(8, math.nan, 1.5, (FileEntry("config.json", "0" * 64, 100),), "http://h/checkpoints/8")
    assert checkpoints_json([listed], "k")["checkpoints"] == [
        {
            "step": 8,
            "created_unix_s": 1.5,
            "eval_loss": None,
            "size_bytes": 100,
            "url": "http://h/checkpoints/8",
            "files": [{"name": "config.json", "sha256": "0" * 64, "size_bytes": 100}],
        }
    ]


def test_invite_list_json(capsys, tmp_path: Path):
    from crowdtrain.coordinator.admission.invites import InviteBook
    from crowdtrain.coordinator.peers.store import Store

    book = InviteBook(Store(tmp_path / "state.sqlite3", flush_interval_s=0))
    code, invite = book.create(time.time(), 5, 0.0, "lab")
    book.store.close()
    assert main(["invite", "list", "--data-dir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert code not in out, "never the codes"
    assert json.loads(out) == {
        "invites": [
            {
                "invite_id": invite.invite_id,
                "uses_left": 5,
                "expires_unix_s": None,
                "created_unix_s": invite.created_unix_s,
                "revoked": False,
                "note": "lab",
                "state": "usable",
            }
        ]
    }


# Ctrl+C arrives while the module named here is being imported, as a volunteer's early Ctrl+C does
_INTERRUPT_DURING_IMPORT = """
import os, runpy, signal, sys

# a volunteer's terminal delivers Ctrl+C; a shell's background job (`cmd &`, as some CI runners
# start the suite) starts with SIGINT ignored, and Python then installs no handler for it
signal.signal(signal.SIGINT, signal.default_int_handler)
module = sys.argv[1]

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["crowdtrain", *sys.argv[2:]]
runpy.run_module("crowdtrain.coordinator.cli", run_name="__main__")
"""


@pytest.mark.parametrize(
    "module, line",
    [
        ("crowdtrain.peer.settings.commands", "interrupted (Ctrl+C)"),  # the CLI's own imports
        (
            "crowdtrain.peer.checkpoints.pull",
            "interrupted (Ctrl+C); run the same command again to resume the download",
        ),
    ],
)
def test_an_early_ctrl_c_in_pull_is_one_line(tmp_path: Path, module: str, line: str):
    argv = ["pull", "--coordinator", "127.0.0.1:1", "--out", str(tmp_path / "model")]
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_DURING_IMPORT, module, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == line + "\n"
    assert not (tmp_path / "model").exists()


def test_ctrl_c_while_parsing_is_one_line(monkeypatch, capsys):
    from crowdtrain.coordinator import cli

    def interrupted(command=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["pull", "--coordinator", "127.0.0.1:1", "--out", "x"]) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl+C)\n"
