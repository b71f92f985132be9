"""`crowdtrain peer --install-service` and `crowdtrain coordinator --install-service`: a systemd
user unit that starts the peer (or the coordinator) at every login (or boot, with lingering), so a
volunteer's machine keeps contributing, and a run stays up, after a reboot. One implementation
writes both units.

The peer's unit runs `crowdtrain peer --config FILE`: the settings the volunteer gave (flags,
environment or the file, all resolved) are written into that peer.toml first, so a later edit of
the file applies at the next start, or at once for the settings that change live (`systemctl --user
reload crowdtrain-peer` sends SIGHUP: peer/volunteer/control.py). A peer the run refused (banned,
not admitted, out of date) exits with status 3 (peer/errors.py `RefusedByRun`), which the unit does
not restart: it would be refused again every minute, forever.

    path = write_peer_toml(config, default_config_path("peer"))   # the resolved settings
    unit = peer_unit_text(path, config.coordinator)               # pure: the unit file
    print(how_to_enable(install_unit(unit)))                      # ~/.config/systemd/user/crowdtrain-peer.service
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from crowdtrain.peer.errors import REFUSED_EXIT_STATUS, CrowdtrainError

UNIT_NAME = "crowdtrain-peer.service"
COORDINATOR_UNIT_NAME = "crowdtrain-coordinator.service"
# at boot the network may come up late: keep asking the coordinator instead of giving up after 60 s
BOOT_JOIN_TIMEOUT_S = 3600.0
# a one-time decision, not a setting: kept in the file it would accept any new run at every start
NOT_KEPT = frozenset({"trust_new_run"})


class UnitError(CrowdtrainError):
    """The unit cannot be written as asked; the message says which setting or path is the problem."""


def kept_settings(config) -> dict:
    """The settings of `config` worth keeping for a service: those that differ from their default
    (a peer's join timeout always, at its boot value), never the one-time ones."""
    kept = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "join_timeout_s" and value == f.default:
            value = BOOT_JOIN_TIMEOUT_S
        elif f.name in NOT_KEPT or value == _default(f):
            continue
        _refuse_control_characters(f.name, value)
        kept[f.name] = value
    return kept


def toml_text(values: dict) -> str:
    """`values` (str, bool, int, float, tuples of str) as TOML, one `name = value` line each."""
    lines = ["# crowdtrain peer settings: edit, then `systemctl --user reload crowdtrain-peer` (or restart)"]
    for name, value in values.items():
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: control characters refused


def write_peer_toml(config, path: Path) -> Path:
    """Write `config`'s kept settings into `path` (mode 0600: it may hold an invite code), keeping
    a differing file there as `path.bak`; checked by reading it back as the peer will."""
    from crowdtrain.peer.settings.layered import read_config_file

    text = toml_text(kept_settings(config))
    path = Path(path).expanduser().absolute()
    try:
        if path.exists() and path.read_text(encoding="utf-8") != text:
            os.replace(path, path.with_name(path.name + ".bak"))
        _write_private(path, text)
    except OSError as e:
        raise UnitError(f"could not write {path}: {e}; check that directory's permissions") from None
    read_back = read_config_file(path, type(config), required=True)
    if any(read_back.get(name) != value for name, value in kept_settings(config).items()):
        raise UnitError(f"{path} does not read back as the settings given; please report this")
    return path


def peer_unit_text(config_path: Path, coordinator: str, python: str = sys.executable) -> str:
    """The unit running `crowdtrain peer --config CONFIG_PATH` (pure)."""
    args = [python, "-m", "crowdtrain.coordinator.cli", "peer", f"--config={Path(config_path).absolute()}"]
    return unit_text(
        args,
        f"crowdtrain volunteer peer (coordinator {coordinator})",
        reload=True,
        prevent_restart=(REFUSED_EXIT_STATUS,),
    )


def coordinator_unit_text(config, python: str = sys.executable, working_dir: str | None = None) -> str:
    """The unit running `crowdtrain coordinator` with every setting of `config` that differs from
    its default (relative paths resolve from `working_dir`, default: here)."""
    args = [python, "-m", "crowdtrain.coordinator.cli", "coordinator", *flag_words(kept_settings(config))]
    return unit_text(
        args,
        f"crowdtrain coordinator (run in {config.data_dir})",
        working_dir=working_dir if working_dir is not None else os.getcwd(),
    )


def flag_words(values: dict) -> list[str]:
    """Command-line words for settings: `--flag=VALUE` one word each (a value that looks like a flag
    stays that setting's value), `--flag`/`--no-flag` for booleans, `--flag V1 V2` for lists."""
    words = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            if any(str(v).startswith("-") for v in value):
                raise UnitError(
                    f"setting {name}: a value starting with '-' cannot be listed; give it as ./VALUE"
                )
            words += [flag, *map(str, value)]
        else:
            words.append(f"{flag}={value}")
    return words


def unit_text(
    args: list[str],
    description: str,
    *,
    reload: bool = False,
    prevent_restart: tuple[int, ...] = (),
    working_dir: str | None = None,
) -> str:
    """A systemd user unit running `args` (pure): restarted a minute after a failure, except with
    the `prevent_restart` exit statuses; `reload`: `systemctl --user reload` sends it SIGHUP."""
    for arg in [*args, description, working_dir or ""]:
        _refuse_control_characters("a path or setting", arg)
    service = [f"ExecStart={' '.join(_quoted(a) for a in args)}"]
    if working_dir:
        service.append(f"WorkingDirectory={working_dir.replace('%', '%%')}")  # not quoted: a path
    if reload:
        service.append("ExecReload=/bin/kill -HUP $MAINPID")
    service += ["Restart=on-failure", "RestartSec=60"]
    if prevent_restart:
        service.append("RestartPreventExitStatus=" + " ".join(map(str, prevent_restart)))
    # KillMode=mixed: the stop's SIGTERM goes to the main process alone, which stops hivemind's
    # processes in order; whatever is left after TimeoutStopSec gets SIGKILL
    service += ["KillSignal=SIGTERM", "KillMode=mixed", "TimeoutStopSec=120"]
    return (
        "[Unit]\n"
        f"Description={description.replace('%', '%%')}\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n" + "\n".join(service) + "\n\n[Install]\nWantedBy=default.target\n"
    )


def unit_path(name: str = UNIT_NAME) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "systemd" / "user" / name


def install_unit(text: str, path: Path | None = None) -> Path:
    """Write the unit (readable only by its owner: it may hold an invite code) and return its path."""
    path = path or unit_path()
    try:
        _write_private(path, text)
    except OSError as e:
        raise UnitError(f"could not write {path}: {e}; check that directory's permissions") from None
    return path


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def how_to_enable(path: Path, config_path: Path | None = None) -> str:
    name = path.name.removesuffix(".service")
    lines = [f"wrote {path}"]
    if config_path is not None:
        lines += [
            f"its settings are in {config_path}: edit it, then `systemctl --user reload {name}` applies "
            "schedule, max_upload_mbps, pause_when_busy, pause_on_battery and threads at once (others at "
            "the next restart)",
        ]
    return "\n".join(
        lines
        + [
            f"start it now and at every login:   systemctl --user daemon-reload && systemctl --user enable --now {name}",
            "keep it running while logged out:  loginctl enable-linger $USER",
            f"follow its log:                    journalctl --user -u {name} -f",
            f"remove it:                         systemctl --user disable --now {name} && rm {path}",
        ]
    )


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _quoted(arg: str) -> str:
    """One ExecStart word, exactly as given: systemd reads C escapes inside quotes and expands
    `%` specifiers and `$` variables anywhere."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _refuse_control_characters(name: str, value) -> None:
    """A newline in a value would add directives of its own to the unit."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
        raise UnitError(f"setting {name} holds a control character (a newline?); the unit was not written")


__all__ = [
    "COORDINATOR_UNIT_NAME",
    "UNIT_NAME",
    "UnitError",
    "coordinator_unit_text",
    "how_to_enable",
    "install_unit",
    "peer_unit_text",
    "unit_path",
    "unit_text",
    "write_peer_toml",
]
