"""Where a command's settings come from (peer/settings/layered.py): flag over environment over config file
over default, and nothing unchecked from the environment or the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.settings.layered import ConfigError, describe, read_config_file, resolve


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(tmp_path: Path):
    file_values = read_config_file(
        write(
            tmp_path / "peer.toml",
            'coordinator = "file:1"\nthreads = 3\nbatch_size = 5\nname = "from-file"\n',
        ),
        PeerConfig,
        required=True,
    )
    env = {"CROWDTRAIN_COORDINATOR": "env:2", "CROWDTRAIN_THREADS": "2", "CROWDTRAIN_VENV": "/elsewhere"}
    config, settings = resolve(PeerConfig, {"coordinator": "flag:3"}, env, file_values, "peer.toml")
    assert config.coordinator == "flag:3"  # flag over env over file
    assert config.threads == 2  # env over file
    assert config.batch_size == 5 and config.name == "from-file"  # file over default
    assert config.device == "auto"  # default
    sources = {s.name: s.source for s in settings}
    assert sources["coordinator"] == "flag"
    assert sources["threads"] == "env CROWDTRAIN_THREADS"
    assert sources["batch_size"] == "file peer.toml"
    assert sources["device"] == "default"
    shown = describe(settings)
    assert "threads" in shown and "(env CROWDTRAIN_THREADS)" in shown and "'flag:3'" in shown


def test_environment_values_are_parsed_as_the_setting_s_type():
    env = {
        "CROWDTRAIN_COORDINATOR": "h:1",
        "CROWDTRAIN_CLIENT_MODE": "yes",
        "CROWDTRAIN_TLS": "0",
        "CROWDTRAIN_JOIN_TIMEOUT_S": "12.5",
        "CROWDTRAIN_MAX_EPOCHS": " 7 ",
    }
    config, _ = resolve(PeerConfig, {}, env, {})
    assert (config.client_mode, config.tls, config.join_timeout_s, config.max_epochs) == (
        True,
        False,
        12.5,
        7,
    )
    for key, value, message in (
        ("CROWDTRAIN_CLIENT_MODE", "maybe", "true or false"),
        ("CROWDTRAIN_THREADS", "four", "must be a number"),
        ("CROWDTRAIN_THREADS", "4.5", "must be a number"),
        ("CROWDTRAIN_JOIN_TIMEOUT_S", "nan", "finite"),
        ("CROWDTRAIN_NAME", "x" * 5000, "over 4096 characters"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve(PeerConfig, {}, {"CROWDTRAIN_COORDINATOR": "h:1", key: value}, {})


def test_a_required_setting_found_nowhere_says_the_three_ways_to_give_it():
    with pytest.raises(ConfigError, match=r"--coordinator is required.*CROWDTRAIN_COORDINATOR.*peer\.toml"):
        resolve(PeerConfig, {}, {}, {}, "peer.toml")


@pytest.mark.parametrize(
    "text, message",
    [
        ('coordinater = "h:1"\n', "does not know; known settings: .*coordinator"),  # a typo is not ignored
        ('threads = "4"\n', "threads in .* must be an integer"),
        ("client_mode = 1\n", "must be true or false"),
        ("threads = true\n", "must be an integer"),
        ("join_timeout_s = inf\n", "finite"),
        ("coordinator = [\n", "not valid TOML"),
        ("[peer]\nthreads = 2\n", "does not know"),
        ("# " + "x" * 70_000 + "\n", "over 65536 bytes"),
    ],
)
def test_a_bad_config_file_is_refused_with_the_reason(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        read_config_file(write(tmp_path / "peer.toml", text), PeerConfig, required=True)


def test_the_default_file_may_be_missing_but_a_named_one_may_not(tmp_path: Path):
    assert read_config_file(tmp_path / "absent.toml", PeerConfig, required=False) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "absent.toml", PeerConfig, required=True)
    # an int where a float is wanted is fine
    values = read_config_file(write(tmp_path / "p.toml", "join_timeout_s = 30\n"), PeerConfig, required=True)
    assert values == {"join_timeout_s": 30.0} and isinstance(values["join_timeout_s"], float)
