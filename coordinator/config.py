"""Frozen settings of the operator's commands (coordinator, status, ban, demo); the CLI is generated
from these dataclasses by `crowdtrain.peer.settings.commands.add_arguments`, like the participant's commands.

Each field's `help` metadata becomes its `--flag` help; units are in the names. Importing this module
is cheap (no torch, no hivemind), so `crowdtrain --help` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from crowdtrain.coordinator.api.reachability import ReachSettings
from crowdtrain.peer.settings.commands import REQUIRED, option


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: str = option(
        REQUIRED, "directory holding the run: manifest, data shards, peer state, checkpoints"
    )
    preset: str = option(
        "tiny", "run preset used when DATA_DIR holds no run yet (tiny, small30m, wan30m, base125m)"
    )
    data: tuple[str, ...] = option(
        (), "text files or directories to train on (default: this Python's stdlib source)"
    )
    data_field: str = option(
        "text",
        "the record field holding each document's text in --data JSONL files, Parquet columns and "
        "hf: datasets (records without it are skipped and counted)",
    )
    swarm: tuple[str, ...] = option(
        (),
        "when DATA_DIR holds no run yet: override the preset's swarm settings, KEY=VALUE each "
        "(e.g. matchmaking_time_s=10 overlap_communication=true grad_compression=float16)",
    )
    host: str = option("127.0.0.1", "interface to bind the gRPC, HTTP and DHT servers to (0.0.0.0 for all)")
    public_host: str = option(
        "", "address peers use to reach this machine (default: --host, or a guess for 0.0.0.0)"
    )
    grpc_port: int = option(50051, "gRPC port of the coordinator API (0 picks a free port)")
    http_port: int = option(8080, "HTTP port for data shards and checkpoint downloads (0 picks a free port)")
    dht_port: int = option(
        0, "TCP port of the bootstrap DHT node (0: pick one once, then reuse it on restarts)"
    )
    checkpoint_interval_s: float = option(
        60.0, "how often to fetch the swarm's state and publish it (0 disables)"
    )
    device: str = option("cpu", "where the publisher evaluates checkpoints: cpu, cuda or cuda:N")
    keep_last_checkpoints: int = option(
        5, "retention: keep this many newest checkpoints (at least the latest)"
    )
    keep_every_steps: int = option(
        0, "retention: also keep every checkpoint whose step is a multiple of this (0: none)"
    )
    max_eval_regression_nats: float = option(
        0.5, "refuse to publish a state whose eval loss is this much worse than the last checkpoint's"
    )
    state_agreement_peers: int = option(
        2, "ask this many peers for the state and publish only what they agree on (1: trust one)"
    )
    state_agreement_rel_tol: float = option(
        0.01, "peers' states agree when their relative L2 distance is at most this"
    )
    min_voter_age_s: float = option(
        120.0,
        "a peer's state counts for publishing once its proven DHT identity has been in the run this long",
    )
    tls_cert: str = option(
        "", "serve gRPC and HTTP over TLS with this certificate chain (PEM; with --tls-key)"
    )
    tls_key: str = option("", "the private key (PEM) of --tls-cert")
    heartbeat_interval_s: float = option(5.0, "how often peers send heartbeats")
    heartbeat_timeout_s: float = option(20.0, "a peer silent for this long is considered dead")
    contribution_grace_s: float = option(
        45.0,
        "a training peer missing from the swarm's progress records this long is flagged 'not contributing'",
    )
    join_burst: int = option(20, "joins one caller address (an IPv6 /64) may make at once")
    joins_per_minute: float = option(6.0, "joins one caller address may make per minute after its burst")
    prune_silent_joins_after_s: float = option(
        120.0, "forget a session that never sent a heartbeat after this long (abandoned joins, sybils)"
    )
    max_sessions_per_address: int = option(
        256,
        "sessions one admission root (an invite, an allowlisted key, or in open runs an address) may "
        "hold online, and heartbeat streams one address may hold (at least 1024); raise it for more "
        "volunteers behind one NAT",
    )
    min_peer_version: str = option(
        "",
        "refuse joiners whose crowdtrain is older than this version, telling them the upgrade command "
        "(default: this coordinator's major.minor)",
    )
    admission: str = option(
        "open",
        "who may join: open (anyone), invite (a code from `crowdtrain invite create`), allowlist "
        "(the peer ids in --allowlist-path)",
    )
    allowlist_path: str = option(
        "", "allowlist mode: file of hivemind peer ids, one per line, # comments; re-read when it changes"
    )
    swarm_token_ttl_s: float = option(
        600.0, "lifetime of a peer's swarm access token; a ban or revocation reaches the swarm within it"
    )
    autoban_min_reporters: int = option(
        2, "ban a peer automatically once this many distinct peers reported refusing its contributions"
    )
    autoban_min_reports: int = option(
        6, "... with at least this many reports in all (one per reporter, epoch and kind)"
    )
    autoban_window_s: float = option(600.0, "... within this many seconds")
    trusted_proxy: str = option(
        ReachSettings.trusted_proxy,
        "comma-separated addresses (or networks) of reverse proxies in front of the gRPC API: a call "
        "from one comes from the last address of the x-forwarded-for it appends (e.g. nginx: "
        "grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for); from anyone else it is ignored",
    )
    allow_loopback_dial: bool = option(
        ReachSettings.allow_loopback_dial,
        "reachability checks may dial 127.0.0.1/::1 for peers calling from this machine: for a swarm "
        "on one machine (tests, demo) only; never behind a reverse proxy or tunnel",
    )


@dataclass(frozen=True)
class StatusConfig:
    coordinator: str = option(REQUIRED, "HOST:PORT of the coordinator's gRPC API")
    watch_s: float = option(0.0, "refresh every this many seconds until Ctrl+C (0: print once)")
    tls: bool = option(False, "talk to the coordinator over TLS, trusting the system's certificate store")
    tls_ca: str = option("", "talk to the coordinator over TLS, trusting this CA certificate (PEM)")


@dataclass(frozen=True)
class BanConfig:
    data_dir: str = option(
        REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)"
    )
    peer: str = option(
        REQUIRED, "public peer id (the ID column of `crowdtrain status`) or DHT peer id to ban"
    )
    unban: bool = option(False, "lift the ban instead")


@dataclass(frozen=True)
class InviteCreateConfig:
    data_dir: str = option(
        REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)"
    )
    uses: int = option(1, "how many joins the code admits")
    expires_in_s: float = option(0.0, "the code expires this many seconds from now (0: never)")
    note: str = option("", "a note for yourself: who the code is for (shown by `invite list`)")


@dataclass(frozen=True)
class InviteListConfig:
    data_dir: str = option(
        REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)"
    )


@dataclass(frozen=True)
class InviteRevokeConfig:
    invite_id: str = option(REQUIRED, "the invite's ID (from `crowdtrain invite list`)", positional=True)
    data_dir: str = option(
        REQUIRED, "the coordinator's data directory (run this on the coordinator's machine)"
    )


@dataclass(frozen=True)
class DemoConfig:
    peers: int = option(2, "number of volunteer peers to start")
    minutes: float = option(4.0, "how long to train before publishing, pulling and sampling")
    preset: str = option("tiny", "run preset")
    workdir: str = option("", "directory for the demo's run (default: a new temporary directory)")
    checkpoint_interval_s: float = option(20.0, "how often the coordinator publishes a checkpoint")


# ---------------------------------------------------------------- CLI generation
