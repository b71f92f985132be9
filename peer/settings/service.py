"""`crowdtrain peer --install-service`: a systemd user unit that starts this peer, with the settings
it was given, at every login (or boot, with lingering), so a volunteer's machine keeps contributing
after a reboot.

    unit = unit_text(config, defaults)        # pure: the unit file for these settings
    path = install_unit(unit)                 # ~/.config/systemd/user/crowdtrain-peer.service
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError

UNIT_NAME = "crowdtrain-peer.service"
# at boot the network may come up late: keep asking the coordinator instead of giving up after 60 s
BOOT_JOIN_TIMEOUT_S = 3600.0
# a one-time decision, not a setting: written into the unit it would accept any new run at every start
NOT_KEPT = frozenset({"trust_new_run"})


class UnitError(CrowdtrainError):
    """The unit cannot be written as asked; the message says which setting or path is the problem."""


def unit_text(config, python: str = sys.executable) -> str:
    """The unit running `crowdtrain peer` with every setting of `config` that differs from its
    default (flags are what the volunteer gave: flags, environment or peer.toml, all resolved).
    A value is written `--flag=VALUE`, one word: a value that looks like a flag (`--x`) is still
    that setting's value, never a flag of its own that would fail every start."""
    args = [python, "-m", "crowdtrain.coordinator.cli", "peer"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "join_timeout_s" and value == f.default:
            value = BOOT_JOIN_TIMEOUT_S
        elif value == f.default or f.name in NOT_KEPT:
            continue
        _refuse_control_characters(f.name, value)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args.append(f"{flag}={value}")
    _refuse_control_characters("python", python)
    command = " ".join(_quoted(a) for a in args)
    return (
        "[Unit]\n"
        f"Description=crowdtrain volunteer peer (coordinator {config.coordinator.replace('%', '%%')})\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        f"ExecStart={command}\n"
        "Restart=on-failure\n"
        "RestartSec=60\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=120\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "systemd" / "user" / UNIT_NAME


def install_unit(text: str, path: Path | None = None) -> Path:
    """Write the unit (readable only by its owner: it may hold an invite code) and return its path."""
    path = path or unit_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise UnitError(f"could not write {path}: {e}; check that directory's permissions") from None
    return path


def how_to_enable(path: Path) -> str:
    name = UNIT_NAME.removesuffix(".service")
    return (
        f"wrote {path}\n"
        f"start it now and at every login:   systemctl --user daemon-reload && systemctl --user enable --now {name}\n"
        f"keep it running while logged out:  loginctl enable-linger $USER\n"
        f"follow its log:                    journalctl --user -u {name} -f\n"
        f"remove it:                         systemctl --user disable --now {name} && rm {path}"
    )


def _quoted(arg: str) -> str:
    """One ExecStart word, exactly as given: systemd reads C escapes inside quotes and expands
    `%` specifiers and `$` variables anywhere."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _refuse_control_characters(name: str, value) -> None:
    """A newline in a value would add directives of its own to the unit."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
        raise UnitError(f"setting {name} holds a control character (a newline?); the unit was not written")


__all__ = ["UNIT_NAME", "UnitError", "how_to_enable", "install_unit", "unit_text", "unit_path"]
