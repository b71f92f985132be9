"""`--max-upload-mbps`: one cap on what all of a peer's processes send to other peers over hivemind.

hivemind 1.1.12 has no bandwidth limiter. Every byte a peer sends to another peer leaves Python
through a unix socket to its `p2pd` daemon, by one of two functions, and this module wraps both:

- streams (all-reduce parts, state served to joining peers, every streamed RPC): the class attribute
  `P2P.send_raw_data` (hivemind/p2p/p2p_daemon.py), which `P2P.send_protobuf` calls for each
  message both ends of a stream write;
- unary RPCs (DHT requests and replies, matchmaking): the module global `write_pbmsg` of
  hivemind/p2p/p2p_daemon_bindings/control.py, which `ControlClient._write_to_persistent_conn` calls
  for each message on the persistent connection; only `callUnary` and `unaryResponse` messages
  (what reaches another peer) wait, control messages to the local daemon pass untouched.

Each message is written in chunks (at most 64 KiB, about 20 ms worth at the cap) and each chunk
first waits for tokens, so a 30 MB all-reduce part leaves at the cap, not as one burst. The bucket
lives in 32 bytes of an anonymous temporary file, mapped shared: it is created before hivemind
forks its DHT and averager processes, which inherit the mapping, so the cap holds for all of them
together. Updates are serialized by `fcntl.lockf` on that file (plus a thread lock inside each
process): the kernel drops the lock of a process that dies holding it (hivemind SIGTERMs children
that stop too slowly), so no survivor can hang on it, which an `mp.Lock` would not guarantee. The
burst is 0.25 s worth of bytes (at least one chunk). A wait is reserved before it is slept, so
concurrent senders queue fairly. Not capped: p2pd's own libp2p traffic (identify, ping, relaying
for others when this peer is a relay) and the 1-byte marker before each stream message.

`install` checks that hivemind's internals still look as described and raises
`HivemindSendPathChanged` otherwise; patching is done once and is idempotent.

    limit = limit_upload(config.max_upload_mbps)  # main process, before hivemind.DHT(...)
    dht = hivemind.DHT(...); opt = hivemind.Optimizer(dht=dht, ...)  # their forks share the cap
    if limit is not None:
        counters = limit.counters()  # UploadCounters(bytes_sent=..., waited_s=...)
    ...
    if limit is not None:
        limit.shutdown()  # restores hivemind's functions in this process
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import logging
import math
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

MIN_CAP_MBPS = 0.1
BURST_S = 0.25
CHUNK_S = 0.02
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1024, 64 * 1024
_LAYOUT = struct.Struct("<5d")  # tokens_bytes, updated_s, bytes_sent, waited_s, rate_bytes_per_s
UNCAPPED_MBPS = 100_000.0  # a cap set to 0 while the peer runs: 100 Gbit/s, no cap in practice
_PEER_BOUND = frozenset({"callUnary", "unaryResponse"})


class UploadLimitError(CrowdtrainError, ValueError):
    """--max-upload-mbps has a value that cannot be used."""


class HivemindSendPathChanged(CrowdtrainError):
    """The installed hivemind no longer sends the way peer/machine/bandwidth.py wraps."""


@dataclass(frozen=True)
class UploadCap:
    rate_bytes_per_s: float
    burst_bytes: float
    chunk_bytes: int

    @property
    def mbps(self) -> float:
        return self.rate_bytes_per_s * 8 / 1e6


def upload_cap(max_upload_mbps: float, burst_s: float = BURST_S) -> UploadCap:
    """The bucket for a cap in Mbit/s (10^6 bits per second); raises UploadLimitError when unusable."""
    if not isinstance(max_upload_mbps, int | float) or not math.isfinite(max_upload_mbps):
        raise UploadLimitError(f"--max-upload-mbps must be a number of Mbit/s, got {max_upload_mbps!r}")
    if max_upload_mbps < MIN_CAP_MBPS:
        raise UploadLimitError(
            f"--max-upload-mbps {max_upload_mbps:g} is below {MIN_CAP_MBPS:g} Mbit/s, where the swarm's "
            "own DHT traffic would no longer get through: pass at least 0.1, or 0 for no cap"
        )
    rate = max_upload_mbps * 1e6 / 8
    chunk = int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, rate * CHUNK_S)))
    return UploadCap(rate_bytes_per_s=rate, burst_bytes=max(float(chunk), rate * burst_s), chunk_bytes=chunk)


@dataclass(frozen=True)
class BucketState:
    tokens_bytes: float
    updated_s: float


def reserve(now_s: float, state: BucketState, n_bytes: int, cap: UploadCap) -> tuple[BucketState, float]:
    """Take `n_bytes` from the bucket at time `now_s`: (the new state, seconds to wait before sending).

    Tokens refill at the cap's rate up to its burst; a reservation may drive them negative, and the
    deficit is the wait, so whoever reserves next waits behind it. A clock that went backwards
    refills nothing."""
    elapsed_s = max(0.0, now_s - state.updated_s)
    tokens = min(cap.burst_bytes, state.tokens_bytes + elapsed_s * cap.rate_bytes_per_s) - n_bytes
    wait_s = max(0.0, -tokens / cap.rate_bytes_per_s)
    return BucketState(tokens, max(now_s, state.updated_s)), wait_s


@dataclass(frozen=True)
class UploadCounters:
    bytes_sent: int  # by all processes sharing the bucket
    waited_s: float  # summed over every wait of every process


_buckets: weakref.WeakSet = weakref.WeakSet()


def _renew_thread_locks() -> None:  # a lock held by another thread at fork time stays held in the child
    for bucket in list(_buckets):
        bucket._thread_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_thread_locks)


class SharedTokenBucket:
    """A token bucket that the processes forked after its creation share; `clock` is injectable."""

    def __init__(self, cap: UploadCap, clock: Callable[[], float] = time.monotonic):
        self.cap, self.clock = cap, clock
        self._file = tempfile.TemporaryFile(prefix="crowdtrain-upload-")
        self._file.truncate(_LAYOUT.size)
        self._map = mmap.mmap(self._file.fileno(), _LAYOUT.size, mmap.MAP_SHARED)
        self._thread_lock = threading.Lock()
        self._map[:] = _LAYOUT.pack(cap.burst_bytes, clock(), 0.0, 0.0, cap.rate_bytes_per_s)
        self._final: UploadCounters | None = None  # set by close()
        _buckets.add(self)

    def _locked(self, update: Callable[[tuple[float, ...]], tuple[float, ...] | None]):
        """Apply `update` to the shared cells under both locks; returns the cells before it, or None
        once this process closed the bucket."""
        with self._thread_lock:
            if self._final is not None:
                return None
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)
            try:
                cells = _LAYOUT.unpack(self._map[:])
                new = update(cells)
                if new is not None:
                    self._map[:] = _LAYOUT.pack(*new)
                return cells
            finally:
                fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)

    def reserve(self, n_bytes: int) -> float:
        """Take `n_bytes` now; returns how long to wait before sending them (0 once closed: a send
        racing the peer's shutdown goes out rather than failing)."""
        decided: list[float] = [0.0]

        def update(cells: tuple[float, ...]) -> tuple[float, ...]:
            tokens, updated_s, sent, waited_s, rate = cells
            if rate != self.cap.rate_bytes_per_s:  # set_cap() in the peer's main process
                self.cap = upload_cap(rate * 8 / 1e6)
            state, wait_s = reserve(self.clock(), BucketState(tokens, updated_s), n_bytes, self.cap)
            decided.append(wait_s)
            return state.tokens_bytes, state.updated_s, sent + n_bytes, waited_s + wait_s, rate

        self._locked(update)
        return decided[-1]

    def wait(self, n_bytes: int, sleep: Callable[[float], None] = time.sleep) -> None:
        """Blocking: return once `n_bytes` may be sent."""
        wait_s = self.reserve(n_bytes)
        if wait_s > 0:
            sleep(wait_s)

    def set_cap(self, cap: UploadCap) -> None:
        """From now on, every process sharing the bucket sends at `cap` (`crowdtrain ctl set`)."""
        self.cap = cap
        self._locked(lambda cells: (min(cells[0], cap.burst_bytes), *cells[1:4], cap.rate_bytes_per_s))

    def counters(self) -> UploadCounters:
        """What all processes sent and waited so far; after close(), the figures at closing."""
        cells = self._locked(lambda cells: None)
        if cells is None:
            return self._final
        return UploadCounters(bytes_sent=int(cells[2]), waited_s=cells[3])

    def close(self) -> None:
        """Release this process's mapping (forked processes keep theirs); idempotent."""
        final = self.counters()
        with self._thread_lock:
            if self._final is None:
                self._final = final
                self._map.close()
                self._file.close()


_active: UploadLimit | None = None
_originals: dict[str, object] = {}


class UploadLimit:
    """The installed cap: `start()` makes this process's hivemind traffic (and that of processes it
    forks afterwards) wait for its bucket; `shutdown()` (idempotent) puts hivemind's functions back."""

    def __init__(
        self,
        cap: UploadCap,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.cap, self._sleep = cap, sleep
        self.bucket = SharedTokenBucket(cap, clock)
        self._shut = False

    async def send(self, writer, data: bytes | memoryview) -> None:
        """Write `data` to an asyncio StreamWriter in chunks, each after it got its tokens."""
        view = memoryview(data)
        for offset in range(0, len(view), self.cap.chunk_bytes):
            chunk = view[offset : offset + self.cap.chunk_bytes]
            wait_s = self.bucket.reserve(len(chunk))
            if wait_s > 0:
                await self._sleep(wait_s)
            writer.write(chunk)
            await writer.drain()

    def counters(self) -> UploadCounters:
        return self.bucket.counters()

    def set_mbps(self, max_upload_mbps: float) -> None:
        """Change the cap while the peer runs, for its forked processes too (0: no cap in practice);
        raises UploadLimitError when unusable. Chunks keep the size of the cap they started with."""
        cap = upload_cap(max_upload_mbps or UNCAPPED_MBPS)
        self.cap = cap
        self.bucket.set_cap(cap)
        logger.info("capping what this peer sends at %.3g Mbit/s from now on", cap.mbps)

    def start(self) -> UploadLimit:
        global _active
        install()
        previous, _active = _active, self
        if previous is not None and previous is not self:
            previous.shutdown()  # no longer active: leaves the wrapping in place
        logger.info(
            "capping what this peer sends at %.3g Mbit/s (bursts up to %.0f kB, %d-byte chunks)",
            self.cap.mbps,
            self.cap.burst_bytes / 1e3,
            self.cap.chunk_bytes,
        )
        return self

    def shutdown(self) -> None:
        global _active
        if self._shut:
            return
        self._shut = True
        if _active is self:
            _active = None
            uninstall()
        self.bucket.close()

    def __enter__(self) -> UploadLimit:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def active_limit() -> UploadLimit | None:
    """The cap this process's hivemind traffic waits for, if any."""
    return _active


def limit_upload(max_upload_mbps: float) -> UploadLimit | None:
    """Cap this process's hivemind uploads, and those of processes it forks later, at `max_upload_mbps`
    Mbit/s together; 0 removes any cap and returns None. Call in the peer's main process before
    creating its hivemind.DHT and optimizer. Raises UploadLimitError or HivemindSendPathChanged."""
    if max_upload_mbps == 0:
        if _active is not None:
            _active.shutdown()
        return None
    return UploadLimit(upload_cap(max_upload_mbps)).start()


# ---------------------------------------------------------------- hivemind's send path


def _code_names(func) -> set[str]:
    """Every global and attribute name a function's code (nested functions included) refers to."""
    names: set[str] = set()
    stack = [getattr(func, "__code__", None)]
    while stack:
        code = stack.pop()
        if code is None:
            continue
        names.update(code.co_names)
        stack += [const for const in code.co_consts if inspect.iscode(const)]
    return names


def check_send_path(p2p_class, control_module) -> None:
    """Raise HivemindSendPathChanged unless hivemind sends peer-bound bytes only the way we wrap."""
    problems = []
    raw = inspect.getattr_static(p2p_class, "send_raw_data", None)
    if not isinstance(raw, staticmethod):
        problems.append("P2P.send_raw_data is missing or no longer a staticmethod")
    elif list(inspect.signature(raw.__func__).parameters)[:2] != ["data", "writer"]:
        problems.append("P2P.send_raw_data no longer takes (data, writer)")
    if "send_raw_data" not in _code_names(getattr(p2p_class, "send_protobuf", None)):
        problems.append("P2P.send_protobuf no longer writes through P2P.send_raw_data")
    for method in ("_iterate_protobuf_stream_handler", "_add_protobuf_stream_handler"):
        if "send_protobuf" not in _code_names(getattr(p2p_class, method, None)):
            problems.append(f"P2P.{method} no longer writes through P2P.send_protobuf")
    if not all(hasattr(p2p_class, name) for name in ("HEADER_LEN", "BYTEORDER")):
        problems.append("P2P.HEADER_LEN or P2P.BYTEORDER is gone")
    client = getattr(control_module, "ControlClient", None)
    if not callable(getattr(control_module, "write_pbmsg", None)) or "write_pbmsg" not in _code_names(
        getattr(client, "_write_to_persistent_conn", None)
    ):
        problems.append("ControlClient._write_to_persistent_conn no longer writes through write_pbmsg")
    if problems:
        raise HivemindSendPathChanged(
            "--max-upload-mbps cannot cap this hivemind's uploads: " + "; ".join(problems) + ". It "
            "supports hivemind 1.1.12: install that version, or run without --max-upload-mbps"
        )


async def _send_raw_data(data: bytes, writer, *, chunk_size: int = 2**16) -> None:
    """P2P.send_raw_data, waiting for the active cap's tokens before each chunk."""
    from hivemind.p2p import P2P

    limit = _active
    if limit is None:
        return await _originals["send_raw_data"].__func__(data, writer, chunk_size=chunk_size)
    await limit.send(writer, len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    await limit.send(writer, data)


async def _write_pbmsg(stream, pbmsg) -> None:
    """control.write_pbmsg: messages bound for another peer wait for the active cap's tokens."""
    from hivemind.p2p.p2p_daemon_bindings.utils import write_unsigned_varint
    from hivemind.proto import p2pd_pb2

    limit = _active
    peer_bound = isinstance(pbmsg, p2pd_pb2.PersistentConnectionRequest) and (
        pbmsg.WhichOneof("message") in _PEER_BOUND
    )
    if limit is None or not peer_bound:
        return await _originals["write_pbmsg"](stream, pbmsg)
    payload = pbmsg.SerializeToString()
    await write_unsigned_varint(stream, len(payload))
    await limit.send(stream, payload)


def install() -> None:
    """Wrap hivemind's two peer-bound write functions (once; later calls do nothing)."""
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings import control

    if _originals:
        return
    check_send_path(P2P, control)
    _originals["send_raw_data"] = inspect.getattr_static(P2P, "send_raw_data")
    _originals["write_pbmsg"] = control.write_pbmsg
    P2P.send_raw_data = staticmethod(_send_raw_data)
    control.write_pbmsg = _write_pbmsg
    logger.debug("wrapped hivemind's P2P.send_raw_data and control.write_pbmsg")


def uninstall() -> None:
    """Put hivemind's functions back in this process; idempotent."""
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings import control

    if not _originals:
        return
    P2P.send_raw_data = _originals.pop("send_raw_data")
    control.write_pbmsg = _originals.pop("write_pbmsg")
