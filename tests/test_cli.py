"""The real `crowdtrain` CLI on bad input: one clear `error:` line, exit 1, nothing half-written."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crowdtrain.coordinator.demo import cli_command
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.settings.layered import read_config_file


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout_s)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from crowdtrain.coordinator.cli import main\n"
        "try:\n    main(['coordinator', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'hivemind' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--checkpoint-interval-s" in result.stdout


def test_a_volunteer_s_command_loads_no_coordinator_module_but_the_entry_point():
    """`crowdtrain peer` starts in the one console script, crowdtrain.coordinator.cli, which mounts
    the participant's commands (crowdtrain.peer.cli); nothing else of the coordinator loads, not
    even its settings."""
    code = (
        "import sys\n"
        "from crowdtrain.coordinator.cli import main\n"
        "try:\n    main(['--log-format', 'json', 'peer', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('crowdtrain.coordinator')), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--coordinator" in result.stdout
    assert result.stderr.strip() == "['crowdtrain.coordinator', 'crowdtrain.coordinator.cli']"


def test_peer_with_a_wrong_address_says_what_to_check():
    result = run_cli("peer", "--coordinator", "127.0.0.1:1", "--join-timeout-s", "3")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "127.0.0.1:1" in line and "check the address" in line


def test_a_peer_runs_at_low_priority_by_default():
    """Polite by default: the peer lowers its own CPU priority (--nice 10) before anything starts,
    so the hivemind processes it forks inherit it. Watched while it tries an unreachable address."""
    command = cli_command("peer", "--coordinator", "127.0.0.1:1", "--join-timeout-s", "20")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, expected = [], min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)  # on top of the test's own
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and expected not in seen:
            seen.append(os.getpriority(os.PRIO_PROCESS, proc.pid))
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert expected in seen, f"niceness seen: {sorted(set(seen))}, expected {expected}"
    result = run_cli("peer", "--coordinator", "127.0.0.1:1", "--nice", "25")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "--nice must be 0 to 19" in line


def test_peer_with_a_malformed_address():
    result = run_cli("peer", "--coordinator", "example.org")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "HOST:PORT" in line


def test_peer_settings_come_from_flags_then_environment_then_file(tmp_path: Path):
    """`crowdtrain peer --print-config`: the effective settings and where each came from."""
    config = tmp_path / "peer.toml"
    config.write_text('coordinator = "file.example:7000"\nthreads = 3\nbatch_size = 4\n')
    env = os.environ | {"CROWDTRAIN_THREADS": "2", "CROWDTRAIN_CLIENT_MODE": "true"}
    result = subprocess.run(
        cli_command("peer", "--config", str(config), "--batch-size", "8", "--print-config"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "'file.example:7000'" in rows["coordinator"] and f"(file {config})" in rows["coordinator"]
    assert " 2 " in rows["threads"] and "(env CROWDTRAIN_THREADS)" in rows["threads"]
    assert " 8 " in rows["batch_size"] and "(flag)" in rows["batch_size"]
    assert "True" in rows["client_mode"] and "(env CROWDTRAIN_CLIENT_MODE)" in rows["client_mode"]
    assert "(default)" in rows["device"]
    # a typo in the file is an error, not a silently ignored setting
    config.write_text('coordinatr = "x:1"\n')
    result = run_cli("peer", "--config", str(config))
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "'coordinatr'" in line and "known settings" in line


def test_install_service_writes_a_systemd_unit_with_the_peer_s_settings(tmp_path: Path):
    env = os.environ | {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "CROWDTRAIN_CONFIG_DIR": str(tmp_path / "ct"),
    }

    def install(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        command = cli_command("peer", "--coordinator", "203.0.113.7:50051", *args, "--install-service")
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env | extra_env)

    result = install("--threads", "2", "--client-mode", "--name", "alice's 50% $HOME")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "xdg" / "systemd" / "user" / "crowdtrain-peer.service"
    assert (
        f"wrote {unit}" in result.stdout and "systemctl --user enable --now crowdtrain-peer" in result.stdout
    )
    text = unit.read_text()
    assert unit.stat().st_mode & 0o777 == 0o600, "it may hold an invite code"
    [exec_start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    toml = tmp_path / "ct" / "peer.toml"  # the settings given live there: edits apply (SIGHUP, restart)
    assert exec_start.endswith(f' "peer" "--config={toml}"'), exec_start
    kept = read_config_file(toml, PeerConfig, required=True)
    assert (kept["coordinator"], kept["threads"], kept["client_mode"]) == ("203.0.113.7:50051", 2, True)
    assert kept["name"] == "alice's 50% $HOME" and toml.stat().st_mode & 0o777 == 0o600
    assert "WantedBy=default.target" in text and "Restart=on-failure" in text
    assert "RestartPreventExitStatus=3" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "KillMode=mixed" in text  # the stop signal to the peer alone: it stops hivemind in order
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0, verify.stderr
    # a newline in a setting would smuggle directives into the unit: refused, nothing written
    unit.unlink()
    result = install(CROWDTRAIN_NAME="x\nExecStartPre=/bin/sh -c evil")
    assert result.returncode == 1 and not unit.exists()
    [line] = error_lines(result)
    assert "control character" in line and "name" in line


def test_unknown_preset_writes_nothing(tmp_path: Path):
    result = run_cli("coordinator", "--data-dir", str(tmp_path / "run"), "--preset", "huge")
    assert result.returncode == 2  # refused by the parser, with the presets to choose from
    line = result.stderr.splitlines()[-1]
    assert "invalid choice: 'huge'" in line and "tiny" in line
    assert not (tmp_path / "run").exists()


def test_unreadable_data_path_writes_nothing(tmp_path: Path):
    missing = tmp_path / "no-such-corpus"
    result = run_cli("coordinator", "--data-dir", str(tmp_path / "run"), "--data", str(missing))
    assert result.returncode == 1
    [line] = error_lines(result)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_taken_port_is_reported_with_the_fix(tmp_path: Path, flag: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--http-port" if flag == "--grpc-port" else "--grpc-port"
        result = run_cli("coordinator", "--data-dir", str(tmp_path / "run"), flag, str(port), other, "0")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert f"127.0.0.1:{port}" in line and f"{flag} 0" in line
    assert not (tmp_path / "run").exists()


def test_pull_from_nowhere_fails_cleanly(tmp_path: Path):
    result = run_cli("pull", "--coordinator", "127.0.0.1:1", "--out", str(tmp_path / "model"))
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "unreachable" in line
    assert not (tmp_path / "model").exists()


def test_an_expected_error_is_one_line_and_a_bug_is_a_traceback(monkeypatch, capsys):
    """Only CrowdtrainError is "bad input"; a ValueError from a bug must not look like one."""
    from crowdtrain.coordinator import cli
    from crowdtrain.peer import cli as peer_cli
    from crowdtrain.peer.errors import CrowdtrainError

    def expected(config):
        raise CrowdtrainError("the thing failed; do this instead")

    def bug(config):
        return {}["missing"]

    config_cls, _, help_text = peer_cli.COMMANDS["verify"]
    monkeypatch.setitem(peer_cli.COMMANDS, "verify", (config_cls, expected, help_text))
    assert cli.main(["verify", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: the thing failed; do this instead"

    monkeypatch.setitem(peer_cli.COMMANDS, "verify", (config_cls, bug, help_text))
    assert cli.main(["verify", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'missing'" in err and "this is a bug" in err


def test_a_data_dir_whose_state_is_not_a_database(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.sqlite3").write_text("not a database\n" * 100)
    result = run_cli("coordinator", "--data-dir", str(run), "--grpc-port", "0", "--http-port", "0")
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result)
    assert str(run / "state.sqlite3") in line and "--data-dir" in line
    assert "Traceback" not in result.stderr


def test_a_data_dir_whose_run_manifest_is_garbage(tmp_path: Path):
    from crowdtrain.coordinator.peers.store import Store

    run = tmp_path / "run"
    run.mkdir()
    store = Store(run / "state.sqlite3", flush_interval_s=0)
    store.set_meta({"manifest_json": "[1, 2", "tokenizer_json": "{}"})
    store.close()
    result = run_cli("coordinator", "--data-dir", str(run), "--grpc-port", "0", "--http-port", "0")
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result)
    assert "run manifest" in line and str(run / "state.sqlite3") in line and "--data-dir" in line
    assert "Traceback" not in result.stderr


def test_a_data_dir_that_cannot_be_created_writes_nothing(tmp_path: Path, small_corpus: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli(
        "coordinator",
        "--data-dir",
        str(blocker / "run"),
        "--data",
        str(small_corpus),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
    )
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result)
    assert str(blocker) in line and "not a directory" in line and "--data-dir" in line
    assert blocker.read_text() == ""


def test_the_operating_system_refusing_is_one_line_not_a_bug(monkeypatch, capsys):
    """An unwritable --out or --save-dir, a full disk: the user's to fix, so no traceback."""
    from crowdtrain.coordinator import cli
    from crowdtrain.peer import cli as peer_cli

    def refused(config):
        raise PermissionError(13, "Permission denied", "/srv/model")

    config_cls, _, help_text = peer_cli.COMMANDS["verify"]
    monkeypatch.setitem(peer_cli.COMMANDS, "verify", (config_cls, refused, help_text))
    assert cli.main(["verify", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 13] Permission denied: '/srv/model'") and err.count("\n") == 1
    assert "Traceback" not in err and "bug" not in err


def _systemd_words(exec_start: str) -> list[str]:
    """ExecStart's words as systemd passes them (double quotes with C escapes, `%%` and `$$`)."""
    words = shlex.split(exec_start.removeprefix("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


@pytest.mark.parametrize("value", ["--x", "-h", "--coordinator=198.51.100.1:1", 'a b \\ " %n $USER'])
def test_a_flag_like_value_stays_that_settings_value_in_the_service(value, tmp_path: Path):
    """Review N21: `"--name" "--x"` made the installed service's argparse fail at every start; a
    peer's settings now live in its service's peer.toml, and each of the coordinator's unit is one
    `--flag=VALUE` word, whatever VALUE looks like."""
    from crowdtrain.coordinator.cli import build_parser
    from crowdtrain.coordinator.config import CoordinatorConfig
    from crowdtrain.peer.settings.service import coordinator_unit_text, write_peer_toml

    config = PeerConfig(coordinator="203.0.113.7:50051", name=value, schedule=value, trust_new_run=True)
    kept = read_config_file(write_peer_toml(config, tmp_path / "peer.toml"), PeerConfig, required=True)
    assert (kept["name"], kept["schedule"], kept["coordinator"]) == (value, value, "203.0.113.7:50051")
    assert "trust_new_run" not in kept, "a one-time acceptance is never kept in the service"
    unit = coordinator_unit_text(CoordinatorConfig(data_dir=value), "/usr/bin/python3", "/srv")
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    words = _systemd_words(exec_start)
    assert words[:4] == ["/usr/bin/python3", "-m", "crowdtrain.coordinator.cli", "coordinator"]
    assert build_parser().parse_args(words[3:]).data_dir == value
