"""`crowdtrain`: one entry point, one subcommand per role. Flags are generated from config.py.

    crowdtrain coordinator --data-dir runs/mine --preset tiny
    crowdtrain peer --coordinator HOST:PORT
    crowdtrain pull --coordinator HOST:PORT --out ./model
    crowdtrain demo --peers 2 --minutes 4

Heavy imports (torch, hivemind, transformers) happen inside the command that needs them, so
`crowdtrain coordinator --help` is instant. Expected failures (`CrowdtrainError`, and the
operating system refusing something: `OSError`) print one `error:` line and exit 1; anything
else is a bug: a full traceback, a request to report it, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

# hivemind forks its DHT and averager processes while gRPC threads run; those children never use
# gRPC, so skip gRPC's fork handlers (which only log "Other threads are currently calling into gRPC")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from crowdtrain.coordinator import config as cfg
from crowdtrain.coordinator.cli_invite import INVITE_COMMANDS
from crowdtrain.peer import __version__
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import JsonFormatter, quiet_expected_averaging_failures
from crowdtrain.peer.settings import commands as peer_cfg
from crowdtrain.peer.settings.layered import add_layered_options, config_from_command_line


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # hivemind installs its own handler on its loggers; keep them, but align their level and format
    for noisy in ("hivemind", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    quiet_expected_averaging_failures()


def _hivemind_logs_through_ours() -> None:
    """hivemind logs through a handler of its own (colored text, installed on import); send its
    records to ours instead, so `--log-format json` output has no plain lines from it."""
    from hivemind.utils.logging import use_hivemind_log_handler

    level = logging.getLogger("hivemind").level
    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(level)


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


def cmd_peer(config: peer_cfg.PeerConfig) -> int:
    from crowdtrain.peer.volunteer.trainer import Volunteer

    if not 0 <= config.nice <= 19:
        raise CrowdtrainError(f"--nice must be 0 to 19, not {config.nice}")
    if config.nice:  # before anything starts: hivemind's processes and p2pd inherit it
        os.nice(config.nice)
    return Volunteer(config).run()


def cmd_identity(config: peer_cfg.IdentityConfig) -> int:
    """Print this machine's persistent peer id (for an operator's allowlist)."""
    from pathlib import Path

    from crowdtrain.peer.admission.identity import PeerIdentity
    from crowdtrain.peer.settings.layered import default_config_dir

    path = Path(config.identity).expanduser() if config.identity else default_config_dir() / "identity.key"
    identity = PeerIdentity(path)
    print(identity.peer_id)
    print(f"(key in {path}; start peers with --identity {path} to use it)", file=sys.stderr)
    return 0


def cmd_pull(config: peer_cfg.PullConfig) -> int:
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


def _ago(now: float, t: float) -> str:
    s = max(0.0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


# REPORTED: times other peers refused its contributions (evidence; enough of them ban it)
_STATUS_COLUMNS = (
    *"ID NAME STATE REASON DEVICE VERSION NETWORK DATA SAMPLES/S EPOCH COMPUTED CONTRIBUTED".split(),
    *"REPORTED SWARM UPTIME".split(),
    "LAST SEEN",
)


def _data_read(s) -> str:
    """How much of the training data the swarm has read (every finished pass counted)."""
    share = s.dataset_sequences_read / s.dataset_sequences
    sized = (
        f", {s.dataset_shards_sized} of {s.dataset_shards} shards sized"
        if s.dataset_shards_sized < s.dataset_shards
        else ""
    )
    return f"{s.dataset_sequences_read:,} of {s.dataset_sequences:,} training sequences ({share:.1%}{sized})"


def format_status(status, now: float) -> str:
    """Render a GetStatusResponse as the operator's table (SWARM: peers it sees in the run's progress
    records; UPTIME: since its heartbeats started)."""
    from collections import Counter

    s = status.summary
    loss = (
        f"{s.latest_eval_loss:.3f} (step {s.latest_checkpoint_step})"
        if s.latest_checkpoint_step >= 0
        else "none yet"
    )
    states = ", ".join(f"{n} {state}" for state, n in sorted(s.peers_by_state.items()) if n) or "no peers"
    versions = Counter(
        p.version or "unknown" for p in status.peers if p.state in ("JOINING", "ONLINE", "PAUSED", "STALE")
    )
    lines = [
        f"run {clean_display(s.run_id)}: global epoch {s.global_epoch}, swarm {s.samples_per_s:.1f} samples/s, "
        f"latest checkpoint eval loss {loss}, {s.total_contributed_samples} samples contributed",
        f"peers: {states}",
        *([f"versions: {', '.join(f'{v} x{n}' for v, n in versions.most_common())}"] if versions else []),
        *([f"last refused checkpoint: {clean_display(s.last_rejection)}"] if s.last_rejection else []),
        *([f"data read: {_data_read(s)}"] if s.dataset_sequences else []),
        "",
    ]
    header = _STATUS_COLUMNS
    rows = [
        (
            p.peer_id,
            p.name,
            p.state,
            p.reason,
            p.device,
            p.version or "-",
            "client" if p.client_mode else p.reachability or "-",
            f"{p.shard_index}:{p.shard_position}" if p.shard_position else "-",  # shard:sequence
            f"{p.samples_per_s:.1f}",
            str(p.local_epoch),
            str(p.computed_samples),
            str(p.contributed_samples),
            str(p.rejections_against) if p.rejections_against else "-",
            str(p.swarm_size) if p.swarm_size else "-",
            _ago(p.uptime_s, 0.0).removesuffix(" ago") if p.uptime_s > 0 else "-",  # 0: no heartbeat yet
            _ago(now, p.last_seen_unix_s),
        )
        for p in status.peers
    ]
    # names and reasons come from strangers: no control character reaches the terminal, even from a
    # database written before display text was cleaned at input
    rows = [tuple(clean_display(cell) for cell in row) for row in rows]
    widths = [min(60, max(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell[:60].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if s.peers_not_listed:
        lines.append(f"... and {s.peers_not_listed} more peer(s) not listed")
    return "\n".join(lines)


def cmd_status(config: cfg.StatusConfig) -> int:
    import time

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


def cmd_checkpoints(config: peer_cfg.CheckpointsConfig) -> int:
    import time

    from crowdtrain.peer.checkpoints.pull import list_published
    from crowdtrain.peer.link.tls import ClientTls

    listed, public_key = list_published(config.coordinator, ClientTls.from_flags(config.tls, config.tls_ca))
    claimed = clean_display(public_key, 128) or "an unknown key"  # the coordinator's words, unchecked
    print(f"{len(listed)} checkpoint(s); the coordinator says they are signed by {claimed}")
    print(f"{'STEP':>8}  {'PUBLISHED (UTC)':<19}  {'EVAL LOSS':>9}  {'SIZE MB':>8}")
    for c in listed:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created_unix_s))
        print(
            f"{c.step:>8}  {when:<19}  {c.eval_loss:>9.4f}  {sum(f.size_bytes for f in c.files) / 1e6:>8.1f}"
        )
    return 0


def cmd_verify(config: peer_cfg.VerifyConfig) -> int:
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


def cmd_demo(config: cfg.DemoConfig) -> int:
    from crowdtrain.coordinator.demo import run_demo

    return run_demo(config)


COMMANDS = {
    "coordinator": (
        cfg.CoordinatorConfig,
        cmd_coordinator,
        "run a coordinator: bootstrap node, API, checkpoints",
    ),
    "peer": (peer_cfg.PeerConfig, cmd_peer, "donate compute: join a run and train"),
    "identity": (
        peer_cfg.IdentityConfig,
        cmd_identity,
        "print this machine's peer id for a run's allowlist (creates the key once)",
    ),
    "pull": (peer_cfg.PullConfig, cmd_pull, "download and verify a published checkpoint"),
    "checkpoints": (
        peer_cfg.CheckpointsConfig,
        cmd_checkpoints,
        "list published checkpoints (step, time, eval loss, size)",
    ),
    "verify": (
        peer_cfg.VerifyConfig,
        cmd_verify,
        "check a downloaded checkpoint offline: signature and every sha256",
    ),
    "status": (cfg.StatusConfig, cmd_status, "show every peer's health and the swarm's progress"),
    "ban": (
        cfg.BanConfig,
        cmd_ban,
        "refuse a peer's joins and heartbeats (run on the coordinator's machine)",
    ),
    "demo": (cfg.DemoConfig, cmd_demo, "run a coordinator and peers locally and watch them train"),
}


LAYERED = ("peer",)  # commands whose settings may also come from the environment and a file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdtrain", description="Train a shared transformer with volunteers."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per log line, with progress events (schema in README.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        peer_cfg.add_arguments(sp, config_cls, layered=name in LAYERED)
        if name in LAYERED:
            add_layered_options(sp, name)
    invite = sub.add_parser("invite", help="invite codes for --admission invite (create, list, revoke)")
    invite_sub = invite.add_subparsers(dest="invite_command", required=True)
    for name, (config_cls, _, help_text) in INVITE_COMMANDS.items():
        peer_cfg.add_arguments(invite_sub.add_parser(name, help=help_text, description=help_text), config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    if args.log_format == "json" and args.command in ("peer", "coordinator"):
        _hivemind_logs_through_ours()
    config_cls, handler, _ = (
        INVITE_COMMANDS[args.invite_command] if args.command == "invite" else COMMANDS[args.command]
    )
    try:
        if args.command in LAYERED:
            config = config_from_command_line(args.command, config_cls, args, os.environ)
            return 0 if config is None else handler(config)
        return handler(peer_cfg.from_arguments(config_cls, args))
    except KeyboardInterrupt:
        return 130
    except CrowdtrainError as e:  # expected, and its message says what to do
        # cleaned: a message may quote a coordinator (gRPC details, HTTP reasons), escapes and all
        print(f"error: {clean_display(str(e))}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())
