"""The participant's `crowdtrain` commands: a volunteer's and a downloader's. Flags are generated
from the settings classes (peer/settings/commands.py).

    crowdtrain peer --coordinator HOST:PORT
    crowdtrain identity
    crowdtrain pull --coordinator HOST:PORT --out ./model
    crowdtrain checkpoints --coordinator HOST:PORT
    crowdtrain verify ./model --public-key KEY
    crowdtrain doctor [--coordinator HOST:PORT] [--json]   # exit status 1 when a check fails
    crowdtrain ctl status|pause|resume|finish-and-pause|set KEY=VALUE [--json]

The `crowdtrain` program is crowdtrain.coordinator.cli: it mounts these commands beside the
operator's (`add_commands`, `run`) and uses what every command shares, kept here so that a
volunteer's process loads nothing of the coordinator: the logging flags (`add_logging_options`,
`configure_logging`) and how a failure becomes an exit code (`exit_code`). Heavy imports (torch,
hivemind) happen inside the command that needs them, so `crowdtrain peer --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable

from crowdtrain.peer import __version__
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import (
    JsonFormatter,
    TerminalHandler,
    configure_hivemind_logging,
    route_hivemind_logs,
)
from crowdtrain.peer.settings import commands as settings
from crowdtrain.peer.settings.layered import add_layered_options, config_from_source, config_source


def add_logging_options(parser: argparse.ArgumentParser, *, on_subcommand: bool = False) -> None:
    """`--log-level` and `--log-format`: on the program, and (`on_subcommand`) on each subcommand
    too, so they work before or after it; there a flag not given leaves the program's value."""
    default = argparse.SUPPRESS if on_subcommand else None
    parser.add_argument(
        "--log-level", default=default or "info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        default=argparse.SUPPRESS,
        help="--log-level debug: every epoch line, hivemind's own messages",
    )
    parser.add_argument(
        "--log-format",
        default=default or "text",
        choices=["text", "json"],
        help="json: one JSON object per log line, with progress events (schema in README.md)",
    )


def configure_logging(level: str, log_format: str) -> None:
    handler = TerminalHandler(sys.stderr)  # on a terminal: a record never cuts into the live line
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    for noisy in ("transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # hivemind's level is set through its environment: its import resets a level set here, and
    # the processes it forks or starts must log at it too (peer/events.py)
    configure_hivemind_logging(logging.getLogger().level)


def hivemind_logs_through_ours() -> None:
    """hivemind logs through a handler of its own (colored text, installed on import); send its
    records to ours instead, so `--log-format json` output has no plain lines from it."""
    route_hivemind_logs()


def cmd_peer(config: settings.PeerConfig, source=None) -> int:
    from crowdtrain.peer.link.client import parse_address

    parse_address(config.coordinator)  # a malformed address or the dashboard's URL: said at once
    from crowdtrain.peer.volunteer.trainer import Volunteer

    if not 0 <= config.nice <= 19:
        raise CrowdtrainError(f"--nice must be 0 to 19, not {config.nice}")
    if config.nice:  # before anything starts: hivemind's processes and p2pd inherit it
        os.nice(config.nice)
    return Volunteer(config, source).run()  # source: where to read peer.toml again on SIGHUP


def cmd_ctl(config: settings.CtlConfig) -> int:
    """Control the peer running on this machine over its local socket."""
    from crowdtrain.peer.volunteer.control import run_ctl

    return run_ctl(config)


def cmd_doctor(config: settings.DoctorConfig) -> int:
    """Check this machine (and a coordinator) before joining: 0 when nothing failed, else 1."""
    from crowdtrain.peer.doctor.command import run_doctor

    return run_doctor(config)


def cmd_identity(config: settings.IdentityConfig) -> int:
    """Print this machine's persistent peer id (for an operator's allowlist)."""
    from pathlib import Path

    from crowdtrain.peer.admission.identity import PeerIdentity
    from crowdtrain.peer.settings.layered import default_config_dir

    path = Path(config.identity).expanduser() if config.identity else default_config_dir() / "identity.key"
    identity = PeerIdentity(path)
    print(identity.peer_id)
    how = (
        f"start peers with --identity {path} to use it"
        if config.identity
        else "`crowdtrain peer` uses it by default"
    )
    print(f"(key in {path}; {how})", file=sys.stderr)
    return 0


def cmd_pull(config: settings.PullConfig) -> int:
    from pathlib import Path

    from crowdtrain.peer.checkpoints.pull import pull
    from crowdtrain.peer.link.tls import ClientTls

    meta = pull(
        config.coordinator,
        Path(config.out),
        step=config.step,
        timeout_s=config.timeout_s,
        public_key=config.public_key,
        trust_new_key=config.trust_new_key,
        trust_new_run=config.trust_new_run,
        tls=ClientTls.from_flags(config.tls, config.tls_ca),
    )
    print(
        f"step {meta.step} of run {meta.run_id} (eval loss {meta.eval_loss:.4f}) verified and saved to "
        f"{config.out}; signed by {meta.public_key}"
    )
    return 0


def cmd_checkpoints(config: settings.CheckpointsConfig) -> int:
    import time

    from crowdtrain.peer.checkpoints.pull import list_published
    from crowdtrain.peer.link.tls import ClientTls

    listed, public_key = list_published(config.coordinator, ClientTls.from_flags(config.tls, config.tls_ca))
    if config.json:
        print(json.dumps(checkpoints_json(listed, public_key), indent=2))
        return 0
    claimed = clean_display(public_key, 128) or "an unknown key"  # the coordinator's words, unchecked
    print(f"{len(listed)} checkpoint(s); the coordinator says they are signed by {claimed}")
    print(f"{'STEP':>8}  {'PUBLISHED (UTC)':<19}  {'EVAL LOSS':>9}  {'SIZE MB':>8}")
    for c in listed:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created_unix_s))
        print(
            f"{c.step:>8}  {when:<19}  {c.eval_loss:>9.4f}  {sum(f.size_bytes for f in c.files) / 1e6:>8.1f}"
        )
    return 0


def checkpoints_json(listed, public_key: str) -> dict:
    """`crowdtrain checkpoints --json`: the listing with stable keys (a NaN loss is null)."""
    return {
        "signing_public_key": public_key,  # what the coordinator claims; `pull` checks it
        "checkpoints": [
            {
                "step": c.step,
                "created_unix_s": c.created_unix_s,
                "eval_loss": c.eval_loss if math.isfinite(c.eval_loss) else None,
                "size_bytes": sum(f.size_bytes for f in c.files),
                "url": c.url,
                "files": [{"name": f.name, "sha256": f.sha256, "size_bytes": f.size_bytes} for f in c.files],
            }
            for c in listed
        ],
    }


def cmd_verify(config: settings.VerifyConfig) -> int:
    from pathlib import Path

    from crowdtrain.peer.checkpoints.format import verify_dir

    meta = verify_dir(Path(config.directory), public_key=config.public_key or None)
    who = (
        "the run's key"
        if config.public_key
        else f"key {meta.public_key[:16]}... (pass --public-key to pin the run's key)"
    )
    print(f"step {meta.step}: {len(meta.files)} files match crowdtrain.json, signed by {who}")
    return 0


# name -> (settings class, handler, help), in the order `crowdtrain --help` lists them
COMMANDS = {
    "peer": (settings.PeerConfig, cmd_peer, "donate compute: join a run and train"),
    "identity": (
        settings.IdentityConfig,
        cmd_identity,
        "print this machine's peer id for a run's allowlist (creates the key once)",
    ),
    "pull": (settings.PullConfig, cmd_pull, "download and verify a published checkpoint"),
    "checkpoints": (
        settings.CheckpointsConfig,
        cmd_checkpoints,
        "list published checkpoints (step, time, eval loss, size)",
    ),
    "verify": (
        settings.VerifyConfig,
        cmd_verify,
        "check a downloaded checkpoint offline: signature and every sha256",
    ),
    "doctor": (
        settings.DoctorConfig,
        cmd_doctor,
        "check this machine (torch, memory, disk) and a coordinator before joining; exit 1 on a failure",
    ),
    "ctl": (
        settings.CtlConfig,
        cmd_ctl,
        "control the peer running on this machine: status, pause, resume, finish-and-pause, set KEY=VALUE",
    ),
}

LAYERED = ("peer",)  # commands whose settings may also come from the environment and a file


def add_commands(sub, command: str | None = None) -> None:
    """The participant's subcommands on `sub` (an argparse subparsers object); flags only for
    `command` (the one that runs), or for all of them when None."""
    for name, (config_cls, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            settings.add_arguments(sp, config_cls, layered=name in LAYERED)
            if name in LAYERED:
                add_layered_options(sp, name)
        add_logging_options(sp.add_argument_group("Logging"), on_subcommand=True)


def run(args: argparse.Namespace) -> int:
    """Run the participant's command `args.command` with the settings its flags (and, for a layered
    command, the environment and its config file) give."""
    config_cls, handler, _ = COMMANDS[args.command]
    if args.command in LAYERED:
        source = config_source(args.command, config_cls, args, os.environ)
        config = config_from_source(source, args)
        return 0 if config is None else handler(config, source)
    return handler(settings.from_arguments(config_cls, args))


def interrupted(command_name: str | None) -> str:
    """The one line a Ctrl+C that reached the CLI prints (no traceback), by command."""
    if command_name == "pull":
        return "interrupted (Ctrl+C); run the same command again to resume the download"
    return "interrupted (Ctrl+C)"


def exit_code(command: Callable[[], int], command_name: str | None = None) -> int:
    """Run `command`; its exit status. Expected failures (`CrowdtrainError`, and the operating
    system refusing something: `OSError`) print one `error:` line and give the error's
    `exit_status` (1; a `RefusedByRun`: 3, "restarting will not help"); Ctrl+C prints one line and
    gives 130; anything else is a bug: a full traceback, a request to report it, 2."""
    try:
        return command()
    except KeyboardInterrupt:
        print(interrupted(command_name), file=sys.stderr)
        return 130
    except CrowdtrainError as e:  # expected, and its message says what to do
        # cleaned: a message may quote a coordinator (gRPC details, HTTP reasons), escapes and all
        print(f"error: {clean_display(str(e))}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return e.exit_status  # 1; 3 for a peer the run refused (its service must not restart it)
    except OSError as e:  # the machine said no (a path, permissions, a full disk, a closed pipe)
        print(
            f"error: {clean_display(str(e))}; check the path, its permissions and free space", file=sys.stderr
        )
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1
    except Exception:
        traceback.print_exc()
        print(
            f"error: crowdtrain {__version__} hit an unexpected error (above); this is a bug - please "
            "report it with the traceback and the command you ran",
            file=sys.stderr,
        )
        return 2
