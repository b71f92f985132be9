"""The coordinator process: starts the run's components in order, and stops them in reverse.

    crowdtrain coordinator --data-dir runs/demo --preset tiny --grpc-port 0 --http-port 0

In order: the run (`runs.open_run`: created in DATA_DIR on the first start, opened on later ones),
the bootstrap DHT node, the swarm monitor, the HTTP server (dashboard, data shards, checkpoint
downloads), the gRPC API and the checkpoint publisher. Then it writes DATA_DIR/endpoints.json and
logs the `coordinator_ready` event. Everything it knows lives under DATA_DIR and survives restarts:
besides the run's files (see `runs`),

    DATA_DIR/dht.key            identity of the bootstrap DHT node (stable multiaddr)
    DATA_DIR/endpoints.json     bound addresses, rewritten at every start (ports given as 0 are
                                chosen once and reused by later starts while they are free, `ports`)

Open the HTTP address in a browser for the live dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

from crowdtrain.coordinator.admission.bans import AutobanSettings, counts_against
from crowdtrain.coordinator.admission.gate import AdmissionSettings, servicer_admission
from crowdtrain.coordinator.api.grpcserver import GrpcLimits, ServerTls, create_server
from crowdtrain.coordinator.api.metrics import CoordinatorMetrics
from crowdtrain.coordinator.api.reachability import ReachSettings
from crowdtrain.coordinator.api.servicer import AbuseLimits, CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.config import CoordinatorConfig
from crowdtrain.coordinator.dashboard.snapshots import Memo
from crowdtrain.coordinator.flood.callbudget import CallLimits, PoolCaps
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.policy import minimum_peer_version
from crowdtrain.coordinator.peers.status import SwarmProgress, SwarmStatus, build_status, contributors
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing.archive import DownloadTracker
from crowdtrain.coordinator.run.ports import (
    bind_remembered,
    check_port_free,
    dht_announce_host,
    guess_public_host,
    tcp_port,
)
from crowdtrain.coordinator.run.runs import Run, RunSettings, open_run
from crowdtrain.coordinator.signing import public_key_hex, sign_hex
from crowdtrain.peer import __version__
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.tls import TlsConfigError, server_ssl_context
from crowdtrain.peer.run.runproof import signing_payload

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.data_dir = Path(config.data_dir).expanduser()
        self.checkpoint_root = self.data_dir / "checkpoints"
        self.health = config.settings(HealthSettings)
        self.public_host = config.public_host or guess_public_host(config.host)
        self.store: Store | None = None
        self.shards = None  # the servicer's ShardBook, once the gRPC API runs
        self.run: Run | None = None
        self.dht = self.monitor = self.metrics = self.web = self.grpc_server = self.publisher = None
        self.revocations = None
        self.endpoints: dict = {}
        self._stopped = threading.Event()
        # every status view (HTTP, GetStatus, /metrics) shares one snapshot, rebuilt at most once a second
        self.cached_status = Memo(self.status, max_age_s=1.0)
        self.tls = self._server_tls(config)

    @staticmethod
    def _server_tls(config: CoordinatorConfig) -> ServerTls | None:
        """--tls-cert/--tls-key, checked before anything starts; None to serve plaintext."""
        if bool(config.tls_cert) != bool(config.tls_key):
            raise TlsConfigError("--tls-cert and --tls-key go together: pass both, or neither for plaintext")
        if not config.tls_cert:
            return None
        server_ssl_context(config.tls_cert, config.tls_key)  # readable, PEM, and a matching pair
        return ServerTls(config.tls_cert, config.tls_key)

    # ------------------------------------------------------------------ lifecycle

    def start(self, with_publisher: bool = True) -> Coordinator:
        try:
            self._start(with_publisher)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start(self, with_publisher: bool) -> None:
        cfg = self.config
        # fail fast, before spending a minute building a run, when a fixed port is taken
        for flag, port in (("--grpc-port", cfg.grpc_port), ("--http-port", cfg.http_port)):
            check_port_free(cfg.host, port, flag)
        self.store, self.run = open_run(cfg.settings(RunSettings), self.data_dir)
        maddrs = self._start_dht()
        self._start_monitor()
        from crowdtrain.coordinator.admission.swarmnodes import RevocationPublisher

        self.revocations = RevocationPublisher(
            self.dht,
            self.run.manifest.run_id,
            self.run.signing_key,
            self.store.banned_dht_ids,
            cfg.swarm_token_ttl_s,
        ).start()
        self.metrics = CoordinatorMetrics(self.cached_status.get)
        downloads = self._start_web()
        http_base_url = f"{self.web.scheme}://{self.public_host}:{self.web.port}"
        grpc_port = self._start_grpc(maddrs, http_base_url, downloads)
        # /api/v1/grpc: the address the `peers join with` line names, for peers given the dashboard's
        self.web.announce_grpc(
            f"{self.public_host}:{grpc_port}",
            self.tls is not None,
            dht_port=tcp_port(maddrs[0]),
            admission=cfg.admission,
            min_peer_version=minimum_peer_version(cfg.min_peer_version, __version__),
        )
        if with_publisher and cfg.checkpoint_interval_s > 0:
            self._start_publisher(maddrs, downloads)
        self._write_endpoints(grpc_port, http_base_url, maddrs)
        manifest = self.run.manifest
        emit(
            logger,
            "coordinator_ready",
            "coordinator ready: run %s, %d-parameter %s model; peers join with `crowdtrain peer --coordinator %s%s`",
            manifest.run_id,
            manifest.model.num_parameters,
            manifest.preset,
            self.endpoints["grpc"],
            f" --tls-ca {self.tls.cert_file}" if self.tls else "",
            grpc=self.endpoints["grpc"],
            http=http_base_url,
            run_id=manifest.run_id,
        )
        logger.info("downloads at %s, DHT bootstrap %s", http_base_url, maddrs[0])

    def _start_dht(self) -> list[str]:
        """The bootstrap DHT node, on --dht-port or else the port of the last start; its addresses."""
        from crowdtrain.coordinator.admission.swarmnodes import CoordinatorNodeAccess
        from crowdtrain.peer.swarm.lifecycle import tie_children_to_this_process, use_fork_start_method

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        cfg = self.config
        dht_port = cfg.dht_port or int(self.store.get_meta("dht_port") or 0)
        # the swarm answers token holders only: this node mints its own (coordinator/admission/swarmnodes.py)
        access = CoordinatorNodeAccess(
            self.run.manifest.run_id, self.run.signing_key, self.data_dir / "dht.key"
        )
        self.dht = access.start_bootstrap_node(
            listen_host=cfg.host,
            port=dht_port,
            announce_host=dht_announce_host(self.public_host) if dht_port else "",
        )
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if not dht_port:
            self.store.set_meta({"dht_port": str(tcp_port(maddrs[0]))})
        return maddrs

    def _start_monitor(self) -> None:
        from crowdtrain.coordinator.peers.credit import CreditSettings
        from crowdtrain.coordinator.peers.monitor import SwarmMonitor

        manifest = self.run.manifest
        self.monitor = SwarmMonitor(
            self.dht,
            manifest.run_id,
            self.store,
            self.health,
            # what the swarm accepts per epoch is in the signed manifest, not in any peer's record
            CreditSettings(manifest.swarm.target_batch_size, self.health.heartbeat_interval_s),
        ).start()

    def _start_web(self) -> DownloadTracker:
        """The HTTP server; returns its download tracker (checkpoints being downloaded are kept)."""
        manifest, cfg = self.run.manifest, self.config
        context = WebContext(
            data_dir=self.data_dir / "data",
            data_files=frozenset([manifest.data.eval.name, *(s.name for s in manifest.data.shards)]),
            checkpoint_root=self.checkpoint_root,
            manifest_json=manifest.to_json(),
            store=self.store,
            status=self.cached_status.get,
            metrics=self.metrics,
        )
        ssl_context = server_ssl_context(self.tls.cert_file, self.tls.key_file) if self.tls else None
        self.web = bind_remembered(
            self.store,
            "http_port",
            cfg.http_port,
            lambda port: WebServer(context, cfg.host, port, ssl_context=ssl_context),
            port_of=lambda web: web.port,
        ).start()
        return context.downloads

    def _start_grpc(self, maddrs: list[str], http_base_url: str, downloads: DownloadTracker) -> int:
        """The gRPC API and its health service; returns the bound port."""
        run, cfg = self.run, self.config
        manifest_json = run.manifest.to_json()
        admission = servicer_admission(
            cfg.settings(AdmissionSettings),
            cfg.settings(AutobanSettings),
            run.manifest.run_id,
            run.signing_key,
            self.store,
            self._own_dht_ids(),
        )
        servicer = CoordinatorServicer(
            RunInfo(
                manifest_json=manifest_json,
                manifest_sha256=run.manifest.sha256(),
                tokenizer_json=run.tokenizer_json,
                num_shards=len(run.manifest.data.shards),
                http_base_url=http_base_url,
                checkpoint_root=self.checkpoint_root,
                signing_public_key=public_key_hex(run.signing_key),
                manifest_signature=sign_hex(run.signing_key, signing_payload(manifest_json)),
                min_peer_version=minimum_peer_version(cfg.min_peer_version, __version__),
                shard_bytes=tuple(s.size_bytes for s in run.manifest.data.shards),
            ),
            self.store,
            self.health,
            initial_peers=lambda: maddrs,
            abuse=cfg.settings(AbuseLimits),
            status=self.cached_status.get,
            heartbeat_latency=self.metrics.heartbeat_latency.observe,
            downloads=downloads,
            gate=admission.gate,
            evidence=admission.evidence,
            reach=cfg.settings(ReachSettings),
        )
        self.shards = servicer.shards  # the data's coverage, for status
        self.grpc_server, grpc_port = bind_remembered(
            self.store,
            "grpc_port",
            cfg.grpc_port,
            lambda port: create_server(servicer, cfg.host, port, _grpc_limits(cfg), tls=self.tls),
            port_of=lambda bound: bound[1],
        )
        self.grpc_server.start()
        return grpc_port

    def _own_dht_ids(self):
        """The peer ids of this coordinator's DHT nodes (bootstrap, publisher): no report counts
        against them, so strangers cannot have the coordinator revoke its own nodes."""
        from crowdtrain.peer.admission.identity import PeerIdentity

        keys = (self.data_dir / "dht.key", self.checkpoint_root.parent / "publisher-dht.key")
        ids = frozenset(PeerIdentity(path).peer_id for path in keys)
        return lambda: ids

    def _start_publisher(self, maddrs: list[str], downloads: DownloadTracker) -> None:
        from crowdtrain.coordinator.admission.bans import EvidenceBook
        from crowdtrain.coordinator.publishing.publisher import Publisher, PublisherSettings
        from crowdtrain.coordinator.publishing.voters import VoterSettings, eligible_voters

        run = self.run
        settings = self.config.settings(PublisherSettings)
        voting = VoterSettings(self.health, settings.min_voter_age_s, self.health.contribution_grace_s)
        evidence = EvidenceBook(self.store, mode=self.config.admission)  # the servicer's tables, read

        def voters() -> tuple[frozenset[str], str]:
            """Proven, confirmed by a groupmate of another root, not quarantined (`voters`)."""
            now = time.time()
            groups = evidence.groups.since(now - voting.confirmed_within_s)
            return eligible_voters(
                now, self.store.peers_unordered(), voting, groups, evidence.quarantined(now)
            )

        def leaderboard() -> list[dict]:
            """Every credited identity, named as the dashboard names it: the model card's contributors."""
            totals = self.store.contribution_totals()
            return contributors(self.status(), totals, max_rows=len(totals))

        self.publisher = Publisher(
            settings,
            run.manifest,
            run.tokenizer_json,
            self.data_dir / "data" / run.manifest.data.eval.name,
            self.checkpoint_root,
            maddrs,
            voters=voters,
            signing_key=run.signing_key,
            on_reject=lambda step, reason: self.store.add_rejection(time.time(), step, reason),
            in_use=downloads.in_use,
            data_read=lambda: self.shards.coverage().text() if self.shards is not None else "",
            data_terms=run.data_terms,
            contributors=leaderboard,
        )
        self.publisher.start()  # assigned first: a failed start is still shut down

    def _write_endpoints(self, grpc_port: int, http_base_url: str, maddrs: list[str]) -> None:
        """DATA_DIR/endpoints.json, atomically: how scripts and tests find this coordinator."""
        self.endpoints = {
            "run_id": self.run.manifest.run_id,
            "grpc": f"{self.public_host}:{grpc_port}",
            "http": http_base_url,
            "tls": self.tls is not None,
            "dht": maddrs,
            "pid": os.getpid(),
            "initial_eval_loss": self.publisher.initial_eval_loss if self.publisher else None,
        }
        tmp = self.data_dir / "endpoints.json.tmp"
        tmp.write_text(json.dumps(self.endpoints, indent=2))
        os.replace(tmp, self.data_dir / "endpoints.json")

    def status(self) -> SwarmStatus:
        """The swarm as every view shows it (pure `build_status` over the store and the monitor)."""
        return build_status(
            time.time(),
            self.run.manifest.run_id,
            self.store.list_peers(),
            self.store.contribution_totals(),
            self.health,
            self.monitor.progress if self.monitor is not None else SwarmProgress(),
            checkpoint.list_checkpoints(self.checkpoint_root),
            self.store.rejections(),
            rejections_against=counts_against(self.store),
            coverage=self.shards.coverage() if self.shards is not None else None,
        )

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        """Signal-safe: ask `wait()` to return."""
        self._stopped.set()

    def shutdown(self) -> None:
        """Stop every component, newest first; idempotent."""
        self._stopped.set()
        if self.web is not None:  # load balancers stop sending peers here before gRPC's grace period
            self.web.withdraw("the coordinator is shutting down")
        if self.publisher is not None:
            self.publisher.shutdown()
            self.publisher = None
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=2).wait()
            self.grpc_server = None
        if self.web is not None:
            self.web.shutdown()
            self.web = None
        if self.revocations is not None:
            self.revocations.shutdown()
            self.revocations = None
        if self.monitor is not None:
            self.monitor.shutdown()
            self.monitor = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        if self.shards is not None and self.store is not None:
            self.shards.flush()  # every shard's position, for the next start
            self.shards = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _grpc_limits(cfg: CoordinatorConfig) -> GrpcLimits:
    """The gRPC server's limits, with room for `--max-sessions-per-address` heartbeat streams from
    one address (a large NAT, or a benchmark's simulated peers)."""
    calls = CallLimits()
    per_address = max(calls.session_streams.per_address, cfg.max_sessions_per_address)
    streams = PoolCaps(max(calls.session_streams.total, per_address), per_address)
    return GrpcLimits(calls=dataclasses.replace(calls, session_streams=streams))
