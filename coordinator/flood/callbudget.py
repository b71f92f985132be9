"""Who may hold the gRPC server's calls: budgets by kind of call and by caller address, and rate
limits per address, decided before the servicer runs. No grpc, no torch (`callgate` applies it).

grpc.aio's own `maximum_concurrent_rpcs` is one counter for every call, taken before any handler
runs: silent calls from one address filled it and every other RPC was refused. Here a
call holds a slot in one pool at a time, and each pool has a total and a per-address cap:

- WAITING: opened, its first message not read yet. Never refused: when the address (or everyone)
  is at the cap, the call that has been silent longest is ended instead, so a flood of silent
  calls only ever pushes out its own kind, and an honest call, whose first message follows its
  headers at once, is read long before its turn to be pushed out. It also ends after
  `first_message_timeout_s`.
- SESSION_STREAM: a HeartbeatStream whose first message the servicer accepted (its session and
  token checked), one per session: the newest replaces an older one. Its own budget, which
  nothing unauthenticated can take, so established peers keep heartbeating through any flood.
- OPEN_CALL / OPEN_STREAM: unauthenticated work once its request is read (Join, ListCheckpoints,
  GetStatus, CheckReachability, health; downloads, health watches, reflection). Refused
  (RESOURCE_EXHAUSTED, retried by peers) when the address or everyone is at the cap.

Heartbeat, Leave and a stream's first message hold nothing while the servicer answers them: that
happens before the handler's next await.

Rate limits are token buckets per caller address (an IPv6 caller by its /64: `ratelimit`) and per
group of RPCs, taken when a call opens, before its request is read. Heartbeat, HeartbeatStream and
Leave have none: a limit taken before the request is read would be spent by whoever shares the
volunteer's address (an attacker, or a broken client, behind the same NAT) and then refuse the
volunteer's own heartbeats. They need none: each session's heartbeats are limited by the servicer,
a request naming no valid session is refused after a dictionary lookup, and a silent call holds
only a WAITING slot that newer calls push out. Join is limited per address by the servicer.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from crowdtrain.coordinator.flood.ratelimit import BucketSettings, RateLimiter


class Pool(enum.Enum):
    WAITING = "calls waiting for their first message"
    SESSION_STREAM = "heartbeat streams"
    OPEN_CALL = "calls"
    OPEN_STREAM = "streams (downloads, watches)"


@dataclass(frozen=True)
class PoolCaps:
    total: int  # calls all callers together may hold in the pool
    per_address: int  # calls one address (an IPv6 /64) may hold in it


@dataclass(frozen=True)
class CallLimits:
    """How many calls of each kind the gRPC server holds, and how often one address may open them.

    The per-address caps and bursts are sized for a NAT (a campus, an office, carrier-grade NAT)
    with hundreds of volunteers behind one address: each volunteer holds one heartbeat stream
    (opened again by all of them at once after a coordinator restart: WAITING holds each for a
    round trip only), checks its reachability once, and lists and pulls a checkpoint (one download
    per file) a few times a day; an operator watches `crowdtrain status --watch 1`. Raise
    `session_streams.per_address` for more than ~1,000 volunteers behind one address (symptom:
    their peers log RESOURCE_EXHAUSTED "heartbeat streams from ..."), and `session_streams.total`
    above the number of peers you expect."""

    first_message_timeout_s: float = 5.0  # a call whose request has not arrived by then is ended
    waiting: PoolCaps = PoolCaps(4096, 64)  # calls not yet past their first message (oldest pushed out)
    session_streams: PoolCaps = PoolCaps(32768, 1024)  # accepted heartbeat streams (20,000 peers + room)
    open_calls: PoolCaps = PoolCaps(1024, 64)  # unauthenticated unary work in progress
    open_streams: PoolCaps = PoolCaps(512, 32)  # downloads, health watches, reflection
    # per address, taken when a call opens (burst, sustained per second):
    listings: BucketSettings = BucketSettings(120, 2.0)  # ListCheckpoints (a pull lists once)
    status: BucketSettings = BucketSettings(30, 2.0)  # GetStatus (`crowdtrain status --watch 1` is 1/s)
    downloads: BucketSettings = BucketSettings(200, 2.0)  # DownloadCheckpointFile (a pull: one per file)
    reachability: BucketSettings = BucketSettings(60, 0.5)  # CheckReachability (each peer: once at start)
    other: BucketSettings = BucketSettings(60, 2.0)  # health checks, reflection, anything else

    def pool_caps(self) -> dict[Pool, PoolCaps]:
        return {
            Pool.WAITING: self.waiting,
            Pool.SESSION_STREAM: self.session_streams,
            Pool.OPEN_CALL: self.open_calls,
            Pool.OPEN_STREAM: self.open_streams,
        }

    def total_calls(self) -> int:
        """Calls the pools hold at most, all together."""
        return sum(caps.total for caps in self.pool_caps().values())


RATE_GROUPS = ("listings", "status", "downloads", "reachability", "other")


def room(pool: Pool, caps: PoolCaps, held_total: int, held_by_address: int, key: str) -> tuple[bool, str]:
    """(whether one more call of `key` fits in `pool`, why not)."""
    if held_by_address >= caps.per_address:
        return (
            False,
            f"{key} already holds {held_by_address} {pool.value} (at most {caps.per_address} per address)",
        )
    if held_total >= caps.total:
        return False, f"the coordinator already holds {held_total} {pool.value} (at most {caps.total})"
    return True, ""


def to_push_out(caps: PoolCaps, held_total: int, held_by_address: int) -> tuple[str, str]:
    """Which waiting call a new one pushes out: ("address", why), ("anyone", why) or ("", "")."""
    if held_by_address >= caps.per_address:
        return (
            "address",
            f"more than {caps.per_address} calls from this address waited for their first message",
        )
    if held_total >= caps.total:
        return "anyone", f"more than {caps.total} calls waited for their first message"
    return "", ""


class Ticket:
    """One call's place: the pool it holds a slot in (None: none), and how to end it early."""

    __slots__ = ("key", "pool", "session_id", "cancel", "end_reason")

    def __init__(self, key: str, cancel: Callable[[], object]):
        self.key, self.cancel = key, cancel
        self.pool: Pool | None = None
        self.session_id = ""
        self.end_reason = ""  # set when the budget ended the call (pushed out, replaced)


class CallBudget:
    """The pools and the rate limits of one server; used from its event loop only (no locks)."""

    def __init__(self, limits: CallLimits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self._caps = limits.pool_caps()
        self._held: dict[Pool, OrderedDict[Ticket, None]] = {p: OrderedDict() for p in Pool}
        self._by_address: dict[Pool, dict[str, OrderedDict[Ticket, None]]] = {p: {} for p in Pool}
        self._sessions: dict[str, Ticket] = {}
        self._rates = {group: RateLimiter(getattr(limits, group)) for group in RATE_GROUPS}

    def rate(self, group: str | None, key: str) -> tuple[bool, float]:
        """(allowed, seconds until `key` may open a call of `group` again); takes a token. A call
        of no group (None) is always allowed."""
        if group is None:
            return True, 0.0
        return self._rates[group].allow(key, self.clock())

    def open(self, key: str, cancel: Callable[[], object]) -> Ticket:
        """A new call of `key`, waiting for its first message; may end the longest-waiting one."""
        held = self._held[Pool.WAITING]
        mine = self._by_address[Pool.WAITING].get(key, {})
        whose, why = to_push_out(self._caps[Pool.WAITING], len(held), len(mine))
        if whose:
            oldest = next(iter(mine if whose == "address" else held))
            self.end(oldest, f"{why}; this one waited longest (send the request when opening the call)")
        ticket = Ticket(key, cancel)
        self._add(ticket, Pool.WAITING)
        return ticket

    def move(self, ticket: Ticket, pool: Pool | None) -> tuple[bool, str]:
        """Move the call to `pool` (None: no slot); (False, why) and no slot when it is full."""
        self._remove(ticket)
        if pool is None:
            return True, ""
        held_by_address = len(self._by_address[pool].get(ticket.key, ()))
        ok, why = room(pool, self._caps[pool], len(self._held[pool]), held_by_address, ticket.key)
        if ok:
            self._add(ticket, pool)
        return ok, why

    def accept_session(self, ticket: Ticket, session_id: str) -> tuple[bool, str]:
        """The servicer accepted this heartbeat stream's session: it gets a session slot,
        replacing the session's older stream (a peer uses only its newest)."""
        older = self._sessions.get(session_id)
        if older is not None and older is not ticket:
            self.end(older, "this session opened a newer HeartbeatStream; only the newest is kept")
        ok, why = self.move(ticket, Pool.SESSION_STREAM)
        if ok:
            ticket.session_id = session_id
            self._sessions[session_id] = ticket
        return ok, f"{why}; retry later" if why else ""

    def end(self, ticket: Ticket, reason: str) -> None:
        """End a call early: it loses its slot now and is cancelled with `reason`."""
        self.close(ticket)
        ticket.end_reason = reason
        ticket.cancel()

    def close(self, ticket: Ticket) -> None:
        """The call is over: free its slot (idempotent)."""
        self._remove(ticket)
        if ticket.session_id and self._sessions.get(ticket.session_id) is ticket:
            del self._sessions[ticket.session_id]

    def held(self) -> dict[Pool, int]:
        return {pool: len(tickets) for pool, tickets in self._held.items()}

    def held_by(self, key: str) -> dict[Pool, int]:
        return {pool: len(by.get(key, ())) for pool, by in self._by_address.items()}

    def _add(self, ticket: Ticket, pool: Pool) -> None:
        ticket.pool = pool
        self._held[pool][ticket] = None
        self._by_address[pool].setdefault(ticket.key, OrderedDict())[ticket] = None

    def _remove(self, ticket: Ticket) -> None:
        pool = ticket.pool
        if pool is None:
            return
        ticket.pool = None
        self._held[pool].pop(ticket, None)
        mine = self._by_address[pool].get(ticket.key)
        if mine is not None:
            mine.pop(ticket, None)
            if not mine:
                del self._by_address[pool][ticket.key]
