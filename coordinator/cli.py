"""`crowdtrain`: one entry point, one subcommand per role. Flags are generated from the settings
classes (coordinator/config.py, peer/settings/commands.py).

    crowdtrain coordinator --data-dir runs/mine --preset tiny
    crowdtrain peer --coordinator HOST:PORT
    crowdtrain pull --coordinator HOST:PORT --out ./model
    crowdtrain demo --peers 2 --minutes 4

The operator's commands live here (`coordinator`, `status`, `ban`, `invite create|list|revoke`,
`demo`); the participant's (`peer`, `identity`, `pull`, `checkpoints`, `verify`) live in
crowdtrain.peer.cli, mounted here. Only the subcommand that runs gets its flags generated, and the
operator's settings classes are named, not imported, until one of their commands runs: a
volunteer's `crowdtrain peer` loads no coordinator module but this one. Heavy imports (torch,
hivemind, transformers) happen inside the command that needs them, so `crowdtrain coordinator
--help` is instant. Expected failures (`CrowdtrainError`, and the operating system refusing
something: `OSError`) print one `error:` line and exit 1; anything else is a bug: a full
traceback, a request to report it, exit 2.

    CODE=$(crowdtrain invite create --data-dir runs/mine --uses 5 --expires-in-s 86400 --note "lab")
    crowdtrain invite list --data-dir runs/mine
    crowdtrain invite revoke --data-dir runs/mine ID
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

# hivemind forks its DHT and averager processes while gRPC threads run; those children never use
# gRPC, so skip gRPC's fork handlers (which only log "Other threads are currently calling into gRPC")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from crowdtrain.peer import cli as peer_cli
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.settings import commands as settings

if TYPE_CHECKING:
    from crowdtrain.coordinator import config as cfg


def _tune_gc_for_a_long_running_server() -> None:
    """Full garbage collections over thousands of open peer streams paused the coordinator for
    hundreds of ms (p99 heartbeat latency 730 ms at 2,000/s; 22 ms with the collector off, see
    docs/figures.md). Move start-up objects out of the collector's view and collect the young
    generations far less often; reference counting still frees everything acyclic at once."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_coordinator(config: cfg.CoordinatorConfig) -> int:
    import signal

    from crowdtrain.coordinator.api.loopthread import favour_event_loops
    from crowdtrain.coordinator.app import Coordinator

    coordinator = Coordinator(config)
    try:
        coordinator.start()
        _tune_gc_for_a_long_running_server()
        favour_event_loops()
        # installed after start(): hivemind's averager (in the publisher) sets SIGINT to "ignored"
        signal.signal(signal.SIGINT, lambda *_: coordinator.stop())
        signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
        coordinator.wait()
        logging.getLogger(__name__).info("shutting down")
    finally:
        coordinator.shutdown()
    return 0


def cmd_status(config: cfg.StatusConfig) -> int:
    import time

    from crowdtrain.coordinator.api.render import format_status
    from crowdtrain.peer.link.client import CoordinatorClient
    from crowdtrain.peer.link.tls import ClientTls

    with CoordinatorClient(config.coordinator, tls=ClientTls.from_flags(config.tls, config.tls_ca)) as client:
        while True:
            text = format_status(client.get_status(), time.time())
            if config.watch_s > 0:
                print("\033[2J\033[H" + text, flush=True)
                time.sleep(config.watch_s)
            else:
                print(text)
                return 0


def cmd_ban(config: cfg.BanConfig) -> int:
    from pathlib import Path

    from crowdtrain.coordinator.admission import bans as evidence
    from crowdtrain.coordinator.peers.store import Store

    path = Path(config.data_dir).expanduser() / "state.sqlite3"
    if not path.exists():
        raise CrowdtrainError(f"{path} does not exist; pass the coordinator's --data-dir")
    store = Store(path)
    try:
        changed = evidence.unban(store, config.peer) if config.unban else store.set_banned(config.peer, True)
    finally:
        store.close()
    if not changed:
        raise CrowdtrainError(
            f"no peer with public id, session id or proven DHT peer id {config.peer!r} in {path}; "
            "bans are by id, not by display name: take the ID column of `crowdtrain status`"
        )
    print(f"{'unbanned' if config.unban else 'banned'} {changed} session(s) of {config.peer!r}")
    return 0


def _invite_book(data_dir: str):
    from pathlib import Path

    from crowdtrain.coordinator.admission.invites import InviteBook
    from crowdtrain.coordinator.peers.store import Store

    path = Path(data_dir).expanduser() / "state.sqlite3"
    if not path.exists():
        raise CrowdtrainError(f"{path} does not exist; pass the coordinator's --data-dir")
    return InviteBook(Store(path, flush_interval_s=0))


def cmd_invite_create(config: cfg.InviteCreateConfig) -> int:
    import time

    book = _invite_book(config.data_dir)
    try:
        code, invite = book.create(time.time(), config.uses, config.expires_in_s, config.note)
    except ValueError as e:
        raise CrowdtrainError(f"{e}; see `crowdtrain invite create --help`") from None
    finally:
        book.store.close()
    expires = _utc(invite.expires_unix_s) if invite.expires_unix_s is not None else "never"
    print(code)  # alone on stdout: `CODE=$(crowdtrain invite create ...)`
    print(
        f"invite {invite.invite_id}: {invite.uses_left} use(s), expires {expires}; volunteers join with "
        "`crowdtrain peer --invite CODE`; the code is shown only now",
        file=sys.stderr,
    )
    return 0


def _utc(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def cmd_invite_list(config: cfg.InviteListConfig) -> int:
    import time

    from crowdtrain.coordinator.admission.invites import invite_usable

    book = _invite_book(config.data_dir)
    try:
        invites = book.list()
    finally:
        book.store.close()
    now = time.time()
    print(f"{'ID':<8}  {'USES LEFT':>9}  {'EXPIRES':<23}  {'STATE':<9}  NOTE")
    for i in invites:
        usable, why = invite_usable(i, now)
        state = (
            "usable" if usable else "revoked" if i.revoked else "expired" if "expired" in why else "used up"
        )
        expires = _utc(i.expires_unix_s) if i.expires_unix_s is not None else "never"
        print(f"{i.invite_id:<8}  {i.uses_left:>9}  {expires:<23}  {state:<9}  {i.note}".rstrip())
    return 0


def cmd_invite_revoke(config: cfg.InviteRevokeConfig) -> int:
    book = _invite_book(config.data_dir)
    try:
        ended = book.revoke(config.invite_id)
    finally:
        book.store.close()
    if ended is None:
        raise CrowdtrainError(f"no invite {config.invite_id!r}; `crowdtrain invite list` shows the IDs")
    print(
        f"revoked invite {config.invite_id}; ended {ended} session(s) admitted with it (their swarm tokens "
        "are not renewed: they leave the swarm within --swarm-token-ttl-s)"
    )
    return 0


def cmd_demo(config: cfg.DemoConfig) -> int:
    from crowdtrain.coordinator.demo import run_demo

    return run_demo(config)


# The operator's commands: name -> (its settings class in coordinator/config.py, by name, so that
# the participant's commands never load that module; handler; help)
COMMANDS = {
    "coordinator": (
        "CoordinatorConfig",
        cmd_coordinator,
        "run a coordinator: bootstrap node, API, checkpoints",
    ),
    "status": ("StatusConfig", cmd_status, "show every peer's health and the swarm's progress"),
    "ban": (
        "BanConfig",
        cmd_ban,
        "refuse a peer's joins and heartbeats (run on the coordinator's machine)",
    ),
    "demo": ("DemoConfig", cmd_demo, "run a coordinator and peers locally and watch them train"),
}

# `crowdtrain invite create|list|revoke` (run on the coordinator's machine)
INVITE_COMMANDS = {
    "create": (
        "InviteCreateConfig",
        cmd_invite_create,
        "mint an invite code (printed once) for invite admission",
    ),
    "list": (
        "InviteListConfig",
        cmd_invite_list,
        "list invites: id, uses left, expiry, note (never the codes)",
    ),
    "revoke": (
        "InviteRevokeConfig",
        cmd_invite_revoke,
        "revoke an invite and end the sessions it admitted",
    ),
}


def _settings_class(name: str) -> type:
    """The operator's settings class `name`, from coordinator/config.py (imported only now)."""
    from crowdtrain.coordinator import config

    return getattr(config, name)


def _add_operator_command(sub, name: str, command: str | None) -> None:
    class_name, _, help_text = COMMANDS[name]
    sp = sub.add_parser(name, help=help_text, description=help_text)
    if command in (None, name):
        settings.add_arguments(sp, _settings_class(class_name))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, listed as always: the coordinator, the participant's, the rest of the
    operator's. Flags only for `command` (the one that runs), or for all when None."""
    parser = argparse.ArgumentParser(
        prog="crowdtrain", description="Train a shared transformer with volunteers."
    )
    peer_cli.add_logging_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_operator_command(sub, "coordinator", command)
    peer_cli.add_commands(sub, command)
    for name in ("status", "ban", "demo"):
        _add_operator_command(sub, name, command)
    invite = sub.add_parser("invite", help="invite codes for --admission invite (create, list, revoke)")
    invite_sub = invite.add_subparsers(dest="invite_command", required=True)
    for name, (class_name, _, help_text) in INVITE_COMMANDS.items():
        sp = invite_sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, "invite"):
            settings.add_arguments(sp, _settings_class(class_name))
    return parser


class _NamesOnly(argparse.ArgumentParser):
    """Reads no more than the subcommand's name; a mistake is left for the full parser to report."""

    def error(self, message: str):
        raise ValueError(message)


def _command_in(argv: list[str] | None) -> str | None:
    """The subcommand `argv` runs, read past the global flags as the full parser reads them; None
    if it names none (then every subcommand gets its flags, and the full parser says what is wrong)."""
    names = _NamesOnly(add_help=False)
    peer_cli.add_logging_options(names)
    names.add_argument("command", nargs="?")
    try:
        return names.parse_known_args(argv)[0].command
    except ValueError:
        return None


def _run(args: argparse.Namespace) -> int:
    if args.command in peer_cli.COMMANDS:
        return peer_cli.run(args)
    table, name = (
        (INVITE_COMMANDS, args.invite_command) if args.command == "invite" else (COMMANDS, args.command)
    )
    class_name, handler, _ = table[name]
    return handler(settings.from_arguments(_settings_class(class_name), args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser(_command_in(argv)).parse_args(argv)
    peer_cli.configure_logging(args.log_level, args.log_format)
    if args.log_format == "json" and args.command in ("peer", "coordinator"):
        peer_cli.hivemind_logs_through_ours()
    return peer_cli.exit_code(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
