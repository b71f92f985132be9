"""The operator's first contact with `crowdtrain coordinator`: a mistaken flag is refused at once,
with one line and nothing written (not after a minute of building a run), and `--help` reads by
topic with placeholders that say what to type."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crowdtrain.coordinator import config
from crowdtrain.coordinator.cli import build_parser, main
from crowdtrain.coordinator.config import CoordinatorConfig, SettingsError, check_usable
from crowdtrain.coordinator.demo import cli_command
from crowdtrain.coordinator.run.ports import dht_announce_host
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.settings.commands import PeerConfig, default_metavar

# (flags, exit status, words the one error line holds); each is refused before --data-dir is made
MISTAKES = [
    (["--admission", "invte"], 2, ["invalid choice: 'invte'", "did you mean invite?"]),
    (["--grpc-port", "70000"], 1, ["--grpc-port 70000 is not a TCP port"]),
    (["--tls-cert", "cert.pem"], 1, ["--tls-cert and --tls-key go together"]),
    (["--admission", "allowlist", "--allowlist-path", "missing.txt"], 1, ["missing.txt does not exist"]),
    (["--data", "no-such-corpus/*.md"], 1, ["no-such-corpus/*.md", "does not exist"]),
]


@pytest.mark.parametrize("flags,status,words", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_a_mistaken_flag_is_refused_at_once_and_nothing_is_written(tmp_path: Path, flags, status, words):
    data_dir = tmp_path / "x"
    t0 = time.monotonic()
    result = subprocess.run(
        cli_command("coordinator", "--data-dir", str(data_dir), *flags),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    elapsed_s = time.monotonic() - t0
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], result.stderr  # one line, last, and no traceback above it
    assert all(word in lines[-1] for word in words), lines[-1]
    assert "Traceback" not in result.stderr and len(lines) <= 2  # at most a short usage line above
    assert not data_dir.exists()
    # the interpreter's start included: 0.3 s here (with --log-format json too: hivemind, seconds to
    # import, loads only once the flags pass); room for a loaded CI machine; a run takes far longer
    assert elapsed_s < 3, elapsed_s


def test_the_check_itself_takes_well_under_a_second(tmp_path: Path, capsys):
    argv = ["coordinator", "--data-dir", str(tmp_path / "x"), "--swarm-token-ttl-s", "1"]
    assert main(argv) == 1  # first call: imports the settings modules
    t0 = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - t0 < 1.0
    assert "--swarm-token-ttl-s 1.0 is outside 10..86400" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_mistyped_choice_is_named_with_the_closest_one(tmp_path: Path, capsys):
    for flag, typo, meant in (("--preset", "smal30m", "small30m"), ("--admission", "alowlist", "allowlist")):
        with pytest.raises(SystemExit) as exit_:
            main(["coordinator", "--data-dir", str(tmp_path / "x"), flag, typo])
        assert exit_.value.code == 2
        *usage, line = capsys.readouterr().err.splitlines()
        assert line.startswith(f"crowdtrain coordinator: error: argument {flag}: invalid choice: '{typo}'")
        assert line.endswith(f"; did you mean {meant}?") and len(usage) == 1  # not 30 lines of usage
    assert not (tmp_path / "x").exists()


def test_the_check_loads_neither_torch_nor_hivemind(tmp_path: Path):
    code = (
        "import sys\n"
        "from crowdtrain.coordinator.config import CoordinatorConfig, check_usable\n"
        f"check_usable(CoordinatorConfig(data_dir={str(tmp_path / 'x')!r}))\n"
        "assert 'torch' not in sys.modules and 'hivemind' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "changes,error",
    [
        ({"http_port": -1}, "--http-port -1 is not a TCP port"),
        ({"grpc_port": 9000, "dht_port": 9000}, "--grpc-port and --dht-port are both 9000"),
        ({"keep_last_checkpoints": 0}, "--keep-last-checkpoints 0 must be at least 1"),
        ({"checkpoint_interval_s": -1.0}, "--checkpoint-interval-s -1.0 must be at least 0"),
        ({"joins_per_minute": 0.0}, "--joins-per-minute 0.0 must be above 0"),
        ({"joins_per_minute": float("nan")}, "--joins-per-minute must be a finite number"),
        ({"heartbeat_timeout_s": 5.0}, "--heartbeat-timeout-s 5.0 must be longer than"),
        ({"admission": "closed"}, "--admission 'closed' is not one of open, invite, allowlist"),
        ({"preset": "huge"}, "--preset 'huge' is not one of tiny"),
        ({"min_peer_version": "latest"}, "--min-peer-version 'latest' is not a version"),
        ({"trusted_proxy": "nginx"}, "--trusted-proxy 'nginx' is not a list of IP addresses"),
        ({"autoban_min_reports": 0}, "--autoban-min-reporters 2 and --autoban-min-reports 0"),
        ({"swarm": ("matchmaking_time_s=-1",)}, "matchmaking_time_s must be between 0 and 86400"),
        ({"device": "cuda:x"}, "--device 'cuda:x' is not a device"),
        ({"data": ("hf:",)}, "--data 'hf:' names no dataset"),
        ({"data_field": " "}, "--data-field must name the record field"),
        ({"data_url": "/home/alice/corpus"}, "--data-url"),
        ({"dht_port": 31337, "public_host": "no-such-host.invalid"}, "--public-host 'no-such-host.invalid'"),
    ],
)
def test_each_flag_is_checked_with_a_message_naming_it(tmp_path: Path, changes, error):
    with pytest.raises(CrowdtrainError) as refused:
        check_usable(CoordinatorConfig(data_dir=str(tmp_path / "x"), **changes))
    assert error in str(refused.value)


def test_usable_settings_pass_and_data_is_only_checked_for_a_new_run(tmp_path: Path):
    allowlist = tmp_path / "allow.txt"
    allowlist.write_text("# nobody yet\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    usable = CoordinatorConfig(
        data_dir=str(tmp_path / "x"),
        admission="allowlist",
        allowlist_path=str(allowlist),
        grpc_port=0,
        http_port=0,
        swarm=("grad_compression=float16",),
        data=(str(corpus), str(tmp_path / "*"), "hf:wikitext:wikitext-2-raw-v1@train"),
        min_peer_version="0.1",
    )
    assert check_usable(usable) is usable
    # a run exists: its data is fixed in its manifest, so a --data entry gone since is no mistake
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "state.sqlite3").write_bytes(b"")
    check_usable(dataclasses.replace(usable, data=(str(tmp_path / "moved"),)))
    with pytest.raises(SettingsError, match="does not exist"):
        check_usable(
            dataclasses.replace(usable, data_dir=str(tmp_path / "y"), data=(str(tmp_path / "moved"),))
        )


def _sections(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    return {group.title: group._group_actions for group in parser._action_groups if group._group_actions}


def _subparser(command: str) -> argparse.ArgumentParser:
    [sub] = [a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def test_coordinator_help_reads_by_topic_with_real_placeholders():
    parser = _subparser("coordinator")
    sections = _sections(parser)
    topics = ["Run", "Network", "Admission", "Publishing", "Peer health", "Limits and flood", "Logging"]
    assert [t for t in sections if t in topics] == topics
    where = {a.dest: title for title, actions in sections.items() for a in actions}
    assert where["admission"] == where["allowlist_path"] == where["min_peer_version"] == "Admission"
    assert where["host"] == where["public_host"] == where["tls_cert"] == where["trusted_proxy"] == "Network"
    assert where["data_dir"] == where["preset"] == where["swarm"] == "Run"
    assert where["log_level"] == "Logging" and where["checkpoint_interval_s"] == "Publishing"
    for field in dataclasses.fields(CoordinatorConfig):  # each flag in a topic, none in "options"
        assert field.metadata.get("topic") in topics, field.name
    metavars = {a.dest: a.metavar for a in parser._actions}
    assert metavars["swarm"] == "KEY=VALUE" and metavars["host"] == metavars["public_host"] == "HOST"
    assert metavars["grpc_port"] == metavars["dht_port"] == "PORT" and metavars["data_dir"] == "PATH"
    assert metavars["heartbeat_timeout_s"] == "SECONDS" and metavars["join_burst"] == "N"
    text = parser.format_help()
    assert "{open,invite,allowlist}" in text and "{tiny,small30m,base125m,wan30m}" in text
    for action in parser._actions:  # never a field's name in capitals (DATA_DIR, SWARM_TOKEN_TTL_S)
        assert "_" not in (action.metavar or ""), action.dest
    assert not re.findall(r"\b[A-Z]+_[A-Z_]+\b", text)


def test_peer_help_reads_by_topic():
    parser = _subparser("peer")
    sections = _sections(parser)
    for topic in ("Connection", "Identity", "Machine", "Politeness and schedule", "Network", "Training"):
        assert topic in sections, topic
    assert "Config file and service" in sections
    for field in dataclasses.fields(PeerConfig):
        assert field.metadata.get("topic") in sections, field.name
    metavars = {a.dest: a.metavar for a in parser._actions}
    assert metavars["coordinator"] == "HOST:PORT" and metavars["schedule"] == "HH:MM-HH:MM"
    assert metavars["listen_port"] == "PORT" and metavars["max_memory_gb"] == "GB"


def test_a_placeholder_names_a_unit_or_kind():
    assert default_metavar("join_timeout_s", float) == "SECONDS"
    assert default_metavar("listen_port", int) == "PORT"
    assert default_metavar("announce_host", str) == "HOST"
    assert default_metavar("cache_dir", str) == "PATH"
    assert default_metavar("keep_last", int) == "N"
    assert default_metavar("note", str) == "TEXT"
    assert default_metavar("tls", bool) is None
    assert default_metavar("data", tuple[str, ...]) == "PATH"


def test_a_component_s_flags_land_in_its_section_unless_named_otherwise():
    assert set(config.OWNERS) == set(config.TOPIC_OF)
    fields = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
    assert fields["joins_per_minute"].metadata["topic"] == config.LIMITS  # AbuseLimits' section
    assert fields["host"].metadata["topic"] == config.NETWORK  # the publisher's, named Network


def test_the_dht_node_announces_the_address_a_public_host_name_resolves_to():
    """A name as --public-host (the one a TLS certificate holds) once made /ip4/NAME/tcp/PORT, a
    multiaddr hivemind could not parse: the coordinator hung at start, after building the run."""
    assert dht_announce_host("203.0.113.7") == "203.0.113.7"
    assert dht_announce_host("localhost") == "127.0.0.1"
    with pytest.raises(CrowdtrainError, match="has no IPv4 address"):
        dht_announce_host("no-such-host.invalid")


def test_the_program_help_names_every_command_under_a_role():
    from crowdtrain.coordinator.cli import ROLES, _subparsers, build_parser

    commands = set(_subparsers(build_parser()))
    assert commands >= {"coordinator", "peer", "pull", "doctor", "ctl"}
    named = {word.strip(",;") for line in ROLES.splitlines()[1:4] for word in line.split()}
    assert commands <= named, commands - named
