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
written here with their defaults. Importing this module loads the components' modules but not torch
or hivemind, so `crowdtrain coordinator --help` stays quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

from crowdtrain.coordinator.admission.bans import AutobanSettings
from crowdtrain.coordinator.admission.gate import AdmissionSettings
from crowdtrain.coordinator.api.reachability import ReachSettings
from crowdtrain.coordinator.api.servicer import AbuseLimits
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.publishing.publisher import PublisherSettings
from crowdtrain.coordinator.run.runs import RunSettings
from crowdtrain.peer.settings.commands import REQUIRED, coordinator_flag, option, tls_ca_flag, tls_flag

S = TypeVar("S")


def setting(owner: type, name: str, help: str):  # noqa: A002 - mirrors argparse's own keyword
    """A `--flag` for the setting `name` of the component settings class `owner`, with the owner's
    default (the only place it is written); `CoordinatorConfig.settings(owner)` reads it back."""
    declared = {f.name: f for f in dataclasses.fields(owner)}
    if name not in declared or declared[name].default is dataclasses.MISSING:
        raise TypeError(f"{owner.__name__} has no setting {name!r} with a default to declare a flag for")
    return option(declared[name].default, help, owner=owner, setting=name)


def data_dir_flag():
    """`--data-dir` of the commands run on the coordinator's machine."""
    return option(REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)")


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: str = option(
        REQUIRED, "directory holding the run: manifest, data shards, peer state, checkpoints"
    )
    preset: str = setting(
        RunSettings,
        "preset",
        "run preset used when DATA_DIR holds no run yet (tiny, small30m, wan30m, base125m)",
    )
    data: tuple[str, ...] = setting(
        RunSettings, "data", "text files or directories to train on (default: this Python's stdlib source)"
    )
    data_field: str = setting(
        RunSettings,
        "data_field",
        "the record field holding each document's text in --data JSONL files, Parquet columns and "
        "hf: datasets (records without it are skipped and counted)",
    )
    data_name: str = setting(
        RunSettings,
        "data_name",
        "the data's public name in the run manifest and model cards, when DATA_DIR holds no run yet "
        "(default: named from --data without local paths, e.g. '*.md in corpus')",
    )
    data_url: str = setting(RunSettings, "data_url", "a public http(s) page about the data, for model cards")
    data_license: str = setting(
        RunSettings,
        "data_license",
        "the data's license for model cards: an SPDX id (CC-BY-4.0) or a short text",
    )
    swarm: tuple[str, ...] = setting(
        RunSettings,
        "swarm",
        "when DATA_DIR holds no run yet: override the preset's swarm settings, KEY=VALUE each "
        "(e.g. matchmaking_time_s=10 overlap_communication=true grad_compression=float16)",
    )
    host: str = setting(  # every server binds here; the publisher's DHT node owns the default
        PublisherSettings,
        "listen_host",
        "interface to bind the gRPC, HTTP and DHT servers to (0.0.0.0 for all)",
    )
    public_host: str = option(
        "", "address peers use to reach this machine (default: --host, or a guess for 0.0.0.0)"
    )
    grpc_port: int = option(50051, "gRPC port of the coordinator API (0 picks a free port)")
    http_port: int = option(8080, "HTTP port for data shards and checkpoint downloads (0 picks a free port)")
    dht_port: int = option(
        0, "TCP port of the bootstrap DHT node (0: pick one once, then reuse it on restarts)"
    )
    checkpoint_interval_s: float = setting(
        PublisherSettings, "interval_s", "how often to fetch the swarm's state and publish it (0 disables)"
    )
    device: str = setting(
        PublisherSettings, "device", "where the publisher evaluates checkpoints: cpu, cuda or cuda:N"
    )
    keep_last_checkpoints: int = setting(
        PublisherSettings, "keep_last", "retention: keep this many newest checkpoints (at least the latest)"
    )
    keep_every_steps: int = setting(
        PublisherSettings,
        "keep_every_steps",
        "retention: also keep every checkpoint whose step is a multiple of this (0: none)",
    )
    max_eval_regression_nats: float = setting(
        PublisherSettings,
        "max_eval_regression_nats",
        "refuse to publish a state whose eval loss is this much worse than the last checkpoint's",
    )
    state_agreement_peers: int = setting(
        PublisherSettings,
        "agreement_peers",
        "ask this many peers for the state and publish only what they agree on (1: trust one)",
    )
    state_agreement_rel_tol: float = setting(
        PublisherSettings,
        "agreement_rel_tol",
        "peers' states agree when their relative L2 distance is at most this",
    )
    min_voter_age_s: float = setting(
        PublisherSettings,
        "min_voter_age_s",
        "a peer's state counts for publishing once its proven DHT identity has been in the run this long",
    )
    tls_cert: str = option(
        "", "serve gRPC and HTTP over TLS with this certificate chain (PEM; with --tls-key)"
    )
    tls_key: str = option("", "the private key (PEM) of --tls-cert")
    heartbeat_interval_s: float = setting(
        HealthSettings, "heartbeat_interval_s", "how often peers send heartbeats"
    )
    heartbeat_timeout_s: float = setting(
        HealthSettings, "heartbeat_timeout_s", "a peer silent for this long is considered dead"
    )
    contribution_grace_s: float = setting(
        HealthSettings,
        "contribution_grace_s",
        "a training peer missing from the swarm's progress records this long is flagged 'not contributing'",
    )
    join_burst: int = setting(
        AbuseLimits, "joins_burst", "joins one caller address (an IPv6 /64) may make at once"
    )
    joins_per_minute: float = setting(
        AbuseLimits, "joins_per_minute", "joins one caller address may make per minute after its burst"
    )
    prune_silent_joins_after_s: float = setting(
        AbuseLimits,
        "prune_silent_joins_after_s",
        "forget a session that never sent a heartbeat after this long (abandoned joins, sybils)",
    )
    max_sessions_per_address: int = setting(
        AbuseLimits,
        "max_live_sessions_per_root",
        "sessions one admission root (an invite, an allowlisted key, or in open runs an address) may "
        "hold online, and heartbeat streams one address may hold (at least 1024); raise it for more "
        "volunteers behind one NAT",
    )
    min_peer_version: str = option(
        "",
        "refuse joiners whose crowdtrain is older than this version, telling them the upgrade command "
        "(default: this coordinator's major.minor)",
    )
    admission: str = setting(
        AdmissionSettings,
        "mode",
        "who may join: open (anyone), invite (a code from `crowdtrain invite create`), allowlist "
        "(the peer ids in --allowlist-path)",
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
    trusted_proxy: str = setting(
        ReachSettings,
        "trusted_proxy",
        "comma-separated addresses (or networks) of reverse proxies in front of the gRPC API: a call "
        "from one comes from the last address of the x-forwarded-for it appends (e.g. nginx: "
        "grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for); from anyone else it is ignored",
    )
    allow_loopback_dial: bool = setting(
        ReachSettings,
        "allow_loopback_dial",
        "reachability checks may dial 127.0.0.1/::1 for peers calling from this machine: for a swarm "
        "on one machine (tests, demo) only; never behind a reverse proxy or tunnel",
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
