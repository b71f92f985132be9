"""Local control of a running peer (peer/volunteer/control.py): the socket and its protocol in
process (modes, garbage, oversized and slow requests, the uid check with injected credentials),
pause / resume / finish-and-pause as decisions, live settings by `ctl set` and by SIGHUP re-reading
peer.toml, the systemd units, and the exit status of a peer the run refused. The same commands
against a real running peer: tests/test_volunteer.py (`ctl pause`, `ctl status --json`, `ctl resume`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from crowdtrain.coordinator.config import CoordinatorConfig
from crowdtrain.peer.cli import exit_code
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.link.heartbeat import StatsBox
from crowdtrain.peer.machine.pause import (
    CTL_PAUSE_REASON,
    FINISHED_ROUND_REASON,
    PauseMonitor,
    PauseSettings,
    Reading,
    round_finished,
)
from crowdtrain.peer.settings.commands import CtlConfig, PeerConfig
from crowdtrain.peer.settings.layered import ConfigSource
from crowdtrain.peer.settings.service import coordinator_unit_text, peer_unit_text
from crowdtrain.peer.volunteer import control
from crowdtrain.peer.volunteer.control import (
    ControlError,
    ControlServer,
    PeerControl,
    ask,
    caller_uid,
    find_peer,
    live_changes,
    parse_assignment,
    parse_request,
    uid_allowed,
)
from crowdtrain.peer.volunteer.pause_gate import PauseGate
from crowdtrain.peer.volunteer.trainer import PeerRefused

COORDINATOR = "203.0.113.7:50051"


@pytest.fixture
def short_dir():
    """A directory with a short path (a Unix socket's path is at most ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    try:
        yield path / "ctl"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def echo(request: dict) -> dict:
    return {"ok": True, "echo": request}


@pytest.fixture
def server(short_dir: Path):
    srv = ControlServer(echo, short_dir).start()
    try:
        yield srv
    finally:
        srv.shutdown()


def raw_exchange(path: Path, data: bytes, close_write: bool = True) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        return json.loads(sock.makefile("rb").readline())


# ---------------------------------------------------------------- the socket


def test_the_socket_is_the_user_s_alone_and_answers_one_json_line(server: ControlServer, short_dir: Path):
    assert stat.S_IMODE(short_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(server.path.stat().st_mode)
    assert server.path == short_dir / f"peer-{os.getpid()}.sock"
    assert ask(server.path, {"action": "status"}) == {"ok": True, "echo": {"action": "status"}}
    assert find_peer(0, short_dir) == server.path == find_peer(os.getpid(), short_dir)
    server.shutdown()
    assert not server.path if server.path is None else not server.path.exists()
    with pytest.raises(ControlError, match="no crowdtrain peer of yours runs"):
        find_peer(0, short_dir)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xff\xfe not utf-8\n", "not one line of JSON"),
        (b"{not json\n", "not one line of JSON"),
        (b"[1, 2]\n", 'needs an "action"'),
        (b'{"action": "reboot"}\n', 'needs an "action"'),
        (b'{"action": "set"}\n', "KEY=VALUE"),
        (b"x" * (control.MAX_REQUEST_BYTES + 10), "over 4096 bytes"),
        (b"", "not one line of JSON"),
    ],
)
def test_garbage_gets_an_error_reply_and_the_server_goes_on(server: ControlServer, data: bytes, error: str):
    reply = raw_exchange(server.path, data)
    assert reply["ok"] is False and error in reply["error"], reply
    assert ask(server.path, {"action": "status"})["ok"] is True  # still serving


def test_a_caller_that_never_finishes_its_line_is_cut_off(server: ControlServer, monkeypatch):
    monkeypatch.setattr(control, "IO_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    reply = raw_exchange(server.path, b'{"action": "sta', close_write=False)
    assert reply["ok"] is False and "no complete line" in reply["error"]
    assert time.monotonic() - t0 < 5
    assert ask(server.path, {"action": "status"})["ok"] is True


def test_a_handler_that_fails_does_not_end_the_server(short_dir: Path, caplog):
    def broken(request: dict) -> dict:
        raise RuntimeError("boom")

    srv = ControlServer(broken, short_dir).start()
    try:
        with caplog.at_level(logging.ERROR):
            reply = ask(srv.path, {"action": "status"})
        assert reply == {"ok": False, "error": "the peer failed to answer; its log has the details"}
        assert "boom" in caplog.text
        assert ask(srv.path, {"action": "pause"})["ok"] is False  # answered again
    finally:
        srv.shutdown()


def test_only_the_peer_s_own_uid_may_control_it(server: ControlServer):
    assert uid_allowed(1000, 1000) and not uid_allowed(1001, 1000) and not uid_allowed(0, 1000)
    assert uid_allowed(None, 1000), "no SO_PEERCRED: the 0700 directory is the guard"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        if hasattr(socket, "SO_PEERCRED"):
            assert caller_uid(sock) == os.getuid()  # the server's side sees the same of us


def test_a_caller_of_another_uid_is_refused(server: ControlServer, monkeypatch):
    monkeypatch.setattr(control, "caller_uid", lambda conn: os.getuid() + 1)
    reply = ask(server.path, {"action": "status"})
    assert reply == {"ok": False, "error": "this peer takes commands from its own user only"}


def test_a_loose_or_stale_directory_is_tightened_and_cleaned(short_dir: Path):
    short_dir.mkdir(mode=0o755)
    short_dir.chmod(0o755)
    (short_dir / "peer-999999999.sock").write_text("")  # a peer killed with kill -9 long ago
    srv = ControlServer(echo, short_dir).start()
    try:
        assert stat.S_IMODE(short_dir.stat().st_mode) == 0o700
        assert sorted(p.name for p in short_dir.iterdir()) == [f"peer-{os.getpid()}.sock"]
    finally:
        srv.shutdown()


# ---------------------------------------------------------------- pure decisions


def test_request_and_assignment_parsing():
    assert parse_request(b'{"action": "finish-and-pause"}') == {"action": "finish-and-pause"}
    assert parse_assignment("threads=4") == ("threads", 4)
    assert parse_assignment("schedule = 22:00-08:00") == ("schedule", " 22:00-08:00")
    assert parse_assignment("pause-when-busy=50") == ("pause_when_busy", 50.0)
    assert parse_assignment("pause_on_battery=yes") == ("pause_on_battery", True)
    with pytest.raises(ControlError, match="batch_size cannot change while the peer runs.*threads"):
        parse_assignment("batch_size=4")
    with pytest.raises(ControlError, match="'thread' is not a peer setting"):
        parse_assignment("thread=4")
    with pytest.raises(ControlError, match="must be a number"):
        parse_assignment("threads=many")
    with pytest.raises(ControlError, match="not KEY=VALUE"):
        parse_assignment("threads")


def test_live_changes_split_what_applies_now_from_what_waits_for_a_restart():
    old = PeerConfig(coordinator=COORDINATOR, threads=1)
    new = dataclasses.replace(old, threads=3, schedule="09:00-17:00", batch_size=8, name="bob")
    assert live_changes(old, new) == ({"schedule": "09:00-17:00", "threads": 3}, ("name", "batch_size"))
    assert live_changes(old, old) == ({}, ())


def test_finish_and_pause_waits_for_the_round_to_turn():
    assert not round_finished(None, 7)
    assert not round_finished(7, 7)
    assert round_finished(7, 8) and round_finished(7, 12)


def monitor() -> PauseMonitor:
    return PauseMonitor(PauseSettings(), sampler=lambda gpu: Reading())


def test_the_gate_pauses_once_the_epoch_it_was_asked_in_turned():
    gate = PauseGate(monitor(), StatsBox(), stop_event=None)
    gate.finish_then_pause(7)
    assert not gate.paused(7), "still computing: the round of epoch 7 is not finished"
    assert gate.paused(8) and gate.monitor.decision.reason == FINISHED_ROUND_REASON
    assert gate.finish_after_epoch is None
    gate.resume()
    assert not gate.paused(8)
    gate.finish_then_pause(8)
    gate.resume()  # resume forgets a pending finish-and-pause
    assert not gate.paused(9)


class FakeVolunteer:
    """What PeerControl reads of a Volunteer."""

    def __init__(self, config: PeerConfig, epoch: int | None = 7):
        self.config, self.name = config, "alice"
        self.pauser = monitor()
        self.stats = StatsBox()
        self.stats.update(
            phase="training", local_epoch=epoch or 0, samples_total=640, samples_per_s=float("nan")
        )
        self.pause_gate = PauseGate(self.pauser, self.stats, stop_event=None)
        self.heartbeat = types.SimpleNamespace(
            answer=types.SimpleNamespace(accepted_samples=512, share=0.5, rank=1, ranked_peers=2)
        )
        self.opt = None if epoch is None else types.SimpleNamespace(local_epoch=epoch)
        self.upload_limit = None  # started without --max-upload-mbps
        self.dht = object()  # in the swarm


def test_pause_stops_at_once_and_finish_and_pause_after_the_round():
    v = FakeVolunteer(PeerConfig(coordinator=COORDINATOR))
    ctl = PeerControl(v)
    assert "training on until epoch 7 turns" in ctl.handle({"action": "finish-and-pause"})["message"]
    assert not v.pauser.decision.paused and v.pause_gate.finish_after_epoch == 7
    status = ctl.status()
    assert status["phase"] == "training" and status["finish_and_pause_after_epoch"] == 7
    assert "computing stops now" in ctl.handle({"action": "pause"})["message"]
    assert v.pauser.decision.reason == CTL_PAUSE_REASON and v.pause_gate.finish_after_epoch is None
    assert "already paused" in ctl.handle({"action": "pause"})["message"]
    status = ctl.status()
    assert (status["phase"], status["pause_reason"]) == ("pausing", CTL_PAUSE_REASON)
    assert status["accepted_samples"] == 512 and "rank 1 of 2" in status["standing"]
    assert status["samples_per_s"] is None, "a NaN rate is null, never invalid JSON"
    json.dumps(status, allow_nan=False)
    assert ctl.handle({"action": "resume"})["message"] == "resumed" and not v.pauser.decision.paused
    # not training yet: nothing accumulated, so finish-and-pause is a pause at once
    v.opt = None
    ctl.handle({"action": "finish-and-pause"})
    assert v.pauser.decision.paused


def test_resume_says_when_an_automatic_rule_still_pauses():
    v = FakeVolunteer(PeerConfig(coordinator=COORDINATOR))
    v.pauser._auto = v.pauser._auto.__class__(True, "outside schedule 22:00-08:00 (resumes at 22:00)")
    reply = PeerControl(v).handle({"action": "resume"})
    assert reply["message"] == "resumed; still paused: outside schedule 22:00-08:00 (resumes at 22:00)"


def test_set_changes_live_settings_and_torch_s_threads_on_the_loop_s_thread(monkeypatch):
    v = FakeVolunteer(PeerConfig(coordinator=COORDINATOR, threads=1))
    ctl = PeerControl(v)
    reply = ctl.handle({"action": "set", "setting": "threads=3"})
    assert reply["message"].startswith("threads: 1 -> 3") and v.config.threads == 3
    calls = []
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(set_num_threads=calls.append))
    ctl.apply_in_loop()
    ctl.apply_in_loop()
    assert calls == [3]
    ctl.handle({"action": "set", "setting": "pause_when_busy=40"})
    ctl.handle({"action": "set", "setting": "schedule=09:00-17:00"})
    assert v.pauser.settings.busy_threshold_pct == 40 and str(v.pauser.settings.schedule[0]) == "09:00-17:00"
    with pytest.raises(CrowdtrainError, match="--schedule window"):
        ctl.handle({"action": "set", "setting": "schedule=25:00-08:00"})
    with pytest.raises(ControlError, match="threads must be 1 or more"):
        ctl.handle({"action": "set", "setting": "threads=0"})
    assert (v.config.schedule, v.config.threads) == ("09:00-17:00", 3), "a refused value changes nothing"


def test_the_upload_cap_changes_live_for_every_process_sharing_it():
    from crowdtrain.peer.machine.bandwidth import SharedTokenBucket, UploadLimit, upload_cap

    v = FakeVolunteer(PeerConfig(coordinator=COORDINATOR, max_upload_mbps=8.0))
    v.upload_limit = UploadLimit(upload_cap(8.0), clock=lambda: 100.0)
    try:
        PeerControl(v).handle({"action": "set", "setting": "max_upload_mbps=80"})
        assert v.upload_limit.cap.mbps == pytest.approx(80) and v.config.max_upload_mbps == 80
        bucket: SharedTokenBucket = v.upload_limit.bucket
        bucket.cap = upload_cap(8.0)  # a forked process's own copy, from before the change
        bucket.reserve(10_000_000)  # 10 MB at 80 Mbit/s (10 MB/s): about 1 s of deficit
        assert bucket.cap.mbps == pytest.approx(80), "it read the new rate from the shared cells"
        # the tokens left of the old burst, then the deficit paid at 10 MB/s, not at 1 MB/s
        assert bucket.reserve(1) == pytest.approx((10_000_000 - upload_cap(8.0).burst_bytes) / 10e6, rel=0.01)
        with pytest.raises(CrowdtrainError, match="below 0.1 Mbit/s"):
            PeerControl(v).handle({"action": "set", "setting": "max_upload_mbps=0.01"})
    finally:
        v.upload_limit.bucket.close()
    v.upload_limit = None  # started without a cap: one cannot be added to hivemind's running processes
    with pytest.raises(ControlError, match="started without an upload cap.*restart the peer"):
        PeerControl(v).handle({"action": "set", "setting": "max_upload_mbps=5"})
    v.dht = None  # not in the swarm yet: the new value is what it will join with
    PeerControl(v).handle({"action": "set", "setting": "max_upload_mbps=5"})
    assert v.config.max_upload_mbps == 5


def test_sighup_reads_peer_toml_again_and_applies_the_live_keys(tmp_path: Path, caplog):
    toml = tmp_path / "peer.toml"
    toml.write_text(f'coordinator = "{COORDINATOR}"\nthreads = 1\n')
    source = ConfigSource(PeerConfig, {"name": "alice"}, {}, toml, required=True)
    config, _ = source.load()
    v = FakeVolunteer(config)
    ctl = PeerControl(v, source)
    toml.write_text(
        f'coordinator = "{COORDINATOR}"\nthreads = 2\nschedule = "22:00-08:00"\nbatch_size = 4\nname = "bob"\n'
    )
    restore = control.install_reload_signal(ctl)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not ctl.reload_requested.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        restore()
    with caplog.at_level(logging.INFO):
        ctl.tick()  # what the control thread does within ACCEPT_POLL_S
    assert (v.config.threads, v.config.schedule, v.config.batch_size) == (2, "22:00-08:00", 0)
    assert v.config.name == "alice", "a flag given at the start still wins over the file"
    assert v.pauser.settings.schedule and "these wait for a restart: batch_size" in caplog.text
    toml.write_text("threads = [\n")  # broken: the running settings stay
    ctl.reload()
    assert v.config.threads == 2 and "not reloaded" in caplog.text


# ---------------------------------------------------------------- the units and the exit status


def test_the_peer_unit_runs_peer_toml_reloads_on_sighup_and_leaves_a_refused_peer_stopped(tmp_path: Path):
    text = peer_unit_text(tmp_path / "peer.toml", COORDINATOR, "/usr/bin/python3")
    assert (
        f'ExecStart="/usr/bin/python3" "-m" "crowdtrain.coordinator.cli" "peer" "--config={tmp_path}/peer.toml"'
        in text
    )
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "Restart=on-failure" in text and "RestartPreventExitStatus=3" in text
    unit = coordinator_unit_text(CoordinatorConfig(data_dir="runs/mine"), "/usr/bin/python3", "/srv/50%")
    assert "WorkingDirectory=/srv/50%%" in unit and "ExecReload" not in unit
    if shutil.which("systemd-analyze"):
        path = tmp_path / "crowdtrain-peer.service"
        path.write_text(text)
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0, verify.stderr


def test_a_peer_the_run_refused_exits_3_and_other_errors_1(capsys):
    def refused() -> int:
        raise PeerRefused("coordinator at x refused: PERMISSION_DENIED: banned")

    def failed() -> int:
        raise CrowdtrainError("something a restart may fix")

    assert exit_code(refused) == 3 and exit_code(failed) == 1
    assert "error: coordinator at x refused: PERMISSION_DENIED: banned" in capsys.readouterr().err


def test_ctl_without_a_peer_says_how_to_start_one(monkeypatch, short_dir: Path):
    monkeypatch.setattr(control, "control_dir", lambda: short_dir)
    config = CtlConfig(action="status")
    with pytest.raises(ControlError, match="start one with `crowdtrain peer`"):
        control.run_ctl(config)
    with pytest.raises(ControlError, match="cannot change while the peer runs"):
        control.run_ctl(CtlConfig(action="set", setting="seed=3"))
    with pytest.raises(ControlError, match="takes no"):
        control.run_ctl(CtlConfig(action="pause", setting="threads=2"))


def test_a_join_the_run_refuses_ends_the_peer_with_exit_status_3(monkeypatch):
    import grpc
    from crowdtrain.peer.link.client import CoordinatorRejected
    from crowdtrain.peer.volunteer.trainer import Volunteer

    volunteer = Volunteer(PeerConfig(coordinator="127.0.0.1:1", name="alice"))
    identity = types.SimpleNamespace(signed_join=lambda request: request)
    try:
        for code, refused in (
            (grpc.StatusCode.PERMISSION_DENIED, True),
            (grpc.StatusCode.INVALID_ARGUMENT, False),
        ):

            def join(request, code=code):
                raise CoordinatorRejected(f"coordinator at 127.0.0.1:1 refused: {code.name}: no", code)

            monkeypatch.setattr(volunteer.client, "join", join)
            with pytest.raises(CrowdtrainError) as raised:
                volunteer._ask_to_join(identity, "cpu")
            assert isinstance(raised.value, PeerRefused) == refused
            assert exit_code(lambda e=raised.value: (_ for _ in ()).throw(e)) == (3 if refused else 1)
    finally:
        volunteer.client.close()


def test_coordinator_install_service_writes_its_unit(tmp_path: Path, monkeypatch, capsys):
    from crowdtrain.coordinator.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    argv = [
        "coordinator",
        "--data-dir",
        "runs/mine",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--install-service",
    ]
    assert main(argv) == 0
    unit = tmp_path / "xdg" / "systemd" / "user" / "crowdtrain-coordinator.service"
    assert f"wrote {unit}" in capsys.readouterr().out and unit.stat().st_mode & 0o777 == 0o600
    text = unit.read_text()
    assert '"coordinator" "--data-dir=runs/mine" "--grpc-port=0" "--http-port=0"' in text
    assert f"WorkingDirectory={tmp_path}" in text and not (tmp_path / "runs").exists(), "no run is made"
