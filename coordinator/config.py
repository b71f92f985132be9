"""Frozen settings of the operator's commands (coordinator, status, ban, invite, demo); the CLI is
generated from these dataclasses by `crowdtrain.peer.settings.commands.add_arguments`, like the
participant's commands.

Each field's `help` metadata becomes its `--flag` help; units are in the names. The coordinator's
components own their settings and their defaults (`RunSettings`, `HealthSettings`, `AbuseLimits`,
`AdmissionSettings`, `AutobanSettings`, `ReachSettings`, `PublisherSettings`): `CoordinatorConfig`
declares a flag for one of them with `setting(Owner, "name", help)`, which takes the owner's default,
and `config.settings(Owner)` builds the owner's settings from those flags. So each default is written
once, and no code copies flags into settings field by field:

    publisher = config.settings(PublisherSettings)   # --checkpoint-interval-s -> interval_s, ...

Only the coordinator process's own settings (its data dir, ports, TLS files, version floor) are
written here with their defaults. A flag shows in `--help` under its component's topic (`TOPIC_OF`:
Run, Network, Admission, Publishing, Peer health, Limits and flood) unless it names another, with
a placeholder for its unit or kind (`metavar`, else `commands.default_metavar`). Before anything is
created or loaded, `check_usable(config)` refuses a flag that cannot work (its range `check`, its
`choices`, each component's own checks, the files it names), so a typo costs a second, not a
half-made run. Importing this module loads the components' modules but not torch
or hivemind, so `crowdtrain coordinator --help` stays quick.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from crowdtrain.coordinator.admission.bans import AutobanSettings
from crowdtrain.coordinator.admission.gate import AdmissionSettings
from crowdtrain.coordinator.api.reachability import ReachSettings
from crowdtrain.coordinator.api.servicer import AbuseLimits
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.publishing.publisher import PublisherSettings
from crowdtrain.coordinator.run.runs import RunSettings, check_settings
from crowdtrain.peer.admission.tokens import ADMISSION_MODES
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.run.manifest import PRESETS
from crowdtrain.peer.settings.commands import REQUIRED, coordinator_flag, option, tls_ca_flag, tls_flag

S = TypeVar("S")

# the sections of `crowdtrain coordinator --help` (a flag's `topic`), in the order they first appear
RUN, NETWORK, ADMISSION = "Run", "Network", "Admission"
PUBLISHING, HEALTH, LIMITS = "Publishing", "Peer health", "Limits and flood"
# the section of a component's flags, unless the flag names another
TOPIC_OF = {
    RunSettings: RUN,
    ReachSettings: NETWORK,
    AdmissionSettings: ADMISSION,
    AutobanSettings: ADMISSION,
    PublisherSettings: PUBLISHING,
    HealthSettings: HEALTH,
    AbuseLimits: LIMITS,
}
OWNERS = tuple(TOPIC_OF)  # every component with flags here


class SettingsError(CrowdtrainError):
    """A coordinator flag's value cannot work; the message names the flag, says why and what to give."""


# checks of one flag's value (`option(..., check=...)`): "" when usable, else why not
def at_least(low: float):
    return lambda value: "" if value >= low else f"must be at least {low}"


def above(low: float):
    return lambda value: "" if value > low else f"must be above {low}"


def port_number(value: int) -> str:
    return "" if 0 <= value <= 65535 else "is not a TCP port: give 1-65535, or 0 to pick a free one"


def setting(owner: type, name: str, help: str, *, topic: str = "", **kw):  # noqa: A002 - argparse's keyword
    """A `--flag` for the setting `name` of the component settings class `owner`, with the owner's
    default (the only place it is written); `CoordinatorConfig.settings(owner)` reads it back. It
    shows in the owner's `--help` section (`TOPIC_OF`) unless `topic` names another; `kw` as
    `option` takes them (`metavar`, `choices`, `check`)."""
    declared = {f.name: f for f in dataclasses.fields(owner)}
    if name not in declared or declared[name].default is dataclasses.MISSING:
        raise TypeError(f"{owner.__name__} has no setting {name!r} with a default to declare a flag for")
    topic = topic or TOPIC_OF.get(owner, "")
    return option(declared[name].default, help, owner=owner, setting=name, topic=topic, **kw)


def data_dir_flag():
    """`--data-dir` of the commands run on the coordinator's machine."""
    return option(REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)")


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: str = option(
        REQUIRED, "directory holding the run: manifest, data shards, peer state, checkpoints", topic=RUN
    )
    preset: str = setting(
        RunSettings,
        "preset",
        "run preset used when --data-dir holds no run yet",
        choices=tuple(PRESETS),
    )
    data: tuple[str, ...] = setting(
        RunSettings,
        "data",
        "text files, directories, globs or hf:NAME to train on (default: this Python's stdlib source)",
    )
    data_field: str = setting(
        RunSettings,
        "data_field",
        "the record field holding each document's text in --data JSONL files, Parquet columns and "
        "hf: datasets (records without it are skipped and counted)",
        metavar="FIELD",
    )
    data_name: str = setting(
        RunSettings,
        "data_name",
        "the data's public name in the run manifest and model cards, when --data-dir holds no run yet "
        "(default: named from --data without local paths, e.g. '*.md in corpus')",
        metavar="NAME",
    )
    data_url: str = setting(
        RunSettings, "data_url", "a public http(s) page about the data, for model cards", metavar="URL"
    )
    data_license: str = setting(
        RunSettings,
        "data_license",
        "the data's license for model cards: an SPDX id (CC-BY-4.0) or a short text",
        metavar="LICENSE",
    )
    swarm: tuple[str, ...] = setting(
        RunSettings,
        "swarm",
        "when --data-dir holds no run yet: override the preset's swarm settings, KEY=VALUE each "
        "(e.g. matchmaking_time_s=10 overlap_communication=true grad_compression=float16)",
        metavar="KEY=VALUE",
    )
    host: str = setting(  # every server binds here; the publisher's DHT node owns the default
        PublisherSettings,
        "listen_host",
        "interface to bind the gRPC, HTTP and DHT servers to (0.0.0.0 for all)",
        topic=NETWORK,
    )
    public_host: str = option(
        "",
        "address peers use to reach this machine (default: --host, or a guess for 0.0.0.0)",
        topic=NETWORK,
    )
    grpc_port: int = option(
        50051, "gRPC port of the coordinator API (0 picks a free port)", topic=NETWORK, check=port_number
    )
    http_port: int = option(
        8080,
        "HTTP port for the dashboard, data shards and checkpoint downloads (0 picks a free port)",
        topic=NETWORK,
        check=port_number,
    )
    dht_port: int = option(
        0,
        "TCP port of the bootstrap DHT node (0: pick one once, then reuse it on restarts)",
        topic=NETWORK,
        check=port_number,
    )
    tls_cert: str = option(
        "",
        "serve gRPC and HTTP over TLS with this certificate chain (PEM; with --tls-key)",
        metavar="PATH",
        topic=NETWORK,
    )
    tls_key: str = option("", "the private key (PEM) of --tls-cert", metavar="PATH", topic=NETWORK)
    trusted_proxy: str = setting(
        ReachSettings,
        "trusted_proxy",
        "comma-separated addresses (or networks) of reverse proxies in front of the gRPC API: a call "
        "from one comes from the last address of the x-forwarded-for it appends (e.g. nginx: "
        "grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for); from anyone else it is ignored",
        metavar="ADDRESS[,ADDRESS]",
    )
    allow_loopback_dial: bool = setting(
        ReachSettings,
        "allow_loopback_dial",
        "reachability checks may dial 127.0.0.1/::1 for peers calling from this machine: for a swarm "
        "on one machine (tests, demo) only; never behind a reverse proxy or tunnel",
    )
    admission: str = setting(
        AdmissionSettings,
        "mode",
        "who may join: open (anyone), invite (a code from `crowdtrain invite create`), allowlist "
        "(the peer ids in --allowlist-path)",
        choices=ADMISSION_MODES,
    )
    allowlist_path: str = setting(
        AdmissionSettings,
        "allowlist_path",
        "allowlist mode: file of hivemind peer ids, one per line, # comments; re-read when it changes",
    )
    swarm_token_ttl_s: float = setting(
        AdmissionSettings,
        "swarm_token_ttl_s",
        "lifetime of a peer's swarm access token; a ban or revocation reaches the swarm within it",
    )
    min_peer_version: str = option(
        "",
        "refuse joiners whose crowdtrain is older than this version, telling them the upgrade command "
        "(default: this coordinator's major.minor)",
        metavar="VERSION",
        topic=ADMISSION,
    )
    autoban_min_reporters: int = setting(
        AutobanSettings,
        "min_reporters",
        "ban a peer automatically once this many distinct peers reported refusing its contributions",
    )
    autoban_min_reports: int = setting(
        AutobanSettings,
        "min_reports",
        "... with at least this many reports in all (one per reporter, epoch and kind)",
    )
    autoban_window_s: float = setting(AutobanSettings, "window_s", "... within this many seconds")
    checkpoint_interval_s: float = setting(
        PublisherSettings,
        "interval_s",
        "how often to fetch the swarm's state and publish it (0 disables)",
        check=at_least(0),
    )
    device: str = setting(
        PublisherSettings,
        "device",
        "where the publisher evaluates checkpoints: cpu, cuda or cuda:N",
        metavar="DEVICE",
    )
    keep_last_checkpoints: int = setting(
        PublisherSettings,
        "keep_last",
        "retention: keep this many newest checkpoints (at least the latest)",
        check=at_least(1),
    )
    keep_every_steps: int = setting(
        PublisherSettings,
        "keep_every_steps",
        "retention: also keep every checkpoint whose step is a multiple of this (0: none)",
        check=at_least(0),
    )
    max_eval_regression_nats: float = setting(
        PublisherSettings,
        "max_eval_regression_nats",
        "refuse to publish a state whose eval loss is this much worse than the last checkpoint's",
        metavar="NATS",
        check=at_least(0),
    )
    state_agreement_peers: int = setting(
        PublisherSettings,
        "agreement_peers",
        "ask this many peers for the state and publish only what they agree on (1: trust one)",
        check=at_least(1),
    )
    state_agreement_rel_tol: float = setting(
        PublisherSettings,
        "agreement_rel_tol",
        "peers' states agree when their relative L2 distance is at most this",
        metavar="FRACTION",
        check=at_least(0),
    )
    min_voter_age_s: float = setting(
        PublisherSettings,
        "min_voter_age_s",
        "a peer's state counts for publishing once its proven DHT identity has been in the run this long",
        check=at_least(0),
    )
    heartbeat_interval_s: float = setting(
        HealthSettings, "heartbeat_interval_s", "how often peers send heartbeats", check=above(0)
    )
    heartbeat_timeout_s: float = setting(
        HealthSettings,
        "heartbeat_timeout_s",
        "a peer silent for this long is considered dead (more than --heartbeat-interval-s)",
        check=above(0),
    )
    contribution_grace_s: float = setting(
        HealthSettings,
        "contribution_grace_s",
        "a training peer missing from the swarm's progress records this long is flagged 'not contributing'",
        check=above(0),
    )
    join_burst: int = setting(
        AbuseLimits,
        "joins_burst",
        "joins one caller address (an IPv6 /64) may make at once",
        check=at_least(1),
    )
    joins_per_minute: float = setting(
        AbuseLimits,
        "joins_per_minute",
        "joins one caller address may make per minute after its burst",
        check=above(0),
    )
    prune_silent_joins_after_s: float = setting(
        AbuseLimits,
        "prune_silent_joins_after_s",
        "forget a session that never sent a heartbeat after this long (abandoned joins, sybils)",
        check=above(0),
    )
    max_sessions_per_address: int = setting(
        AbuseLimits,
        "max_live_sessions_per_root",
        "sessions one admission root (an invite, an allowlisted key, or in open runs an address) may "
        "hold online, and heartbeat streams one address may hold (at least 1024); raise it for more "
        "volunteers behind one NAT",
        check=at_least(1),
    )

    def settings(self, owner: type[S]) -> S:
        """The settings of component `owner` (e.g. `PublisherSettings`) from the flags declared for it
        with `setting`, and the owner's own defaults for the settings it has no flag for."""
        values = {
            f.metadata["setting"]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("owner") is owner
        }
        if not values:
            raise TypeError(f"CoordinatorConfig declares no flag for {owner.__name__}; see `setting`")
        return owner(**values)


def check_usable(config: CoordinatorConfig) -> CoordinatorConfig:
    """`config`, once every flag can work; else SettingsError (or the owner's own error) naming the
    first flag that cannot. Run before anything is created or loaded, so that a mistake costs a
    second instead of leaving a half-made run: each value in its range and among its choices, each
    component's settings built (their own checks), the preset's --swarm overrides, the public
    texts (--data-name, --data-url, --data-license), --device, --min-peer-version, the TLS pair,
    the files named (certificate, key, allowlist) readable, and each --data entry there. Reads
    those files (and imports torch for a CUDA --device) but writes nothing."""
    _check_values(config)
    for owner in OWNERS:
        config.settings(owner)  # each component's own checks (--admission, --trusted-proxy, ...)
    _check_together(config)
    _check_device(config.device)
    _check_files(config)
    _check_data(config)
    return config


def _check_values(config: CoordinatorConfig) -> None:
    """Each flag alone: finite, in its range (`check`), one of its choices."""
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{flag} must be a finite number, not {value!r}")
        why = f.metadata["check"](value) if "check" in f.metadata else ""
        if why:
            raise SettingsError(f"{flag} {value!r} {why}")
        choices = f.metadata.get("choices", ())
        if choices and value not in choices:
            raise SettingsError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _check_together(config: CoordinatorConfig) -> None:
    """Flags that must agree with each other, and values that only a component's parser can check."""
    from crowdtrain.coordinator.peers.policy import minimum_peer_version
    from crowdtrain.coordinator.run.ports import dht_announce_host
    from crowdtrain.peer import __version__
    from crowdtrain.peer.run.manifest import get_preset, override_swarm

    if config.heartbeat_timeout_s <= config.heartbeat_interval_s:
        raise SettingsError(
            f"--heartbeat-timeout-s {config.heartbeat_timeout_s} must be longer than --heartbeat-interval-s "
            f"{config.heartbeat_interval_s}, or every peer would count as dead between two heartbeats"
        )
    ports = {"--grpc-port": config.grpc_port, "--http-port": config.http_port, "--dht-port": config.dht_port}
    fixed = [(flag, port) for flag, port in ports.items() if port]
    for i, (flag, port) in enumerate(fixed):
        for other, other_port in fixed[i + 1 :]:
            if port == other_port:
                raise SettingsError(f"{flag} and {other} are both {port}: give each server its own port")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SettingsError("--tls-cert and --tls-key go together: pass both, or neither for plaintext")
    override_swarm(get_preset(config.preset).swarm, config.swarm)  # a KEY=VALUE typo, named
    check_settings(config.settings(RunSettings))  # --data-name, --data-url, --data-license
    if config.dht_port and config.public_host:  # the DHT node announces an IPv4 address
        dht_announce_host(config.public_host)
    minimum_peer_version(config.min_peer_version, __version__)


def _check_device(device: str) -> None:
    """--device names cpu, mps, cuda or cuda:N, and a CUDA device this machine has."""
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", device)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise SettingsError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N")
    if match.group(1) != "cuda":
        return
    import torch

    index, count = int(match.group(2) or 0), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise SettingsError(
            f"--device {device}: this machine has {count} usable CUDA device(s) (torch {torch.__version__}); "
            "give --device cpu, or install a CUDA build of torch"
        )


def _check_files(config: CoordinatorConfig) -> None:
    """The certificate and key load as a pair; the allowlist exists and parses."""
    from crowdtrain.coordinator.admission.gate import Allowlist
    from crowdtrain.peer.link.tls import server_ssl_context

    if config.tls_cert:
        server_ssl_context(config.tls_cert, config.tls_key)
    if config.admission == "allowlist":
        Allowlist(Path(config.allowlist_path))


def _check_data(config: CoordinatorConfig) -> None:
    """Each --data entry is there (a file, directory, matching glob, or a well-formed hf:NAME), when
    --data-dir holds no run yet (a run's data is fixed in its manifest, and --data then ignored)."""
    import glob

    from crowdtrain.coordinator.run.sources import HF_PREFIX, is_glob, parse_hf

    if (Path(config.data_dir).expanduser() / "state.sqlite3").exists():
        return
    if not config.data_field.strip():
        raise SettingsError("--data-field must name the record field holding the text (e.g. text)")
    for entry in config.data:
        path = Path(entry).expanduser()
        if entry.startswith(HF_PREFIX):
            parse_hf(entry)
        elif not path.exists() and not (is_glob(entry) and next(glob.iglob(str(path), recursive=True), None)):
            raise SettingsError(
                f"--data {entry!r} does not exist (no file, directory or matching glob); pass an existing "
                "file or directory, a glob or hf:NAME (relative paths start at the working directory)"
            )


def check_ports_free(config: CoordinatorConfig) -> None:
    """The fixed ports (not 0) can be bound on --host now; PortInUseError names the flag."""
    from crowdtrain.coordinator.run.ports import check_port_free

    for flag, port in (
        ("--grpc-port", config.grpc_port),
        ("--http-port", config.http_port),
        ("--dht-port", config.dht_port),
    ):
        check_port_free(config.host, port, flag)


@dataclass(frozen=True)
class StatusConfig:
    coordinator: str = coordinator_flag(http_too=True)
    watch_s: float = option(0.0, "refresh every this many seconds until Ctrl+C (0: print once)")
    tls: bool = tls_flag()
    tls_ca: str = tls_ca_flag()


@dataclass(frozen=True)
class BanConfig:
    data_dir: str = data_dir_flag()
    peer: str = option(
        REQUIRED, "public peer id (the ID column of `crowdtrain status`) or DHT peer id to ban"
    )
    unban: bool = option(False, "lift the ban instead")


@dataclass(frozen=True)
class InviteCreateConfig:
    data_dir: str = data_dir_flag()
    uses: int = option(1, "how many joins the code admits")
    expires_in_s: float = option(0.0, "the code expires this many seconds from now (0: never)")
    note: str = option("", "a note for yourself: who the code is for (shown by `invite list`)")


@dataclass(frozen=True)
class InviteListConfig:
    data_dir: str = data_dir_flag()


@dataclass(frozen=True)
class InviteRevokeConfig:
    invite_id: str = option(REQUIRED, "the invite's ID (from `crowdtrain invite list`)", positional=True)
    data_dir: str = data_dir_flag()


@dataclass(frozen=True)
class DemoConfig:
    peers: int = option(2, "number of volunteer peers to start")
    minutes: float = option(4.0, "how long to train before publishing, pulling and sampling")
    preset: str = option("tiny", "run preset")
    workdir: str = option("", "directory for the demo's run (default: a new temporary directory)")
    checkpoint_interval_s: float = option(20.0, "how often the coordinator publishes a checkpoint")
