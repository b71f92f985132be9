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
traceback, a request to report it, exit 2. A mistyped subcommand, choice or flag is named with the
closest one ("did you mean"); `--log-level`/`--log-format` work before or after the subcommand;
Ctrl+C, even while the CLI is still loading, is one line and exit 130.

    CODE=$(crowdtrain invite create --data-dir runs/mine --uses 5 --expires-in-s 86400 --note "lab")
    crowdtrain invite list --data-dir runs/mine
    crowdtrain invite revoke --data-dir runs/mine ID
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from typing import TYPE_CHECKING

# hivemind forks its DHT and averager processes while gRPC threads run; those children never use
# gRPC, so skip gRPC's fork handlers (which only log "Other threads are currently calling into gRPC")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as shells report it

try:  # a Ctrl+C while these load (a fraction of a second) is one line, not a traceback
    from crowdtrain.peer import __version__
    from crowdtrain.peer import cli as peer_cli
    from crowdtrain.peer.display import clean_display
    from crowdtrain.peer.errors import CrowdtrainError
    from crowdtrain.peer.settings import commands as settings
except KeyboardInterrupt:
    print("interrupted (Ctrl+C)", file=sys.stderr)
    raise SystemExit(INTERRUPTED_EXIT_STATUS) from None

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
    from crowdtrain.coordinator.config import check_ports_free

    check_ports_free(config)  # not for --install-service: this coordinator may be running meanwhile
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


def cmd_status(config: cfg.StatusConfig, as_json: bool = False) -> int:
    """The status table (or, `as_json`, one JSON document per refresh) over the gRPC API at HOST:PORT,
    or over the HTTP API at an http(s):// URL or at a HOST:PORT that turns out to be the HTTP port."""
    import json
    import time

    from crowdtrain.coordinator.dashboard.render import format_status, status_json
    from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorSpeaksHttp, is_http_url
    from crowdtrain.peer.link.tls import ClientTls

    tls = ClientTls.from_flags(config.tls, config.tls_ca)
    base = config.coordinator.rstrip("/")
    client = None if is_http_url(base) else CoordinatorClient(base, tls=tls)
    try:
        while True:
            try:
                status = client.get_status() if client is not None else _status_over_http(base, tls)
            except CoordinatorSpeaksHttp:  # the dashboard's HOST:PORT: its HTTP API has the same
                client.close()
                client, base = None, ("https://" if tls.enabled else "http://") + base
                continue
            text = json.dumps(status_json(status)) if as_json else format_status(status, time.time())
            if config.watch_s > 0 and not as_json:
                print("\033[2J\033[H" + text, flush=True)
            else:
                print(text, flush=True)
            if config.watch_s <= 0:
                return 0
            time.sleep(config.watch_s)
    finally:
        if client is not None:
            client.close()


def _status_over_http(base: str, tls):
    """The coordinator's status from its HTTP API (/api/v1/state and /api/v1/peers at `base`)."""
    import json
    import urllib.error

    from crowdtrain.coordinator.dashboard.render import status_from_json
    from crowdtrain.peer.link.download import open_url
    from crowdtrain.peer.link.tls import plaintext_refusal
    from google.protobuf.json_format import ParseError

    refused = plaintext_refusal(base, tls)
    if refused:
        raise CrowdtrainError(refused)
    context = tls.ssl_context()
    try:
        documents = []
        for view in ("state", "peers"):
            with open_url(f"{base}/api/v1/{view}", 30, context) as response:
                documents.append(json.loads(response.read(64 << 20)))
        return status_from_json(*documents)
    except (urllib.error.URLError, OSError) as e:
        raise CrowdtrainError(
            f"could not read the status at {base}: {clean_display(str(e), 300)}; check the address "
            "(the coordinator's HTTP address, or its gRPC HOST:PORT) and that the coordinator is running"
        ) from None
    except (ValueError, TypeError, ParseError) as e:
        raise CrowdtrainError(
            f"{base} answered with something that is not a crowdtrain coordinator's status "
            f"({clean_display(str(e), 200)}); is that the coordinator's address?"
        ) from None


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


def cmd_invite_list(config: cfg.InviteListConfig, as_json: bool = False) -> int:
    import json
    import time

    from crowdtrain.coordinator.admission.invites import invite_usable

    book = _invite_book(config.data_dir)
    try:
        invites = book.list()
    finally:
        book.store.close()
    now = time.time()
    rows = []
    for i in invites:
        usable, why = invite_usable(i, now)
        state = (
            "usable" if usable else "revoked" if i.revoked else "expired" if "expired" in why else "used up"
        )
        rows.append((i, state))
    if as_json:  # never the codes, as in the table
        keys = ("invite_id", "uses_left", "expires_unix_s", "created_unix_s", "revoked", "note")
        print(json.dumps({"invites": [{k: getattr(i, k) for k in keys} | {"state": s} for i, s in rows]}))
        return 0
    print(f"{'ID':<8}  {'USES LEFT':>9}  {'EXPIRES':<23}  {'STATE':<9}  NOTE")
    for i, state in rows:
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


# the listing commands of the operator's that also print one JSON document (`--json`); the
# participant's `checkpoints` has it among its settings
JSON_COMMANDS = ("status", "invite list")


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (stable keys, for scripts) instead of the table",
    )


def _add_operator_command(sub, name: str, command: str | None) -> None:
    class_name, _, help_text = COMMANDS[name]
    sp = sub.add_parser(name, help=help_text, description=help_text)
    if command in (None, name):
        settings.add_arguments(sp, _settings_class(class_name))
        if name in JSON_COMMANDS:
            _add_json_flag(sp)
        if name == "coordinator":
            sp.add_argument(
                "--install-service",
                action="store_true",
                help="write a systemd user unit that runs this coordinator with these settings at every "
                "login (and boot, with lingering), print how to enable it, and exit",
            )
    peer_cli.add_logging_options(sp.add_argument_group("Logging"), on_subcommand=True)


class _Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a mistyped subcommand or choice (subparsers are made of
    the same class, so every level has it), and a usage line short enough to leave the error in view."""

    def error(self, message: str):
        choice = re.match(r"argument .*: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            options = [c.strip().strip("'\"") for c in choice.group(2).split(",")]
            message += did_you_mean(choice.group(1), options)
        usage = self.format_usage()
        if usage.count("\n") > 3:  # the coordinator's dozens of flags would bury the one line that matters
            usage = f"usage: {self.prog} [options] (`{self.prog} --help` lists them by topic)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def did_you_mean(word: str, options) -> str:
    """ "; did you mean X?" for the option closest to `word`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


ROLES = """by role:
  volunteers    doctor, then peer --coordinator HOST:PORT; ctl to pause, resume or change it; identity
  operators     coordinator --data-dir DIR; status, ban, invite; demo to try it on one machine
  downloaders   checkpoints, pull --coordinator HOST:PORT --out DIR, verify
`crowdtrain COMMAND --help` for each; README.md for the whole story."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, listed as always: the coordinator, the participant's, the rest of the
    operator's. Flags only for `command` (the one that runs), or for all when None. The logging
    flags work before or after the subcommand."""
    parser = _Parser(
        prog="crowdtrain",
        description="Train a shared transformer with volunteers.",
        epilog=ROLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crowdtrain {__version__}")
    peer_cli.add_logging_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_operator_command(sub, "coordinator", command)
    peer_cli.add_commands(sub, command)
    for name in ("status", "ban", "demo"):
        _add_operator_command(sub, name, command)
    invite = sub.add_parser("invite", help="invite codes for --admission invite (create, list, revoke)")
    peer_cli.add_logging_options(invite, on_subcommand=True)
    invite_sub = invite.add_subparsers(dest="invite_command", required=True)
    for name, (class_name, _, help_text) in INVITE_COMMANDS.items():
        sp = invite_sub.add_parser(name, help=help_text, description=help_text)
        peer_cli.add_logging_options(sp, on_subcommand=True)
        if command in (None, "invite"):
            settings.add_arguments(sp, _settings_class(class_name))
            if f"invite {name}" in JSON_COMMANDS:
                _add_json_flag(sp)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of `parser`'s subcommands ({} if it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _check_flags(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> None:
    """Name a flag no parser on `command`'s path knows, with the closest one, before argparse
    would report something else first (a required flag "missing" because its name was mistyped)."""
    sub = _subparsers(parser).get(command or "")
    if sub is None:
        return
    known = set(parser._option_string_actions) | set(sub._option_string_actions)
    tail = argv[argv.index(command) + 1 :] if command in argv else argv
    for leaf_name, leaf in _subparsers(sub).items():  # `invite list` and the like
        if leaf_name in tail:
            sub, known = leaf, known | set(leaf._option_string_actions)
            break
    for token in tail:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or any(k.startswith(flag) for k in known):
            continue  # a value, or a flag (argparse takes unique prefixes; it reports ambiguous ones)
        sub.error(
            f"unrecognized argument {flag}"
            + did_you_mean(flag, sorted(k for k in known if k.startswith("--")))
        )


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
    config = settings.from_arguments(_settings_class(class_name), args)
    if args.command == "coordinator":  # every flag can work, before a file is written or torch loads
        from crowdtrain.coordinator.config import check_usable

        check_usable(config)
        if args.log_format == "json":  # imports hivemind (seconds): only for settings that can work
            peer_cli.hivemind_logs_through_ours()
    if getattr(args, "install_service", False):
        from crowdtrain.peer.settings.service import (
            COORDINATOR_UNIT_NAME,
            coordinator_unit_text,
            how_to_enable,
            install_unit,
            unit_path,
        )

        print(how_to_enable(install_unit(coordinator_unit_text(config), unit_path(COORDINATOR_UNIT_NAME))))
        return 0
    return handler(config, as_json=args.json) if hasattr(args, "json") else handler(config)


def main(argv: list[str] | None = None) -> int:
    try:
        command = _command_in(argv)
        parser = build_parser(command)
        _check_flags(parser, command, sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # before the command starts; exit_code handles it after
        print(peer_cli.interrupted(None), file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    peer_cli.configure_logging(args.log_level, args.log_format)
    if args.log_format == "json" and args.command == "peer":  # the coordinator's: once its flags pass
        peer_cli.hivemind_logs_through_ours()
    return peer_cli.exit_code(lambda: _run(args), args.command)


if __name__ == "__main__":
    sys.exit(main())
