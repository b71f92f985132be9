"""`crowdtrain`: one entry point, one subcommand per role. Flags are generated from config.py.

    crowdtrain coordinator --data-dir runs/mine --preset tiny
    crowdtrain peer --coordinator HOST:PORT
    crowdtrain pull --coordinator HOST:PORT --out ./model
    crowdtrain demo --peers 2 --minutes 4

Heavy imports (torch, hivemind, transformers) happen inside the command that needs them, so
`crowdtrain coordinator --help` is instant. Known failures print one `error:` line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# hivemind forks its DHT and averager processes while gRPC threads run; those children never use
# gRPC, so skip gRPC's fork handlers (which only log "Other threads are currently calling into gRPC")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from coordinator import config as cfg


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # hivemind installs its own handler on its loggers; keep them, but align their level
    for noisy in ("hivemind", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _known_errors() -> tuple[type[BaseException], ...]:
    from coordinator.checkpoints import CheckpointError
    from coordinator.client import CoordinatorRejected, CoordinatorUnavailable
    from coordinator.manifest import ManifestError
    from coordinator.service import PortInUseError

    errors: list[type[BaseException]] = [
        CheckpointError,
        CoordinatorRejected,
        CoordinatorUnavailable,
        ManifestError,
        PortInUseError,
        OSError,
        ValueError,
    ]
    for module, name in (
        ("peer.data", "DataError"),
        ("peer.pull", "PullError"),
        ("peer.trainer", "PeerError"),
        ("peer.swarm", "SwarmError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def cmd_coordinator(config: cfg.CoordinatorConfig) -> int:
    import signal

    from coordinator.app import Coordinator

    coordinator = Coordinator(config)
    try:
        coordinator.start()
        # installed after start(): hivemind's averager (in the publisher) sets SIGINT to "ignored"
        signal.signal(signal.SIGINT, lambda *_: coordinator.stop())
        signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
        coordinator.wait()
        logging.getLogger(__name__).info("shutting down")
    finally:
        coordinator.shutdown()
    return 0


def cmd_peer(config: cfg.PeerConfig) -> int:
    from peer.trainer import Volunteer

    return Volunteer(config).run()


def cmd_pull(config: cfg.PullConfig) -> int:
    from pathlib import Path

    from peer.pull import pull

    meta = pull(config.coordinator, Path(config.out), step=config.step, timeout_s=config.timeout_s)
    print(f"step {meta.step} (eval loss {meta.eval_loss:.4f}) verified and saved to {config.out}")
    return 0


def cmd_demo(config: cfg.DemoConfig) -> int:
    from coordinator.demo import run_demo

    return run_demo(config)


COMMANDS = {
    "coordinator": (
        cfg.CoordinatorConfig,
        cmd_coordinator,
        "run a coordinator: bootstrap node, API, checkpoints",
    ),
    "peer": (cfg.PeerConfig, cmd_peer, "donate compute: join a run and train"),
    "pull": (cfg.PullConfig, cmd_pull, "download and verify a published checkpoint"),
    "demo": (cfg.DemoConfig, cmd_demo, "run a coordinator and peers locally and watch them train"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdtrain", description="Train a shared transformer with volunteers."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        cfg.add_arguments(sp, config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    config_cls, handler, _ = COMMANDS[args.command]
    try:
        return handler(cfg.from_arguments(config_cls, args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, _known_errors()):
            print(f"error: {e}", file=sys.stderr)
            logging.getLogger(__name__).debug("details", exc_info=True)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
