"""The coordinator's HTTP server: data shards, checkpoint files (with Range) and a JSON API.

    GET /data/<shard>                         training/eval shards named in the manifest
    GET /checkpoints/<step|latest>/<file>     checkpoint files; `curl -C -` / `wget -c` resume works
    GET /                                     the live dashboard (no external scripts)
    GET /api/v1/run                           the run manifest
    GET /api/v1/state                         summary: global epoch, throughput, peers by state, ...
    GET /api/v1/peers                         every peer with its state and the reason for it
    GET /api/v1/history                       swarm throughput/epoch/loss over time, eval loss per checkpoint
    GET /api/v1/contributors                  contribution leaderboard (samples per peer)
    GET /api/v1/checkpoints                   published checkpoints, oldest first
    GET /api/v1/rejections                    states the publisher refused, newest first, with the reason
    GET /metrics                              Prometheus metrics
    GET /healthz                              "ok"

Standard library only (ThreadingHTTPServer); every path is resolved against an allow-list, never
joined blindly, so `..` cannot escape the data directory: data shards against the manifest's,
checkpoint files against their signed listing (`archive.lookup_file`, shared with gRPC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from crowdtrain.coordinator import archive
from crowdtrain.coordinator.errors import NotFoundError, PortInUseError
from crowdtrain.coordinator.metrics import CoordinatorMetrics
from crowdtrain.coordinator.status import SwarmStatus, contributors
from crowdtrain.coordinator.store import Store
from crowdtrain.peer import checkpoint
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK_BYTES = 1 << 20


STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}


@dataclasses.dataclass(frozen=True)
class WebContext:
    data_dir: Path
    data_files: frozenset[str]
    checkpoint_root: Path
    manifest_json: str
    store: Store
    status: Callable[[], SwarmStatus]
    metrics: CoordinatorMetrics | None = None
    downloads: archive.DownloadTracker = dataclasses.field(default_factory=archive.DownloadTracker)


class _Handler(BaseHTTPRequestHandler):
    server_version = "crowdtrain"
    ctx: WebContext  # set on the subclass made by WebServer

    def log_message(self, fmt, *args):  # route access logs through logging, quietly
        logger.debug("%s %s", self.address_string(), fmt % args)

    def do_HEAD(self):
        self._dispatch(send_body=False)

    def do_GET(self):
        self._dispatch(send_body=True)

    def _dispatch(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        try:
            if path == "/healthz":
                return self._send_bytes(b"ok\n", "text/plain", send_body)
            if path in ("/", "/index.html"):
                return self._static("index.html", send_body)
            if len(parts) == 2 and parts[0] == "static":
                return self._static(parts[1], send_body)
            if path == "/metrics" and self.ctx.metrics is not None:
                return self._send_bytes(
                    generate_latest(self.ctx.metrics.registry), CONTENT_TYPE_LATEST, send_body
                )
            if parts[:2] == ["api", "v1"] and len(parts) == 3:
                return self._api(parts[2], send_body)
            if len(parts) == 2 and parts[0] == "data" and parts[1] in self.ctx.data_files:
                return self._send_file(self.ctx.data_dir / parts[1], send_body)
            if len(parts) == 3 and parts[0] == "checkpoints":
                return self._checkpoint_file(parts[1], parts[2], send_body)
        except (BrokenPipeError, ConnectionResetError):
            return
        self.send_error(HTTPStatus.NOT_FOUND, f"no such resource {path}")

    def _static(self, name: str, send_body: bool) -> None:
        path = STATIC_DIR / name
        if name not in {p.name for p in STATIC_DIR.iterdir()} or path.suffix not in _STATIC_TYPES:
            return self.send_error(HTTPStatus.NOT_FOUND, f"no static file {name!r}")
        self._send_bytes(path.read_bytes(), _STATIC_TYPES[path.suffix], send_body)

    def _api(self, name: str, send_body: bool) -> None:
        ctx = self.ctx
        if name == "run":
            body = ctx.manifest_json
        elif name == "checkpoints":
            body = json.dumps(
                [json.loads(m.to_json()) for m in checkpoint.list_checkpoints(ctx.checkpoint_root)]
            )
        elif name == "state":
            body = json.dumps(ctx.status().to_json_dict()["summary"])
        elif name == "peers":
            body = json.dumps(ctx.status().to_json_dict()["peers"])
        elif name == "rejections":
            body = json.dumps(ctx.store.rejections())
        elif name == "contributors":
            body = json.dumps(contributors(ctx.status(), ctx.store.contribution_totals()))
        elif name == "history":
            evals = [
                {"t": m.created_unix_s, "step": m.step, "eval_loss": m.eval_loss}
                for m in checkpoint.list_checkpoints(ctx.checkpoint_root)
            ]
            body = json.dumps({"swarm": ctx.store.history(), "eval": evals})
        else:
            return self.send_error(HTTPStatus.NOT_FOUND, f"no API {name!r}")
        self._send_bytes(body.encode(), "application/json", send_body)

    def _checkpoint_file(self, step: str, name: str, send_body: bool) -> None:
        if step != "latest" and not (step.isascii() and step.isdigit()):
            return self.send_error(HTTPStatus.NOT_FOUND, "a checkpoint step is a number or 'latest'")
        try:
            meta, path = archive.lookup_file(
                self.ctx.checkpoint_root, None if step == "latest" else int(step), name
            )
        except NotFoundError as e:
            return self.send_error(HTTPStatus.NOT_FOUND, str(e))
        self.ctx.downloads.begin(meta.step)
        try:
            self._send_file(path, send_body)
        finally:
            self.ctx.downloads.end(meta.step)

    def _send_bytes(self, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _send_file(self, path: Path, send_body: bool) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; opened first so a pruned file is a 404
        except FileNotFoundError:
            return self.send_error(HTTPStatus.NOT_FOUND, "file is gone")
        with f:
            size = path.stat().st_size
            start, end = 0, size - 1
            header = self.headers.get("Range")
            status = HTTPStatus.OK
            if header:
                m = _RANGE.match(header.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    return self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "unsupported Range")
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start = max(0, size - int(m.group(2)))
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not send_body:
                return
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(_CHUNK_BYTES, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class WebServer:
    """start() binds and serves on a background thread; shutdown() is idempotent."""

    def __init__(self, ctx: WebContext, host: str, port: int):
        handler = type("Handler", (_Handler,), {"ctx": ctx})
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise PortInUseError(
                f"cannot listen for HTTP on {host}:{port} ({e.strerror}); stop the other process or pass --http-port 0"
            ) from e
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
            self._httpd.server_close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["WebContext", "WebServer"]
