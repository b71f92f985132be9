"""The coordinator process: run state, bootstrap DHT node, gRPC API, HTTP server and publisher.

    crowdtrain coordinator --data-dir runs/demo --preset tiny --grpc-port 0 --http-port 0

Everything it knows lives under DATA_DIR and survives restarts:

    DATA_DIR/state.sqlite3      run manifest, tokenizer, DHT port, every peer seen (WAL)
    DATA_DIR/dht.key            identity of the bootstrap DHT node (stable multiaddr)
    DATA_DIR/data/              the run's eval and training shards (served over HTTP)
    DATA_DIR/checkpoints/       published checkpoints, one directory per step
    DATA_DIR/endpoints.json     bound addresses, rewritten at every start (ports given as 0 are
                                chosen once and reused by later starts while they are free)

Open the HTTP address in a browser for the live dashboard.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from crowdtrain.coordinator import archive
from crowdtrain.coordinator.config import CoordinatorConfig
from crowdtrain.coordinator.errors import PortInUseError
from crowdtrain.coordinator.metrics import CoordinatorMetrics
from crowdtrain.coordinator.registry import HealthSettings, is_online
from crowdtrain.coordinator.service import CoordinatorServicer, RunInfo, create_server
from crowdtrain.coordinator.signing import load_or_create_key, new_key, public_key_hex, save_key
from crowdtrain.coordinator.status import SwarmProgress, SwarmStatus, build_status
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.webserver import WebContext, WebServer
from crowdtrain.peer import checkpoint
from crowdtrain.peer.events import emit
from crowdtrain.peer.manifest import ManifestError, RunManifest, build_manifest, get_preset

logger = logging.getLogger(__name__)


def _guess_public_host(host: str) -> str:
    if host not in ("0.0.0.0", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET address: no packet is sent, only a route is chosen
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def create_run(config: CoordinatorConfig, data_dir: Path, signing_public_key: str) -> tuple[RunManifest, str]:
    """Build a new run from the preset and corpus: shards, tokenizer, manifest. Pure of the store."""
    from crowdtrain.coordinator.dataset import build_dataset, default_corpus, default_corpus_label

    preset = get_preset(config.preset)
    sources = [Path(p).expanduser() for p in config.data] or default_corpus()
    label = ", ".join(str(p) for p in config.data) if config.data else default_corpus_label()
    t0 = time.monotonic()
    data, tokenizer, tokenizer_json = build_dataset(
        sources,
        data_dir / "data",
        source_label=label,
        num_shards=preset.num_shards,
        eval_fraction=preset.eval_fraction,
        max_bytes=preset.max_corpus_bytes,
        seq_len=preset.seq_len,
        eval_max_sequences=preset.eval_max_sequences,
        vocab_size=preset.vocab_size,
    )
    manifest = build_manifest(
        preset,
        run_id=f"ct_{preset.name}_{secrets.token_hex(4)}",
        created_unix_s=time.time(),
        tokenizer=tokenizer,
        data=data,
        signing_public_key=signing_public_key,
    )
    logger.info("created run %s (preset %s) in %.1fs", manifest.run_id, preset.name, time.monotonic() - t0)
    return manifest, tokenizer_json


def _check_port_free(host: str, port: int, flag: str) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(
                f"cannot listen on {host}:{port} ({e.strerror}); another process uses it - stop it or pass {flag} 0"
            ) from None


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.data_dir = Path(config.data_dir).expanduser()
        self.checkpoint_root = self.data_dir / "checkpoints"
        self.health = HealthSettings(
            config.heartbeat_interval_s, config.heartbeat_timeout_s, config.contribution_grace_s
        )
        self.public_host = config.public_host or _guess_public_host(config.host)
        self.store: Store | None = None
        self.dht = self.publisher = self.web = self.grpc_server = self.monitor = None
        self.endpoints: dict = {}
        self._key = None
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self, with_publisher: bool = True) -> Coordinator:
        try:
            self._start(with_publisher)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start(self, with_publisher: bool) -> None:
        manifest, tokenizer_json = self._load_or_create_run()
        self.manifest = manifest
        cfg = self.config
        removed = archive.clean_staging(self.checkpoint_root)
        if removed:
            logger.warning("removed %d unfinished checkpoint write(s) left by a previous crash", removed)

        from crowdtrain.peer.swarm import start_dht, tie_children_to_this_process, use_fork_start_method

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        stored_port = int(self.store.get_meta("dht_port") or 0)
        dht_port = cfg.dht_port or stored_port
        self.dht = start_dht(
            [],
            listen_host=cfg.host,
            port=dht_port,
            announce_host=self.public_host if dht_port else "",
            identity_path=str(self.data_dir / "dht.key"),
        )
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if not dht_port:
            dht_port = int(maddrs[0].split("/tcp/")[1].split("/")[0])
            self.store.set_meta({"dht_port": str(dht_port)})
        from crowdtrain.coordinator.monitor import SwarmMonitor

        self.monitor = SwarmMonitor(
            self.dht,
            manifest.run_id,
            self.store,
            self.health,
            poll_interval_s=min(2.0, cfg.heartbeat_interval_s),
        ).start()
        self.metrics = CoordinatorMetrics(self.status)

        web_context = WebContext(
            data_dir=self.data_dir / "data",
            data_files=frozenset([manifest.data.eval.name, *(s.name for s in manifest.data.shards)]),
            checkpoint_root=self.checkpoint_root,
            manifest_json=manifest.to_json(),
            store=self.store,
            status=self.status,
            metrics=self.metrics,
        )
        self.web = self._bind(
            "http_port", cfg.http_port, lambda port: WebServer(web_context, cfg.host, port)
        ).start()
        http_base_url = f"http://{self.public_host}:{self.web.port}"

        servicer = CoordinatorServicer(
            RunInfo(
                manifest_json=manifest.to_json(),
                manifest_sha256=manifest.sha256(),
                tokenizer_json=tokenizer_json,
                num_shards=len(manifest.data.shards),
                http_base_url=http_base_url,
                checkpoint_root=self.checkpoint_root,
                signing_public_key=public_key_hex(self._signing_key()),
            ),
            self.store,
            self.health,
            initial_peers=lambda: maddrs,
            status=self.status,
            heartbeat_latency=self.metrics.heartbeat_latency.observe,
            resume_step=self.resume_step,
            downloads=web_context.downloads,
        )
        self.grpc_server, grpc_port, _ = self._bind(
            "grpc_port", cfg.grpc_port, lambda port: create_server(servicer, cfg.host, port)
        )
        self.grpc_server.start()

        if with_publisher and cfg.checkpoint_interval_s > 0:
            from crowdtrain.coordinator.publisher import Publisher

            self.publisher = Publisher(
                manifest,
                tokenizer_json,
                self.data_dir / "data" / manifest.data.eval.name,
                self.checkpoint_root,
                maddrs,
                interval_s=cfg.checkpoint_interval_s,
                listen_host=cfg.host,
                device=cfg.device,
                signing_key=self._signing_key(),
                max_regression_nats=cfg.max_eval_regression_nats,
                on_reject=lambda step, reason: self.store.add_rejection(time.time(), step, reason),
                keep_last=cfg.keep_last_checkpoints,
                keep_every=cfg.keep_every_steps,
                in_use=web_context.downloads.in_use,
                agreement_peers=cfg.state_agreement_peers,
                agreement_rel_tol=cfg.state_agreement_rel_tol,
            ).start()

        self.endpoints = {
            "run_id": manifest.run_id,
            "grpc": f"{self.public_host}:{grpc_port}",
            "http": http_base_url,
            "dht": maddrs,
            "pid": os.getpid(),
            "initial_eval_loss": self.publisher.initial_eval_loss if self.publisher else None,
        }
        tmp = self.data_dir / "endpoints.json.tmp"
        tmp.write_text(json.dumps(self.endpoints, indent=2))
        os.replace(tmp, self.data_dir / "endpoints.json")
        emit(
            logger,
            "coordinator_ready",
            "coordinator ready: run %s, %d-parameter %s model; peers join with `crowdtrain peer --coordinator %s`",
            manifest.run_id,
            manifest.model.num_parameters,
            manifest.preset,
            self.endpoints["grpc"],
            grpc=self.endpoints["grpc"],
            http=http_base_url,
            run_id=manifest.run_id,
        )
        logger.info("downloads at %s, DHT bootstrap %s", http_base_url, maddrs[0])

    def _signing_key(self):
        """DATA_DIR/signing.key, created with the run; its public half is in the manifest."""
        if self._key is None:
            self._key = load_or_create_key(self.data_dir / "signing.key")
        return self._key

    def _bind(self, key: str, requested: int, bind):
        """Bind `requested`; with 0, reuse the port this data dir had last time (so peers and
        bookmarks keep working across restarts) and fall back to a free one if it is taken."""
        stored = int(self.store.get_meta(key) or 0)
        if requested or not stored:
            result = bind(requested)
        else:
            try:
                result = bind(stored)
            except (OSError, PortInUseError):
                logger.warning("port %d used by this run before is taken; picking a free one", stored)
                result = bind(0)
        port = result.port if isinstance(result, WebServer) else result[1]
        self.store.set_meta({key: str(port)})
        return result

    def _load_or_create_run(self) -> tuple[RunManifest, str]:
        # fail fast, before spending a minute building a run, when a fixed port is taken
        for flag, port in (("--grpc-port", self.config.grpc_port), ("--http-port", self.config.http_port)):
            _check_port_free(self.config.host, port, flag)
        state_path = self.data_dir / "state.sqlite3"
        if not state_path.exists():
            get_preset(self.config.preset)  # fail on a typo before writing anything
            key = new_key()
            manifest, tokenizer_json = create_run(self.config, self.data_dir, public_key_hex(key))
            save_key(self.data_dir / "signing.key", key)  # only once the run exists: nothing half-written
            self._key = key
            self.store = Store(state_path)
            self.store.set_meta({"manifest_json": manifest.to_json(), "tokenizer_json": tokenizer_json})
            return manifest, tokenizer_json
        self.store = Store(state_path)
        manifest_json, tokenizer_json = (
            self.store.get_meta("manifest_json"),
            self.store.get_meta("tokenizer_json"),
        )
        if manifest_json is None or tokenizer_json is None:
            raise ManifestError(
                f"{state_path} holds no run (a previous start was interrupted); remove {self.data_dir} and start again"
            )
        manifest = RunManifest.from_json(manifest_json)
        if manifest.preset != self.config.preset:
            logger.warning(
                "%s holds run %s with preset %r; ignoring --preset %r",
                self.data_dir,
                manifest.run_id,
                manifest.preset,
                self.config.preset,
            )
        logger.info("resuming run %s from %s", manifest.run_id, self.data_dir)
        return manifest, tokenizer_json

    def status(self) -> SwarmStatus:
        """The swarm as every view shows it (pure `build_status` over the store and the monitor)."""
        return build_status(
            time.time(),
            self.manifest.run_id,
            self.store.list_peers(),
            self.store.contribution_totals(),
            self.health,
            self.monitor.progress if self.monitor is not None else SwarmProgress(),
            checkpoint.list_checkpoints(self.checkpoint_root),
            self.store.rejections(),
        )

    def resume_step(self) -> int:
        """The checkpoint a joining peer should start from: the latest one when nobody is training
        (the whole swarm left and volunteers come back), else 0 (load the live state from peers)."""
        metas = checkpoint.list_checkpoints(self.checkpoint_root)
        if not metas:
            return 0
        now = time.time()
        if any(is_online(now, p, self.health) for p in self.store.peers_unordered()):
            return 0
        return metas[-1].step

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        """Signal-safe: ask `wait()` to return."""
        self._stopped.set()

    def shutdown(self) -> None:
        """Stop every component, newest first; idempotent."""
        self._stopped.set()
        if self.publisher is not None:
            self.publisher.shutdown()
            self.publisher = None
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=2).wait()
            self.grpc_server = None
        if self.web is not None:
            self.web.shutdown()
            self.web = None
        if self.monitor is not None:
            self.monitor.shutdown()
            self.monitor = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
