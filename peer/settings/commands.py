"""Frozen settings of the participant's commands (peer, pull, checkpoints, verify, doctor) and the CLI
generator every crowdtrain command uses.

Each field's `help` metadata becomes its `--flag` help; units are in the names. Importing this module
is cheap (no torch, no hivemind), so `crowdtrain --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

import platformdirs


def option(default, help: str, **kw):  # noqa: A002 - mirrors argparse's own keyword
    """A dataclass field that becomes a `--flag` with this help."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


REQUIRED = dataclasses.MISSING


# flags that several commands share, each written once
def coordinator_flag(*, http_too: bool = False):
    """`--coordinator`: where the command's coordinator is (`http_too`: its HTTP address works too)."""
    return option(
        REQUIRED,
        "HOST:PORT of the coordinator's gRPC API" + (", or its http://HOST:PORT" if http_too else ""),
    )


def json_flag():
    """`--json`: a listing command prints one JSON document for scripts instead of its table."""
    return option(False, "print one JSON document (stable keys, for scripts) instead of the table")


def tls_flag():
    """`--tls`: with the system's trusted certificates."""
    return option(False, "talk to the coordinator over TLS, trusting the system's certificate store")


def tls_ca_flag():
    """`--tls-ca`: with one CA certificate."""
    return option("", "talk to the coordinator over TLS, trusting this CA certificate (PEM)")


@dataclass(frozen=True)
class PeerConfig:
    coordinator: str = coordinator_flag()
    name: str = option(
        "",
        "public display name on the run's dashboard (default: a random handle such as volunteer-3f9a, "
        "kept in the config directory; never this machine's host name)",
    )
    device: str = option(
        "auto", "where to train: auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    gpu: int = option(-1, "which CUDA GPU to train on, by index (-1: the first)")
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    nice: int = option(
        10, "lower this peer's CPU priority by this much, 0-19, so the machine's owner comes first"
    )
    batch_size: int = option(
        0, "sequences per local step (0: the run's default; lower it if you run out of memory)"
    )
    max_memory_gb: float = option(
        0.0,
        "use at most this much memory for training (0: what the device has free); the peer picks the "
        "largest micro-batch that fits and accumulates up to --batch-size",
    )
    precision: str = option(
        "auto", "compute precision: auto (bf16 on hardware that supports it, else fp32), bf16 or fp32"
    )
    max_upload_mbps: float = option(
        0.0, "cap what this peer sends to other peers (averaging, serving state), Mbit/s (0: no cap)"
    )
    schedule: str = option(
        "",
        "train only in these local-time windows, e.g. 22:00-08:00 or 09:00-12:00,13:00-17:00 (empty: always)",
    )
    pause_when_busy: float = option(
        0.0, "pause while other processes keep the CPU (or GPU) busier than this percent (0: never)"
    )
    pause_on_battery: bool = option(False, "pause while this machine runs on battery")
    listen_host: str = option("0.0.0.0", "interface the peer's DHT listens on")
    listen_port: int = option(
        0, "TCP port the peer's DHT listens on (0: any free one; fix it to forward it on your router)"
    )
    announce_host: str = option(
        "", "public address other peers should dial (with --listen-port, behind port forwarding)"
    )
    client_mode: bool = option(
        False, "do not accept incoming connections (behind NAT without port forwarding)"
    )
    cache_dir: str = option(
        platformdirs.user_cache_dir("crowdtrain"),  # honours XDG_CACHE_HOME; ~/Library/Caches on macOS
        "where downloaded data shards and checkpoints are kept, one directory per run",
    )
    # a run's directory holds the shards this peer read and one resume checkpoint (base125m: ~0.5 GB
    # of weights): 20 GB keeps several runs of any preset, a few percent of a volunteer's disk
    max_cache_gb: float = option(
        20.0,
        "at start, remove other runs' cache directories, least recently used first, until the cache "
        "fits in this many GB (never the current run's, never one another peer uses; 0: no cap)",
    )
    join_timeout_s: float = option(60.0, "give up when the coordinator cannot be reached for this long")
    max_epochs: int = option(0, "leave after the swarm reaches this epoch (0: train until stopped)")
    seed: int = option(0, "data-order seed (0: derived from the session id)")
    save_dir: str = option("", "when leaving, save this peer's copy of the model here (HF format)")
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()
    invite: str = option("", "invite code from the run's operator (runs that admit by invitation)")
    identity: str = option(
        "",
        "this peer's hivemind identity key file (created if missing, mode 0600): its peer id, page "
        "and credit survive restarts (`crowdtrain identity` prints the id for an allowlist); a peer "
        "holds its key while it runs, so give a second peer on this machine another file; "
        "default: identity.key in crowdtrain's config directory",
    )
    token_wait_s: float = option(
        60.0, "give up when the coordinator has not admitted this peer to the swarm within this long"
    )
    trust_new_run: bool = option(
        False,
        "join a run (and trust its key) although this machine trusted another run under another key "
        "at this coordinator address: only after checking the new run's key with its operator (an "
        "impostor can re-sign the real run under a new run id); needed once, never written to the service",
    )


@dataclass(frozen=True)
class IdentityConfig:
    identity: str = option(
        "",
        "the identity key file (created if missing; default: identity.key in crowdtrain's config directory)",
    )


@dataclass(frozen=True)
class PullConfig:
    coordinator: str = coordinator_flag(http_too=True)
    out: str = option(
        REQUIRED, "directory to write the checkpoint to (created; replaced if it holds an older pull)"
    )
    step: int = option(-1, "which checkpoint to download (-1: the latest)")
    timeout_s: float = option(600.0, "give up when the download takes longer than this")
    public_key: str = option(
        "",
        "the run's Ed25519 public key, hex (ask the run's operator); without it the key seen at this "
        "coordinator address first is trusted and a different one later is refused",
    )
    trust_new_key: bool = option(
        False, "accept the key the coordinator now signs with although it differs from the one trusted before"
    )
    trust_new_run: bool = option(
        False,
        "accept a run this machine has not trusted at this coordinator address, signed by a key not "
        "trusted there (a run a training peer joined is not trusted by pull on that alone)",
    )
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()


@dataclass(frozen=True)
class CheckpointsConfig:
    coordinator: str = coordinator_flag(http_too=True)
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()
    json: bool = json_flag()


@dataclass(frozen=True)
class VerifyConfig:
    directory: str = option(REQUIRED, "a checkpoint directory (from `crowdtrain pull`)", positional=True)
    public_key: str = option(
        "", "the run's Ed25519 public key, hex (from /api/v1/run); without it only integrity is checked"
    )


@dataclass(frozen=True)
class DoctorConfig:
    coordinator: str = option(
        "",
        "also check this coordinator: reachable, compatible, clocks agree (HOST:PORT of its gRPC API, "
        "or its http://HOST:PORT); empty: this machine only",
    )
    gpu: int = option(-1, "which CUDA GPU to check, by index (-1: the first, as `crowdtrain peer` picks)")
    cache_dir: str = option(
        PeerConfig.cache_dir, "the cache directory `crowdtrain peer` will use (its --cache-dir)"
    )
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()
    json: bool = option(
        False, "print one JSON list of the checks (stable keys, for scripts) instead of lines"
    )


@dataclass(frozen=True)
class CtlConfig:
    action: str = option(
        REQUIRED, "status, pause, resume, finish-and-pause, or set", positional=True, metavar="ACTION"
    )
    setting: str = option(
        "",
        "with set: a setting that changes live (schedule, pause_when_busy, pause_on_battery, threads)",
        positional=True,
        metavar="KEY=VALUE",
    )
    pid: int = option(0, "which peer, when several of yours run on this machine (0: the only one)")
    timeout_s: float = option(5.0, "give up when the peer does not answer within this long")
    json: bool = option(False, "print the peer's reply as one JSON document (stable keys, for scripts)")


def add_arguments(parser: argparse.ArgumentParser, cls, *, layered: bool = False) -> None:
    """Add one `--flag` per dataclass field: name with dashes, type and help from the field.
    `layered`: a flag not given is absent from the parsed namespace (nothing is required), so that
    the environment and a config file can supply it (peer/settings/layered.py)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if layered:
            parser.add_argument(flag, **_layered_kwargs(kwargs, tp, f.default, required))
            continue
        if f.metadata.get("positional"):
            optional = {} if required else {"nargs": "?", "default": f.default}  # one that may be left out
            metavar = f.metadata.get("metavar", f.name.upper())
            parser.add_argument(f.name, type=tp, help=kwargs["help"], metavar=metavar, **optional)
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


def _layered_kwargs(kwargs: dict, tp, default, required: bool) -> dict:
    """argparse keywords for a flag whose absence is left to the environment, a file or the default."""
    kwargs = dict(kwargs, default=argparse.SUPPRESS)
    if tp is bool:
        return kwargs | {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:
        return kwargs | {"nargs": "+", "type": typing.get_args(tp)[0], "metavar": "PATH"}
    note = " (required)" if required else f" (default: {default!r})"
    return kwargs | {"type": tp, "help": kwargs["help"] + note}


def given_flags(cls, namespace: argparse.Namespace) -> dict:
    """The fields of `cls` given as flags on a layered command line (lists as tuples)."""
    values = {
        f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)
    }
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def from_arguments(cls, namespace: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(namespace, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
