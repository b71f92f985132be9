"""Frozen settings of every crowdtrain command; the CLI is generated from these dataclasses.

Each field's `help` metadata becomes its `--flag` help; units are in the names. Importing this module
is cheap (no torch, no hivemind), so `crowdtrain --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse's own keyword
    if default is dataclasses.MISSING:
        return field(metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: str = _f(REQUIRED, "directory holding the run: manifest, data shards, peer state, checkpoints")
    preset: str = _f("tiny", "run preset used when DATA_DIR holds no run yet (tiny, base125m)")
    data: tuple[str, ...] = _f(
        (), "text files or directories to train on (default: this Python's stdlib source)"
    )
    host: str = _f("127.0.0.1", "interface to bind the gRPC, HTTP and DHT servers to (0.0.0.0 for all)")
    public_host: str = _f(
        "", "address peers use to reach this machine (default: --host, or a guess for 0.0.0.0)"
    )
    grpc_port: int = _f(50051, "gRPC port of the coordinator API (0 picks a free port)")
    http_port: int = _f(8080, "HTTP port for data shards and checkpoint downloads (0 picks a free port)")
    dht_port: int = _f(0, "TCP port of the bootstrap DHT node (0: pick one once, then reuse it on restarts)")
    checkpoint_interval_s: float = _f(
        60.0, "how often to fetch the swarm's state and publish it (0 disables)"
    )
    device: str = _f("cpu", "where the publisher evaluates checkpoints: cpu, cuda or cuda:N")
    keep_last_checkpoints: int = _f(5, "retention: keep this many newest checkpoints (at least the latest)")
    keep_every_steps: int = _f(
        0, "retention: also keep every checkpoint whose step is a multiple of this (0: none)"
    )
    max_eval_regression_nats: float = _f(
        0.5, "refuse to publish a state whose eval loss is this much worse than the last checkpoint's"
    )
    state_agreement_peers: int = _f(
        2, "ask this many peers for the state and publish only what they agree on (1: trust one)"
    )
    state_agreement_rel_tol: float = _f(
        0.01, "peers' states agree when their relative L2 distance is at most this"
    )
    heartbeat_interval_s: float = _f(5.0, "how often peers send heartbeats")
    heartbeat_timeout_s: float = _f(20.0, "a peer silent for this long is considered dead")
    contribution_grace_s: float = _f(
        45.0,
        "a training peer missing from the swarm's progress records this long is flagged 'not contributing'",
    )


@dataclass(frozen=True)
class PeerConfig:
    coordinator: str = _f(REQUIRED, "HOST:PORT of the coordinator's gRPC API")
    name: str = _f("", "display name shown to operators (default: this machine's host name)")
    device: str = _f("auto", "where to train: auto, cpu, cuda or cuda:N")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    batch_size: int = _f(
        0, "sequences per local step (0: the run's default; lower it if you run out of memory)"
    )
    listen_host: str = _f("0.0.0.0", "interface the peer's DHT listens on")
    announce_host: str = _f("", "public address other peers should dial (set it behind port forwarding)")
    client_mode: bool = _f(False, "do not accept incoming connections (behind NAT without port forwarding)")
    cache_dir: str = _f("~/.cache/crowdtrain", "where downloaded data shards are kept")
    join_timeout_s: float = _f(60.0, "give up when the coordinator cannot be reached for this long")
    max_epochs: int = _f(0, "leave after the swarm reaches this epoch (0: train until stopped)")
    seed: int = _f(0, "data-order seed (0: derived from the session id)")
    save_dir: str = _f("", "when leaving, save this peer's copy of the model here (HF format)")


@dataclass(frozen=True)
class PullConfig:
    coordinator: str = _f(REQUIRED, "HOST:PORT of the coordinator's gRPC API, or its http://HOST:PORT")
    out: str = _f(
        REQUIRED, "directory to write the checkpoint to (created; replaced if it holds an older pull)"
    )
    step: int = _f(-1, "which checkpoint to download (-1: the latest)")
    timeout_s: float = _f(600.0, "give up when the download takes longer than this")


@dataclass(frozen=True)
class CheckpointsConfig:
    coordinator: str = _f(REQUIRED, "HOST:PORT of the coordinator's gRPC API, or its http://HOST:PORT")


@dataclass(frozen=True)
class VerifyConfig:
    directory: str = _f(REQUIRED, "a checkpoint directory (from `crowdtrain pull`)", positional=True)
    public_key: str = _f(
        "", "the run's Ed25519 public key, hex (from /api/v1/run); without it only integrity is checked"
    )


@dataclass(frozen=True)
class StatusConfig:
    coordinator: str = _f(REQUIRED, "HOST:PORT of the coordinator's gRPC API")
    watch_s: float = _f(0.0, "refresh every this many seconds until Ctrl+C (0: print once)")


@dataclass(frozen=True)
class BanConfig:
    data_dir: str = _f(REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)")
    peer: str = _f(REQUIRED, "peer name, session id or DHT peer id to ban")
    unban: bool = _f(False, "lift the ban instead")


@dataclass(frozen=True)
class DemoConfig:
    peers: int = _f(2, "number of volunteer peers to start")
    minutes: float = _f(4.0, "how long to train before publishing, pulling and sampling")
    preset: str = _f("tiny", "run preset")
    workdir: str = _f("", "directory for the demo's run (default: a new temporary directory)")
    checkpoint_interval_s: float = _f(20.0, "how often the coordinator publishes a checkpoint")


# ---------------------------------------------------------------- CLI generation


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--flag` per dataclass field: name with dashes, type and help from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, help=kwargs["help"], metavar=f.name.upper())
            continue
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = f.default
        elif typing.get_origin(tp) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0], default=f.default, metavar="PATH")
        else:
            kwargs.update(type=tp, required=required)
            if not required:
                kwargs["default"] = f.default
                kwargs["help"] += f" (default: {f.default!r})"
        parser.add_argument(flag, **kwargs)


def from_arguments(cls, namespace: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(namespace, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
