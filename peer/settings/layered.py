"""Where each setting of a command comes from: its `--flag`, a `CROWDTRAIN_<NAME>` environment
variable, the command's TOML config file, or the default, in that order (the first one present wins).

    crowdtrain peer --print-config          # the effective settings and where each came from
    crowdtrain peer --config ~/peer.toml    # default: peer.toml in crowdtrain's config directory
                                            # ($CROWDTRAIN_CONFIG_DIR, else ~/.config/crowdtrain)

The file holds the same names as the flags, with underscores (`coordinator = "host:7000"`,
`threads = 4`, `client_mode = true`). Everything read from the environment or the file is checked
against the setting's type before use, and an unknown key in the file is an error naming the known
ones (a typo must not silently leave a default in place). Pure, apart from `default_config_path`
and `read_config_file`; the CLI (peer/cli.py) passes in the flags given and `os.environ`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError

CONFIG_DIR_ENV = "CROWDTRAIN_CONFIG_DIR"  # where peer.toml, identity.key and trusted keys live

ENV_PREFIX = "CROWDTRAIN_"
MAX_CONFIG_FILE_BYTES = 64 * 1024  # a settings file, not a dataset
MAX_VALUE_CHARS = 4096
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(CrowdtrainError):
    """A setting from the environment or the config file is unusable; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    name: str
    value: typing.Any
    source: str  # "flag", "env CROWDTRAIN_X", "file PATH" or "default"


def default_config_path(command: str) -> Path:
    """`COMMAND.toml` in crowdtrain's config directory (`$CROWDTRAIN_CONFIG_DIR`, else the user's)."""

    return default_config_dir() / f"{command}.toml"


def read_config_file(path: Path, cls, *, required: bool) -> dict:
    """The settings in a TOML file for `cls`'s fields; {} when it is missing and not `required`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(path).expanduser()
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist; check the --config path") from None
        return {}
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_FILE_BYTES} bytes; is it the right file?")
    try:
        values = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"config file {path} sets {', '.join(map(repr, unknown))}, which this command does not "
            f"know; known settings: {', '.join(sorted(known))}"
        )
    return {name: _checked(cls, name, value, f"{name} in {path}") for name, value in values.items()}


def resolve(
    cls,
    flags: Mapping[str, typing.Any],
    env: Mapping[str, str],
    file_values: Mapping[str, typing.Any],
    file_label: str = "config file",
) -> tuple[typing.Any, list[Setting]]:
    """(the config, where each setting came from): flag over environment over file over default.
    A required setting found nowhere is an error saying the three ways to give it."""
    settings = []
    for f in dataclasses.fields(cls):
        key = ENV_PREFIX + f.name.upper()
        if f.name in flags:
            setting = Setting(f.name, flags[f.name], "flag")
        elif key in env:
            setting = Setting(f.name, _from_env(cls, f.name, env[key], key), f"env {key}")
        elif f.name in file_values:
            setting = Setting(f.name, file_values[f.name], f"file {file_label}")
        elif f.default is not dataclasses.MISSING:
            setting = Setting(f.name, f.default, "default")
        else:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(
                f"{flag} is required: pass it, set {key}, or put `{f.name} = ...` in {file_label}"
            )
        settings.append(setting)
    return cls(**{s.name: s.value for s in settings}), settings


def add_layered_options(parser, command: str) -> None:
    """The options of a layered command (`--config`, `--print-config`, `--install-service`)."""
    parser.epilog = (
        f"Each setting also comes from CROWDTRAIN_<NAME> (e.g. CROWDTRAIN_COORDINATOR) or the TOML "
        f"file --config (default: {command}.toml in crowdtrain's config directory); a flag wins over "
        "the environment, which wins over the file."
    )
    group = parser.add_argument_group("Config file and service")
    group.add_argument("--config", default="", metavar="PATH", help="TOML file with this command's settings")
    group.add_argument(
        "--print-config", action="store_true", help="show the effective settings and their sources"
    )
    group.add_argument(
        "--install-service",
        action="store_true",
        help="write these settings into the --config file (default: peer.toml in crowdtrain's config "
        "directory) and a systemd user unit that runs this peer with that file at every login (and "
        "boot, with lingering); print how to enable it, and exit",
    )


@dataclass(frozen=True)
class ConfigSource:
    """Where a layered command's settings come from, kept so that a running peer can read them
    again (SIGHUP, peer/volunteer/control.py): flags given and the environment at its start still
    win over the file, as they did then."""

    cls: type
    flags: Mapping[str, typing.Any]
    env: Mapping[str, str]
    path: Path
    required: bool  # the file was named with --config: missing is an error

    def load(self) -> tuple[typing.Any, list[Setting]]:
        """(the config, where each setting came from), reading the file now."""
        file_values = read_config_file(self.path, self.cls, required=self.required)
        return resolve(self.cls, self.flags, self.env, file_values, str(self.path))


def config_source(command: str, cls, namespace, env: Mapping[str, str]) -> ConfigSource:
    """The command's flags (`namespace`), a copy of `env`, and its TOML file."""
    from crowdtrain.peer.settings.commands import given_flags

    path = Path(namespace.config).expanduser() if namespace.config else default_config_path(command)
    return ConfigSource(cls, given_flags(cls, namespace), dict(env), path, bool(namespace.config))


def config_from_command_line(command: str, cls, namespace, env: Mapping[str, str]):
    """The command's config from its flags (`namespace`), `env`, its TOML file and the defaults;
    None once --print-config or --install-service has done its part (the CLI then exits 0)."""
    return config_from_source(config_source(command, cls, namespace, env), namespace)


def config_from_source(source: ConfigSource, namespace):
    """`source`'s config; None once --print-config or --install-service has done its part. The
    service runs `crowdtrain peer --config FILE`: the settings given are written into FILE first."""
    config, settings = source.load()
    if namespace.print_config:
        print(describe(settings))
        return None
    if namespace.install_service:
        from crowdtrain.peer.settings.service import (
            how_to_enable,
            install_unit,
            peer_unit_text,
            write_peer_toml,
        )

        path = write_peer_toml(config, source.path)
        print(how_to_enable(install_unit(peer_unit_text(path, config.coordinator)), path))
        return None
    return config


def describe(settings: list[Setting]) -> str:
    """One line per setting: name, value and source, aligned (for --print-config)."""
    width = max(len(s.name) for s in settings)
    return "\n".join(f"{s.name:<{width}}  {s.value!r:<30}  ({s.source})" for s in settings)


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def value_from_text(cls, name: str, raw: str, where: str):
    """A setting's value from text (`crowdtrain ctl set KEY=VALUE`), checked as an environment
    variable's is; ConfigError names `where` when it does not fit the setting's type."""
    return _from_env(cls, name, raw, where)


def _from_env(cls, name: str, raw: str, where: str):
    """An environment variable's text as the setting's type."""
    if len(raw) > MAX_VALUE_CHARS:
        raise ConfigError(f"{where} is over {MAX_VALUE_CHARS} characters")
    tp, text = _field_type(cls, name), raw.strip()
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false (or 1/0, yes/no), not {raw!r}")
    if tp in (int, float):
        try:
            return _checked(cls, name, tp(text), where)
        except ValueError:
            raise ConfigError(f"{where} must be a number ({tp.__name__}), not {raw!r}") from None
    if typing.get_origin(tp) is tuple:
        return tuple(part for part in text.split(",") if part)
    return raw


def _checked(cls, name: str, value, where: str):
    """`value` if it has the setting's type (an int where a float is wanted is fine)."""
    tp = _field_type(cls, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        value = tuple(value)
    expected = typing.get_origin(tp) or tp
    if not isinstance(value, expected) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise ConfigError(f"{where} is over {MAX_VALUE_CHARS} characters")
    if isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "ConfigSource",
    "Setting",
    "add_layered_options",
    "config_from_command_line",
    "config_from_source",
    "config_source",
    "value_from_text",
    "default_config_path",
    "describe",
    "read_config_file",
    "resolve",
]


def default_config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("crowdtrain"))
