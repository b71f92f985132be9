"""The dashboard's "Join this run" box and its pull commands: what a newcomer copies, built from
what the coordinator announces once its gRPC API is up (`WebServer.announce_grpc`). Pure.

    facts = JoinFacts("203.0.113.7:50051", tls=False, http_port=8080, dht_port=40000,
                      admission="invite", run_key="ab12...")
    join_json(facts)["join_command"]  # "crowdtrain peer --coordinator 203.0.113.7:50051"
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class JoinFacts:
    grpc_address: str  # the public HOST:PORT peers are told to join (never a bind address)
    tls: bool  # the gRPC API takes TLS
    http_port: int  # this HTTP server's bound port (dashboard, shards, checkpoint files)
    dht_port: int  # the bootstrap DHT node's TCP port (0: unknown)
    admission: str  # "open", "invite", "allowlist", ... (`--admission`)
    run_key: str  # hex Ed25519 key that signs the run's checkpoints (manifest.signing_public_key)
    min_peer_version: str = ""  # the oldest crowdtrain a joiner may run ("": any), for `crowdtrain doctor`


def _coordinator_flags(facts: JoinFacts) -> list[str]:
    return ["--coordinator", facts.grpc_address, *(["--tls"] if facts.tls else [])]


def join_command(facts: JoinFacts, invite: str = "") -> str:
    """`crowdtrain peer --coordinator HOST:PORT`, with `--invite CODE` where `invite` is given."""
    return shlex.join(
        ["crowdtrain", "peer", *_coordinator_flags(facts), *(["--invite", invite] if invite else [])]
    )


def pull_command(facts: JoinFacts, step: int | str, out: str = "./model") -> str:
    """`crowdtrain pull` of one checkpoint, pinned to the run's key (when the run has one)."""
    words = ["crowdtrain", "pull", *_coordinator_flags(facts), "--step", str(step), "--out", out]
    words += ["--public-key", facts.run_key] if facts.run_key else []
    return shlex.join(words)


def ports(facts: JoinFacts) -> list[dict]:
    """What the operator opens to the internet, and what each is for."""
    grpc_port = int(facts.grpc_address.rsplit(":", 1)[1])
    rows = [
        {"name": "gRPC", "port": grpc_port, "use": "peers join and report here; pull and status too"},
        {"name": "HTTP", "port": facts.http_port, "use": "this dashboard, data shards, checkpoint files"},
    ]
    if facts.dht_port:
        rows.append({"name": "DHT", "port": facts.dht_port, "use": "the swarm's bootstrap node (TCP)"})
    return rows


def join_json(facts: JoinFacts) -> dict:
    """/api/v1/join: the box's contents. `pull_command` holds `--step STEP` for the dashboard to fill
    in per checkpoint; `invite_command` (runs that admit by invitation) holds `--invite CODE`."""
    invite = facts.admission == "invite"
    return {
        "grpc": facts.grpc_address,
        "tls": facts.tls,
        "admission": facts.admission,
        "run_key": facts.run_key,
        "min_peer_version": facts.min_peer_version,
        "join_command": join_command(facts),
        "invite_command": join_command(facts, invite="CODE") if invite else "",
        "pull_command": pull_command(facts, "STEP"),
        "ports": ports(facts),
    }
