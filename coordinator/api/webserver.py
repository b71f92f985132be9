"""The coordinator's HTTP server: data shards, checkpoint files (with Range) and a JSON API.

    GET /data/<shard>                         training/eval shards named in the manifest
    GET /checkpoints/<step|latest>/<file>     checkpoint files; `curl -C -` / `wget -c` resume works
    GET /                                     the live dashboard (no external scripts)
    GET /api/v1/run                           the run manifest
    GET /api/v1/grpc                          where peers join: {"grpc": "HOST:PORT", "tls": bool}, the
                                              public gRPC address the coordinator announces (503 until
                                              its gRPC API is up), for a peer given the dashboard's address
    GET /api/v1/join                          the dashboard's "Join this run" box: join and pull commands,
                                              run key, ports to open, admission (503 until announced)
    GET /api/v1/state                         summary: global epoch, throughput, peers by state, ...
    GET /api/v1/dashboard                     the dashboard's numbers, each defined once (`dashboard.numbers`)
    GET /api/v1/peers                         every peer with its state and the reason for it
    GET /api/v1/peers/<id>, GET /peer/<id>    one peer (public or hivemind id): sessions, accepted samples, rank
    GET /api/v1/history                       swarm throughput/epoch/loss over time, eval loss per checkpoint
    GET /api/v1/contributors                  contribution leaderboard (samples per peer)
    GET /api/v1/checkpoints                   published checkpoints, oldest first
    GET /api/v1/rejections                    newest first, each row with `source` and `reason`: states the
                                              publisher refused ("publisher"), peers' reports of refused
                                              contributions ("peer_evidence"), automatic bans ("automatic_ban")
    GET /metrics                              Prometheus metrics
    GET /healthz                              "ok": the HTTP server answers
    GET /readyz                               "ready" once the gRPC API serves (`announce_grpc`); before,
                                              and after `withdraw` or shutdown, 503 and the reason

Every path is resolved against an allow-list, never joined blindly, so `..` cannot escape the data
directory: data shards against the manifest's, checkpoint files against their signed listing
(`archive.lookup_file`, shared with gRPC). Only GET and HEAD; anything else is 405.

It is open to the internet, so every connection is bounded (`HttpLimits`): aiohttp on an event
loop of its own (not the gRPC loop: a hostile HTTP client never delays a heartbeat), a connection
with no complete request for `idle_timeout_s` is closed (idle keep-alive, headers trickled in
slowly, a TLS handshake), a client that stops reading for `stall_timeout_s` is dropped (and a
checkpoint it was downloading is released for retention), at most `max_connections` at once and
`max_connections_per_address` per address (more are answered 503 at once: `connections`), one
address gets `requests_per_s_per_address` (more: 429, and that connection is closed, so a client
cannot keep connections alive on refusals), request lines and headers are capped in size. The
status views are built at most once per `view_max_age_s` in a one-thread pool and shared by every
reader (`snapshots`).
With `ssl_context` (`--tls-cert/--tls-key`) it serves HTTPS only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from crowdtrain.coordinator.admission import bans as evidence
from crowdtrain.coordinator.api.httpfiles import send_bytes, send_file
from crowdtrain.coordinator.api.loopthread import LoopThread
from crowdtrain.coordinator.api.metrics import CoordinatorMetrics
from crowdtrain.coordinator.dashboard import STATIC_DIR
from crowdtrain.coordinator.dashboard.join import JoinFacts, join_json
from crowdtrain.coordinator.dashboard.numbers import dashboard_numbers
from crowdtrain.coordinator.dashboard.snapshots import Memo, ViewCache
from crowdtrain.coordinator.errors import NotFoundError, PortInUseError
from crowdtrain.coordinator.flood.connections import BoundedServer, address_key
from crowdtrain.coordinator.flood.ratelimit import BucketSettings, RateLimiter
from crowdtrain.coordinator.peers.standings import PEER_KEY, peer_index
from crowdtrain.coordinator.peers.status import SwarmStatus, contributors
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
_JSON = "application/json"


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may hold. Raise `stall_timeout_s` if volunteers on slow links see
    checkpoint downloads dropped (the slowest reader served is 256 KiB per stall_timeout_s)."""

    idle_timeout_s: float = 15.0  # no complete request for this long (idle, slow headers, TLS handshake)
    stall_timeout_s: float = 30.0  # the client read nothing of its response for this long
    request_timeout_s: float = 3600.0  # longest any one request may take, downloads included
    view_timeout_s: float = 10.0  # a status view not built within this is answered 503
    view_max_age_s: float = 1.0  # status views are rebuilt at most this often
    view_workers: int = 1  # threads that build status views
    max_connections: int = 512  # open connections; more are answered 503 and closed
    max_connections_per_address: int = 16  # open connections of one address (an IPv6 /64); more: 503
    # this machine: a reverse proxy or tunnel on it connects from here for many callers, so only
    # max_connections bounds these (the proxy must cap its own clients)
    uncapped_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    backlog: int = 128  # connections the kernel queues before we accept them
    max_line_bytes: int = 8190  # request line and each header line
    max_headers: int = 64
    requests_burst: int = 60  # requests one address (an IPv6 /64) may make at once...
    requests_per_s_per_address: float = 20.0  # ...and then per second; more are answered 429


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


def _views(ctx: WebContext, max_age_s: float) -> dict[str, Callable[[], bytes]]:
    """How each cached view is built (in the view pool, never on an event loop)."""
    snapshot = Memo(lambda: (s := ctx.status(), s.to_json_dict()), max_age_s)

    def history() -> bytes:
        evals = [
            {"t": m.created_unix_s, "step": m.step, "eval_loss": m.eval_loss}
            for m in archive.published(ctx.checkpoint_root)
        ]
        return json.dumps({"swarm": ctx.store.history(), "eval": evals}).encode()

    views = {
        "state": lambda: json.dumps(snapshot.get()[1]["summary"]).encode(),
        "dashboard": lambda: json.dumps(dashboard_numbers(snapshot.get()[0].summary)).encode(),
        "peers": lambda: json.dumps(snapshot.get()[1]["peers"]).encode(),
        "contributors": lambda: json.dumps(
            contributors(snapshot.get()[0], ctx.store.contribution_totals())
        ).encode(),
        "history": history,
        "checkpoints": lambda: json.dumps(
            [json.loads(m.to_json()) for m in archive.published(ctx.checkpoint_root)]
        ).encode(),
        "rejections": lambda: json.dumps(rejection_rows(ctx.store)).encode(),
        "peer_index": lambda: peer_index(snapshot.get()[1]["peers"], ctx.store.contribution_totals()),
    }
    if ctx.metrics is not None:
        views["metrics"] = lambda: generate_latest(ctx.metrics.registry)
    return views


def rejection_rows(store: Store, limit: int = 100) -> list[dict]:
    """/api/v1/rejections: the publisher's refused states (rows `t, step, reason`, as before) and
    the evidence against peers and the automatic bans it led to, each row marked by `source`,
    newest first; at most `limit` of each source."""
    found = evidence.recent(store, limit)
    rows = [{**r, "source": "automatic_ban"} for r in found["automatic_bans"]]  # first of equal times
    rows += [
        {
            **r,
            "source": "peer_evidence",
            "reason": f"{r['reporter']} refused a contribution of {r['offender']} at epoch {r['epoch']}: "
            f"{r['kind']}" + (f" ({r['detail']})" if r["detail"] else ""),
        }
        for r in found["peer_evidence"]
    ]
    rows += [{**r, "source": "publisher"} for r in store.rejections(limit)]
    return sorted(rows, key=lambda r: -r["t"])  # stable


class _Routes:
    def __init__(self, ctx: WebContext, limits: HttpLimits):
        self.ctx, self.limits = ctx, limits
        self.views = ViewCache(_views(ctx, limits.view_max_age_s), limits.view_max_age_s, limits.view_workers)
        self.callers = RateLimiter(BucketSettings(limits.requests_burst, limits.requests_per_s_per_address))
        self.static = {
            p.name: (p.read_bytes(), _STATIC_TYPES[p.suffix])
            for p in STATIC_DIR.iterdir()
            if p.suffix in _STATIC_TYPES
        }
        self.grpc_answer: bytes | None = None  # /api/v1/grpc, encoded once (`WebServer.announce_grpc`)
        self.join_answer: bytes | None = None  # /api/v1/join, likewise
        self.withdrawn: bytes | None = None  # /readyz's 503 answer once `WebServer.withdraw` was called

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await self._route(request)
        except TimeoutError:
            logger.info(
                "dropped %s %s: over %gs", request.method, request.path[:80], self.limits.request_timeout_s
            )
        except ConnectionError as e:  # the client went away, or stopped reading (StalledError)
            logger.debug("dropped %s %s: %s", request.method, request.path[:80], e)
        except Exception:  # a bug: logged here, where aiohttp's own (quiet) logger would hide it
            logger.exception("HTTP %s %s failed", request.method, request.path[:80])
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=408)  # never reaches the client: its connection is gone

    async def _bytes(
        self, request, body: bytes, content_type: str, status: int = 200, headers=None, close=False
    ):
        headers = {"Cache-Control": "no-store", **(headers or {})}
        return await send_bytes(
            request, body, content_type, self.limits.stall_timeout_s, status, headers, close=close
        )

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        allowed, retry_s = self.callers.allow(address_key(request.remote or ""), time.monotonic())
        if not allowed:  # every request costs the GIL the heartbeats need: strangers get a fair share
            retry = {"Retry-After": str(math.ceil(retry_s))}
            return await self._bytes(  # closed after: refusals never keep a connection alive
                request, b"too many requests from your address\n", "text/plain", 429, retry, close=True
            )
        if request.method not in ("GET", "HEAD"):
            return await self._bytes(
                request, b"only GET and HEAD\n", "text/plain", 405, {"Allow": "GET, HEAD"}
            )
        path = request.raw_path.split("?", 1)[0]  # raw: "%2F" stays three characters, never a "/"
        parts = [p for p in path.split("/") if p]
        if path == "/healthz":
            return await self._bytes(request, b"ok\n", "text/plain")
        if path == "/readyz":
            return await self._ready(request)
        if path in ("/", "/index.html"):
            parts = ["static", "index.html"]
        if len(parts) == 2 and parts[0] == "static" and parts[1] in self.static:
            return await self._bytes(request, *self.static[parts[1]])
        if path == "/metrics" and "metrics" in self.views:
            return await self._view(request, "metrics", CONTENT_TYPE_LATEST)
        if len(parts) == 3 and parts[:2] == ["api", "v1"]:
            if parts[2] == "run":
                return await self._bytes(request, self.ctx.manifest_json.encode(), _JSON)
            if parts[2] in ("grpc", "join"):
                return await self._announced(request, parts[2])
            if parts[2] in self.views and parts[2] not in ("metrics", "peer_index"):
                return await self._view(request, parts[2], _JSON)
        if len(parts) == 4 and parts[:3] == ["api", "v1", "peers"] and PEER_KEY.fullmatch(parts[3]):
            return await self._peer(request, parts[3])  # a lookup in {peer id: JSON} (`peerpage`)
        if len(parts) == 2 and parts[0] == "peer" and PEER_KEY.fullmatch(parts[1]):
            return await self._bytes(request, *self.static["peer.html"])
        if len(parts) == 2 and parts[0] == "data" and parts[1] in self.ctx.data_files:
            return await send_file(request, self.ctx.data_dir / parts[1], self.limits.stall_timeout_s)
        if len(parts) == 3 and parts[0] == "checkpoints":
            return await self._checkpoint_file(request, parts[1], parts[2])
        return await self._bytes(request, f"no such resource {path[:200]}\n".encode(), "text/plain", 404)

    async def _announced(self, request, name: str) -> web.StreamResponse:
        answer = self.grpc_answer if name == "grpc" else self.join_answer  # one read: set once elsewhere
        if answer is None:
            return await self._bytes(
                request, b"the gRPC API is not up yet; retry\n", "text/plain", 503, {"Retry-After": "2"}
            )
        return await self._bytes(request, answer, _JSON)

    async def _ready(self, request) -> web.StreamResponse:
        """Two reads of attributes other threads set once each: no status build, no lock."""
        reason = self.withdrawn
        if reason is None and self.grpc_answer is None:
            reason = b"not ready: the gRPC API is not up yet\n"
        if reason is not None:
            return await self._bytes(request, reason, "text/plain", 503, {"Retry-After": "2"})
        return await self._bytes(request, b"ready\n", "text/plain")

    async def _peer(self, request, key: str) -> web.StreamResponse:
        building = asyncio.shield(asyncio.wrap_future(self.views.future("peer_index")))
        try:
            index = await asyncio.wait_for(building, self.limits.view_timeout_s)
        except TimeoutError:
            return await self._bytes(
                request, b"status is busy; retry\n", "text/plain", 503, {"Retry-After": "2"}
            )
        if key not in index:
            return await self._bytes(request, b"no such peer (yet)\n", "text/plain", 404)
        return await self._bytes(request, index[key], _JSON)

    async def _view(self, request, name: str, content_type: str) -> web.StreamResponse:
        shared = asyncio.wrap_future(self.views.future(name))
        try:  # shielded: a reader that gives up does not cancel the build other readers wait for
            body = await asyncio.wait_for(asyncio.shield(shared), self.limits.view_timeout_s)
        except TimeoutError:
            return await self._bytes(
                request, b"status is busy; retry\n", "text/plain", 503, {"Retry-After": "2"}
            )
        except Exception as e:  # logged by the view cache
            return await self._bytes(request, f"status unavailable: {e}\n".encode(), "text/plain", 500)
        return await self._bytes(request, body, content_type)

    async def _checkpoint_file(self, request, step: str, name: str) -> web.StreamResponse:
        if step != "latest" and not (step.isascii() and step.isdigit() and len(step) <= 12):
            return await self._bytes(
                request, b"a checkpoint step is a number or 'latest'\n", "text/plain", 404
            )
        root = self.ctx.checkpoint_root
        try:
            meta, path = await asyncio.to_thread(
                archive.lookup_file, root, None if step == "latest" else int(step), name
            )
        except NotFoundError as e:
            return await self._bytes(request, f"{e}\n".encode(), "text/plain", 404)
        self.ctx.downloads.begin(meta.step)
        try:
            return await send_file(request, path, self.limits.stall_timeout_s)
        finally:  # reached for a finished, failed, stalled or timed-out download alike
            self.ctx.downloads.end(meta.step)


class _QuietProtocolLog(logging.LoggerAdapter):
    """aiohttp's connection-level log: malformed requests from strangers are logged at debug level
    (with a traceback each at ERROR, anyone could fill the operator's disk); handler errors are
    logged by `_Routes.handle` itself."""

    def exception(self, msg, *args, **kwargs) -> None:
        self.debug(msg, *args, **{**kwargs, "exc_info": True})

    def error(self, msg, *args, **kwargs) -> None:
        self.debug(msg, *args, **kwargs)


class WebServer:
    """Binds at construction; start() serves on a loop thread of its own; shutdown() is idempotent."""

    def __init__(
        self,
        ctx: WebContext,
        host: str,
        port: int,
        limits: HttpLimits = HttpLimits(),
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.limits, self.scheme = limits, "https" if ssl_context else "http"
        self._routes = _Routes(ctx, limits)
        self._loop = LoopThread("http-aio")
        try:
            self._http, self._server = self._loop.run(self._bind(host, port, ssl_context))
        except BaseException:
            self._loop.close()
            self._routes.views.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    async def _bind(self, host: str, port: int, ssl_context: ssl.SSLContext | None):
        limits = self.limits
        http = BoundedServer(
            self._routes.handle,
            limits.max_connections,
            limits.max_connections_per_address,
            limits.uncapped_addresses,
            keepalive_timeout=limits.idle_timeout_s,  # also from connect to the first request
            max_line_size=limits.max_line_bytes,
            max_field_size=limits.max_line_bytes,
            max_headers=limits.max_headers,
            lingering_time=1.0,
            access_log=None,
            logger=_QuietProtocolLog(logging.getLogger(__name__ + ".protocol")),
        )
        try:
            server = await asyncio.get_running_loop().create_server(
                http,
                host,
                port,
                ssl=ssl_context,
                backlog=limits.backlog,
                ssl_handshake_timeout=limits.idle_timeout_s if ssl_context else None,
                start_serving=False,
            )
        except OSError as e:
            raise PortInUseError(
                f"cannot listen for HTTP on {host}:{port} ({e.strerror}); stop the other process or pass --http-port 0"
            ) from e
        return http, server

    def announce_grpc(
        self,
        address: str,
        tls: bool,
        *,
        dht_port: int = 0,
        admission: str = "open",
        min_peer_version: str = "",
    ) -> None:
        """Answer /api/v1/grpc with `address` (the public HOST:PORT peers are told to join, never a
        bind address that is not announced) and whether it takes TLS, and /api/v1/join with the
        dashboard's join box (`dht_port`: the bootstrap node's; `admission`: --admission;
        `min_peer_version`: the join refusal's floor, which `crowdtrain doctor` compares); encoded
        once, served as is. From then on /readyz answers "ready" (the run is open)."""
        run_key = json.loads(self._routes.ctx.manifest_json).get("signing_public_key", "")
        facts = JoinFacts(address, tls, self.port, dht_port, admission, run_key, min_peer_version)
        self._routes.join_answer = json.dumps(join_json(facts)).encode()
        self._routes.grpc_answer = json.dumps({"grpc": address, "tls": tls}).encode()

    def withdraw(self, reason: str) -> None:
        """Answer /readyz with 503 and `reason` (one line) from now on, so probes stop sending callers."""
        line = " ".join(reason.split())[:200]
        self._routes.withdrawn = f"not ready: {line}\n".encode()

    @property
    def connections(self) -> int:
        """Open HTTP connections (for tests and diagnostics)."""
        return len(self._http.connections)

    def start(self) -> WebServer:
        self._loop.run(self._server.start_serving())
        return self

    def shutdown(self) -> None:
        if self._loop.closed:
            return
        self.withdraw("the coordinator is shutting down")  # for requests on open connections meanwhile
        try:
            self._loop.run(self._close(), timeout_s=15)
        finally:
            self._loop.close()
            self._routes.views.close()

    async def _close(self) -> None:
        self._server.close()
        self._http.pre_shutdown()
        await self._http.shutdown(timeout=2.0)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["HttpLimits", "WebContext", "WebServer"]
