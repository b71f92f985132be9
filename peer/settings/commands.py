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

# the sections of `crowdtrain peer --help` (a field's `topic`), shown in the order they first appear
CONNECTION, IDENTITY, MACHINE = "Connection", "Identity", "Machine"
POLITENESS, NETWORK, TRAINING = "Politeness and schedule", "Network", "Training"


# flags that several commands share, each written once
def coordinator_flag(*, http_too: bool = False):
    """`--coordinator`: where the command's coordinator is (`http_too`: its HTTP address works too)."""
    return option(
        REQUIRED,
        "HOST:PORT of the coordinator's gRPC API" + (", or its http://HOST:PORT" if http_too else ""),
        metavar="HOST:PORT",
        topic=CONNECTION,
    )


def json_flag():
    """`--json`: a listing command prints one JSON document for scripts instead of its table."""
    return option(False, "print one JSON document (stable keys, for scripts) instead of the table")


def tls_flag():
    """`--tls`: with the system's trusted certificates."""
    return option(
        False, "talk to the coordinator over TLS, trusting the system's certificate store", topic=CONNECTION
    )


def tls_ca_flag():
    """`--tls-ca`: with one CA certificate."""
    return option(
        "",
        "talk to the coordinator over TLS, trusting this CA certificate (PEM)",
        metavar="PATH",
        topic=CONNECTION,
    )


@dataclass(frozen=True)
class PeerConfig:
    coordinator: str = coordinator_flag()
    name: str = option(
        "",
        "public display name on the run's dashboard (default: a random handle such as volunteer-3f9a, "
        "kept in the config directory; never this machine's host name)",
        metavar="NAME",
        topic=IDENTITY,
    )
    device: str = option(
        "auto",
        "where to train: auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps",
        metavar="DEVICE",
        topic=MACHINE,
    )
    gpu: int = option(-1, "which CUDA GPU to train on, by index (-1: the first)", topic=MACHINE)
    threads: int = option(0, "CPU threads for torch (0: torch's default)", topic=MACHINE)
    nice: int = option(
        10,
        "lower this peer's CPU priority by this much, 0-19, so the machine's owner comes first",
        topic=POLITENESS,
    )
    batch_size: int = option(
        0,
        "sequences per local step (0: the run's default; lower it if you run out of memory)",
        topic=MACHINE,
    )
    max_memory_gb: float = option(
        0.0,
        "use at most this much memory for training (0: what the device has free); the peer picks the "
        "largest micro-batch that fits and accumulates up to --batch-size",
        topic=MACHINE,
    )
    precision: str = option(
        "auto",
        "compute precision: auto (bf16 on hardware that supports it, else fp32), bf16 or fp32",
        metavar="PRECISION",
        topic=MACHINE,
    )
    max_upload_mbps: float = option(
        0.0,
        "cap what this peer sends to other peers (averaging, serving state), Mbit/s (0: no cap)",
        topic=POLITENESS,
    )
    schedule: str = option(
        "",
        "train only in these local-time windows, e.g. 22:00-08:00 or 09:00-12:00,13:00-17:00 (empty: always)",
        metavar="HH:MM-HH:MM",
        topic=POLITENESS,
    )
    pause_when_busy: float = option(
        0.0,
        "pause while other processes keep the CPU (or GPU) busier than this percent (0: never)",
        metavar="PERCENT",
        topic=POLITENESS,
    )
    pause_on_battery: bool = option(False, "pause while this machine runs on battery", topic=POLITENESS)
    listen_host: str = option("0.0.0.0", "interface the peer's DHT listens on", topic=NETWORK)
    listen_port: int = option(
        0,
        "TCP port the peer's DHT listens on (0: any free one; fix it to forward it on your router)",
        topic=NETWORK,
    )
    announce_host: str = option(
        "",
        "public address other peers should dial (with --listen-port, behind port forwarding)",
        topic=NETWORK,
    )
    client_mode: bool = option(
        False,
        "do not accept incoming connections (behind NAT without port forwarding)",
        topic=NETWORK,
    )
    cache_dir: str = option(
        platformdirs.user_cache_dir("crowdtrain"),  # honours XDG_CACHE_HOME; ~/Library/Caches on macOS
        "where downloaded data shards and checkpoints are kept, one directory per run",
        topic=MACHINE,
    )
    # a run's directory holds the shards this peer read and one resume checkpoint (base125m: ~0.5 GB
    # of weights): 20 GB keeps several runs of any preset, a few percent of a volunteer's disk
    max_cache_gb: float = option(
        20.0,
        "at start, remove other runs' cache directories, least recently used first, until the cache "
        "fits in this many GB (never the current run's, never one another peer uses; 0: no cap)",
        topic=MACHINE,
    )
    join_timeout_s: float = option(
        60.0, "give up when the coordinator cannot be reached for this long", topic=CONNECTION
    )
    max_epochs: int = option(
        0, "leave after the swarm reaches this epoch (0: train until stopped)", topic=TRAINING
    )
    seed: int = option(0, "data-order seed (0: derived from the session id)", topic=TRAINING)
    save_dir: str = option(
        "", "when leaving, save this peer's copy of the model here (HF format)", topic=TRAINING
    )
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()
    invite: str = option(
        "",
        "invite code from the run's operator (runs that admit by invitation)",
        metavar="CODE",
        topic=CONNECTION,
    )
    identity: str = option(
        "",
        "this peer's hivemind identity key file (created if missing, mode 0600): its peer id, page "
        "and credit survive restarts (`crowdtrain identity` prints the id for an allowlist); a peer "
        "holds its key while it runs, so give a second peer on this machine another file; "
        "default: identity.key in crowdtrain's config directory",
        metavar="PATH",
        topic=IDENTITY,
    )
    token_wait_s: float = option(
        60.0,
        "give up when the coordinator has not admitted this peer to the swarm within this long",
        topic=CONNECTION,
    )
    trust_new_run: bool = option(
        False,
        "join a run (and trust its key) although this machine trusted another run under another key "
        "at this coordinator address: only after checking the new run's key with its operator (an "
        "impostor can re-sign the real run under a new run id); needed once, never written to the service",
        topic=CONNECTION,
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
        metavar="HOST:PORT",
        topic=CONNECTION,
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
        "with set: a setting that changes live (schedule, pause_when_busy, pause_on_battery, threads, "
        "max_upload_mbps)",
        positional=True,
        metavar="KEY=VALUE",
    )
    pid: int = option(0, "which peer, when several of yours run on this machine (0: the only one)")
    timeout_s: float = option(5.0, "give up when the peer does not answer within this long")
    json: bool = option(False, "print the peer's reply as one JSON document (stable keys, for scripts)")


# the placeholder `--help` shows for a flag's value, by the end of the flag's name: its unit or kind
METAVAR_BY_SUFFIX = (
    ("_s", "SECONDS"),
    ("port", "PORT"),
    ("host", "HOST"),
    ("_dir", "PATH"),
    ("_path", "PATH"),
    ("_gb", "GB"),
    ("_mbps", "MBIT/S"),
)


def default_metavar(name: str, tp) -> str | None:
    """The placeholder for a flag's value when its field names none (`option(..., metavar=...)`):
    its unit or kind from the end of its name, else N for numbers and TEXT for text; None for a
    switch. Never the field's own name in capitals, which says nothing the flag does not."""
    if tp is bool:
        return None
    for suffix, metavar in METAVAR_BY_SUFFIX:
        if name.endswith(suffix):
            return metavar
    if typing.get_origin(tp) is tuple:
        return "PATH"
    return "N" if tp in (int, float) else "TEXT"


def add_arguments(parser: argparse.ArgumentParser, cls, *, layered: bool = False) -> None:
    """Add one `--flag` per dataclass field: name with dashes, type, help, metavar and choices from
    the field, in the `--help` section its `topic` names (in the order topics first appear; a field
    without one goes to argparse's own "options"). `layered`: a flag not given is absent from the
    parsed namespace (nothing is required), so that the environment and a config file can supply
    it (peer/settings/layered.py)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("positional"):
            optional = {} if required else {"nargs": "?", "default": f.default}  # one that may be left out
            metavar = f.metadata.get("metavar", f.name.upper())
            parser.add_argument(f.name, type=tp, help=f.metadata.get("help", ""), metavar=metavar, **optional)
            continue
        topic = f.metadata.get("topic")
        if topic and topic not in groups:
            groups[topic] = parser.add_argument_group(topic)
        kwargs = _flag_kwargs(f, tp, required)
        groups.get(topic, parser).add_argument(
            flag, **(_layered_kwargs(kwargs, tp, f.default, required) if layered else kwargs)
        )


def _flag_kwargs(f: dataclasses.Field, tp, required: bool) -> dict:
    """argparse keywords for the `--flag` of field `f` (of type `tp`)."""
    kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
    if "choices" in f.metadata:
        kwargs["choices"] = tuple(f.metadata["choices"])  # shown as {a,b,c}
    elif tp is not bool:
        kwargs["metavar"] = f.metadata.get("metavar") or default_metavar(f.name, tp)
    if tp is bool:
        return kwargs | {"action": argparse.BooleanOptionalAction, "default": f.default}
    if typing.get_origin(tp) is tuple:
        return kwargs | {"nargs": "+", "type": typing.get_args(tp)[0], "default": f.default}
    kwargs.update(type=tp, required=required)
    if not required:
        kwargs["default"] = f.default
        if f.default != "" and "default:" not in kwargs["help"]:  # the help may say it better itself
            kwargs["help"] += f" (default: {f.default!r})"
    return kwargs


def _layered_kwargs(kwargs: dict, tp, default, required: bool) -> dict:
    """`kwargs` for a flag whose absence is left to the environment, a file or the default."""
    kwargs = {k: v for k, v in kwargs.items() if k != "required"} | {"default": argparse.SUPPRESS}
    if required and tp is not bool and typing.get_origin(tp) is not tuple:
        kwargs["help"] += " (required)"
    return kwargs


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
