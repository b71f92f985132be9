"""Heartbeats from a volunteer to the coordinator, on a background thread that never raises.

Training never waits for the coordinator: when it is unreachable the reporter logs one warning,
backs off (capped), keeps trying, and logs again once it is back. Heartbeats travel over one
long-lived gRPC stream (see `crowdtrain.peer.link.client.HeartbeatStream`). What they carry is a
`PeerReport` (peer/run/report.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import grpc
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.peer.run.report import PeerReport, to_message
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

MAX_EVIDENCE = 32  # rejections per heartbeat (the coordinator's limit); older ones are dropped
MAX_GROUPS = 16  # averaging groups per heartbeat (the coordinator's limit); older ones are dropped


class StatsBox:
    """A thread-safe holder of the latest `PeerReport`; `phase_changed` is set whenever the phase
    changes (the heartbeat reporter wakes on it, so the coordinator learns "training" at once, not
    one heartbeat interval later)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._report = PeerReport()
        self.phase_changed = threading.Event()

    def get(self) -> PeerReport:
        with self._lock:
            return self._report

    def update(self, **changes) -> None:
        """Replace some fields of the report (names as in `PeerReport`)."""
        with self._lock:
            before, self._report = self._report, replace(self._report, **changes)
        if self._report.phase != before.phase:
            self.phase_changed.set()


class HeartbeatReporter:
    """Tells the coordinator, every `interval_s`, that this peer lives and what it does (the latest
    `StatsBox` report, plus what `evidence` says our averagers refused and with whom they averaged),
    and takes in the coordinator's answers: the swarm token (`on_token`), next-shard hints and
    standing (`answer`), a ban (`refused`).

    Threads: `start()` runs the loop on its own daemon thread "heartbeat", which calls `beat_once()`
    and, from that thread, the callbacks `on_token`, `on_reconnect` and `evidence` (none may block
    for long; their errors are logged, never raised). The volunteer builds it after Join on the main
    thread and calls `set_dht_proof()` and `start()`; its training loop reads `refused` and `answer`
    between steps (the data read-ahead thread reads `answer` too) and updates `stats`, where a phase
    change wakes the heartbeat thread so the coordinator learns it at once.
    Lifecycle: one per session, `start()` after Join, `shutdown()` before Leave (also a context
    manager); a ban (PERMISSION_DENIED) stops the loop by itself and leaves the reason in `refused`.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        session_id: str,
        session_token: str,
        stats: StatsBox,
        *,
        name: str,
        version: str,
        device: str,
        interval_s: float,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_reconnect: Callable[[], None] = lambda: None,
        on_token: Callable[[str], None] = lambda token_json: None,
        evidence: Callable[[], list] = list,
    ):
        self.client = client
        self.session_id = session_id
        self.session_token = session_token  # Join's secret for this session; every heartbeat carries it
        self.stats = stats
        # proof of the DHT peer id (`set_dht_proof`), sent until the coordinator accepts it
        self._dht_proof: tuple[bytes, bytes] = (b"", b"")
        self.dht_verified = False
        self.name = name
        self.version = version
        self.device = device
        self.interval_s = interval_s  # the coordinator may change it in its answers
        self.max_backoff_s = max_backoff_s  # the longest wait between failed heartbeats
        self.clock = clock
        self.on_reconnect = on_reconnect  # called once the coordinator is reachable again
        self.on_token = on_token  # called with each swarm token an answer carries
        self.evidence = evidence  # what to report since the last heartbeat (pb.Rejection, pb.AveragingGroup)
        self._pending_evidence: list = []  # pb.Rejection not yet delivered (kept across failures)
        self._pending_groups: list = []  # pb.AveragingGroup not yet delivered (kept across failures)
        self.started = clock()
        self.failed = 0
        self.refused: CoordinatorRejected | None = None  # set when the operator banned this peer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = client.heartbeat_stream()
        self.answer: pb.HeartbeatResponse | None = None  # the coordinator's latest answer (hints, standing)

    def start(self) -> HeartbeatReporter:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self.stats.phase_changed.set()  # wakes the thread's wait
        self._stream.close()  # unblocks a send waiting for an answer
        if self._thread is not None:
            self._thread.join(timeout=self.client.rpc_timeout_s + 1)
            self._thread = None

    def set_dht_proof(self, public_key: bytes, signature: bytes) -> None:
        """Send this proof of the DHT peer id (`peer.identity.prove_dht_identity`) with the next
        heartbeats, until the coordinator answers `dht_verified`."""
        self._dht_proof, self.dht_verified = (public_key, signature), False
        self.stats.phase_changed.set()  # send it now: until it is accepted, this peer earns no credit

    def _stop_refused(self, e: CoordinatorRejected) -> None:
        """Banned or no longer admitted: stop beating; the trainer reads `refused` and stops."""
        self.refused = e
        self._stop.set()
        self.stats.phase_changed.set()

    def _take_evidence(self) -> None:
        """Add what `evidence` holds to what is pending, the newest within the coordinator's limits."""
        messages = list(self.evidence())
        groups = [m for m in messages if isinstance(m, pb.AveragingGroup)]
        rejections = [m for m in messages if not isinstance(m, pb.AveragingGroup)]
        self._pending_evidence = (self._pending_evidence + rejections)[-MAX_EVIDENCE:]
        self._pending_groups = (self._pending_groups + groups)[-MAX_GROUPS:]

    def __enter__(self) -> HeartbeatReporter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def beat_once(self) -> bool:
        """Send one heartbeat; returns whether it was delivered. Never raises."""
        try:
            report = replace(
                self.stats.get(),
                name=self.name,
                version=self.version,
                device=self.device,
                uptime_s=self.clock() - self.started,
            )
            public_key, signature = (b"", b"") if self.dht_verified else self._dht_proof
            self._take_evidence()
            request = to_message(
                pb.HeartbeatRequest,
                report,
                session_id=self.session_id,
                session_token=self.session_token,
                dht_public_key=public_key,
                dht_signature=signature,
                rejections=self._pending_evidence,
                groups=self._pending_groups,
            )
            response = self._stream.send(request)
            self._pending_evidence, self._pending_groups = [], []
        except CoordinatorRejected as e:
            if e.code is grpc.StatusCode.PERMISSION_DENIED:  # banned: the volunteer must stop
                self._stop_refused(e)
                return False
            if self.failed == 0:
                logger.warning("heartbeat failed (%s); training continues, will keep trying", e)
            self.failed += 1
            return False
        except CoordinatorUnavailable as e:
            if self.failed == 0:
                logger.warning("heartbeat failed (%s); training continues, will keep trying", e)
            self.failed += 1
            return False
        except Exception as e:  # a bug here must never reach the training loop
            logger.exception("heartbeat crashed: %r", e)
            self.failed += 1
            return False
        if self.failed:
            logger.info("coordinator reachable again after %d failed heartbeat(s)", self.failed)
            try:
                self.on_reconnect()
            except Exception as e:  # must never reach the training loop
                logger.warning("after reconnecting: %r", e)
        self.failed = 0
        self.answer = response
        if public_key and response.dht_verified:
            self.dht_verified = True
        if response.heartbeat_interval_s > 0:
            self.interval_s = response.heartbeat_interval_s
        if response.swarm_token:
            try:
                self.on_token(response.swarm_token)
            except Exception as e:  # must never reach the training loop
                logger.warning("could not use the swarm token the coordinator sent: %r", e)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.stats.phase_changed.clear()  # this beat carries the current phase
            # shutdown() set both just before the clear: do not sleep a whole interval
            if self._stop.is_set():
                break
            delivered = self.beat_once()
            delay = (
                self.interval_s
                if delivered
                else min(self.max_backoff_s, self.interval_s * 2 ** min(self.failed, 5))
            )
            self.stats.phase_changed.wait(delay)  # the next interval, a new phase, or shutdown
