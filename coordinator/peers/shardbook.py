"""Which data shard each peer reads, and how much of the run's data the swarm has read.

Every live peer holds a *lease* on one training shard and, once it reads it, a *reservation* of the
shard it reads next; no two live peers hold the same shard while a free one exists, so peers do not
train on the same samples at the same time. Each shard has a *cursor*: passes over it finished and
sequences read in the current pass (a pass reads the shard in an order fixed by the run, the shard
and the pass number: `crowdtrain.peer.data.reader`). The lease of a peer that left or died is free
again and the next joiner continues at its cursor; a restarted peer asks for the shard it was
reading (its cache remembers where it stopped) and continues there when that shard is free.

    book = ShardBook(store, num_shards=8, shard_bytes=[...], live_s=30.0)
    shard, cursor, reason = book.lease(now, session_id, claim=Claim(3, 120, 0))   # at Join
    book.report(now, record, shard_index=3, passes=0, position=180, sequences=900)  # heartbeats
    book.coverage()  # Coverage(read=..., total=..., shards=8, sized=5)

Positions are claims by strangers: a cursor moves only on a report of its shard's lease holder,
only forward, at most one pass at a time and never past the shard's size; the size a peer reports
first is kept if it fits the shard's bytes (a sequence needs at least one byte per token). A liar can
mislead the bookkeeping of the one shard it holds, nothing else. The pure core (`choose_shard`,
`advance`, `coverage_of`) has no clock and no I/O; `ShardBook` keeps cursors in the store's SQLite.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS shard_cursors (
    shard INTEGER PRIMARY KEY, passes INTEGER NOT NULL, position INTEGER NOT NULL, sequences INTEGER NOT NULL
)"""
WRITE_BEHIND_S = 5.0  # a cursor's position is written at most this often (a new pass at once)
HOLD_AFTER_LEAVE_S = 120.0  # a peer that left cleanly keeps its shards this long, for its restart


@dataclass(frozen=True)
class Cursor:
    passes: int = 0  # passes over the shard finished
    position: int = 0  # sequences read in the current pass
    sequences: int = 0  # sequences in the shard (0: no peer has read it yet)

    def key(self) -> tuple[int, int]:
        return self.passes, self.position

    def read(self) -> int:
        return self.passes * self.sequences + min(self.position, self.sequences)


@dataclass(frozen=True)
class Claim:
    """Where a peer says it stopped (Join's resume fields) or is (a heartbeat's shard fields)."""

    shard: int
    position: int
    passes: int
    sequences: int = 0


@dataclass(frozen=True)
class Coverage:
    """How much of the run's data the swarm has read: the one definition the dashboard,
    `crowdtrain status` and the model card show (dashboard/numbers.py words it for the cards)."""

    read: int  # sequences read, every finished pass counted
    total: int  # sequences in the shards whose size is known
    shards: int
    sized: int  # shards whose size is known

    @property
    def share(self) -> float | None:
        """Read over all training sequences (above 1 after a pass); None until every shard is sized."""
        if self.shards == 0 or self.sized < self.shards or self.total <= 0:
            return None
        return self.read / self.total

    def text(self) -> str:
        """For people (`crowdtrain status`, the model card); "" before any shard is sized."""
        if self.share is not None:
            return f"{self.read:,} of {self.total:,} training sequences ({self.share:.1%})"
        sized = f"{self.sized} of {self.shards} shards sized (a share once every shard is)"
        return f"{self.read:,} training sequences; {sized}" if self.total else ""


def resume_claim(request, checked: dict, run_id: str) -> Claim | None:
    """The place a JoinRequest says its peer stopped at last time, if it names this run."""
    if not request.HasField("resume_shard") or checked["resume_run_id"] != run_id:
        return None
    return Claim(checked["resume_shard"], checked["resume_position"], checked["resume_pass"])


def choose_shard(
    num_shards: int, cursors: Sequence[Cursor], busy: Counter, claim: Claim | None = None, exclude=()
) -> tuple[int, Cursor, str]:
    """(shard, where to start in it, why): the claimed shard when it is free, else the least-read
    free shard, else (more peers than shards) the least-shared one."""
    if claim is not None and 0 <= claim.shard < num_shards and not busy[claim.shard]:
        start = _merge(cursors[claim.shard], claim)
        return (
            claim.shard,
            start,
            (
                f"continues shard {claim.shard} where it stopped (pass {start.passes}, sequence {start.position})"
            ),
        )
    free = [i for i in range(num_shards) if not busy[i] and i not in exclude]
    if free:
        shard = min(free, key=lambda i: (cursors[i].passes, _fraction(cursors[i]), i))
        return shard, cursors[shard], f"least-read free shard ({len(free)} of {num_shards} free)"
    candidates = [i for i in range(num_shards) if i not in exclude] or list(range(num_shards))
    shard = min(candidates, key=lambda i: (busy[i], cursors[i].passes, _fraction(cursors[i]), i))
    return (
        shard,
        cursors[shard],
        (f"all {num_shards} shards are being read: shares shard {shard} with {busy[shard]} peer(s)"),
    )


def _fraction(cursor: Cursor) -> float:
    return cursor.position / cursor.sequences if cursor.sequences else 0.0


def _merge(cursor: Cursor, claim: Claim) -> Cursor:
    """The later of the book's cursor and a returning peer's claim, the claim bounded like a report."""
    moved, _ = advance(cursor, claim, max_sequences=cursor.sequences or 2**40)
    return moved


def advance(cursor: Cursor, claim: Claim, max_sequences: int) -> tuple[Cursor, str]:
    """The cursor after its lease holder reports `claim`; the reason says what was refused, if anything."""
    sequences, note = cursor.sequences, ""
    if claim.sequences and not sequences:
        if claim.sequences <= max_sequences:
            sequences = claim.sequences
        else:
            note = f"size {claim.sequences} exceeds what the shard's bytes allow ({max_sequences}); "
    if (claim.passes, claim.position) < cursor.key():
        return replace(cursor, sequences=sequences), note + "position behind the cursor ignored"
    if claim.passes > cursor.passes + 1:
        return replace(cursor, sequences=sequences), note + "skipped passes ignored"
    if sequences and claim.position > sequences:
        return replace(cursor, sequences=sequences), note + "position past the shard's end ignored"
    return Cursor(claim.passes, claim.position, sequences), note


def coverage_of(cursors: Iterable[Cursor]) -> Coverage:
    cursors = list(cursors)
    sized = [c for c in cursors if c.sequences]
    return Coverage(
        read=sum(c.read() for c in sized),
        total=sum(c.sequences for c in sized),
        shards=len(cursors),
        sized=len(sized),
    )


@dataclass
class _Holding:
    lease: int
    next: int
    last_seen_unix_s: float
    gone: bool  # left or banned
    left_unix_s: float | None = None  # left cleanly then: its shards wait for its restart a while


class ShardBook:
    """Leases, reservations and cursors of one run; thread-safe. Holdings are rebuilt from the
    store's peer records at start (`lease_shard`, `next_shard`), cursors from its table."""

    def __init__(self, store, num_shards: int, shard_bytes: Sequence[int], live_s: float):
        self.store = store
        self.num_shards = num_shards
        self.live_s = live_s
        self.shard_bytes = list(shard_bytes)
        self._lock = threading.Lock()
        self._cursors = [Cursor() for _ in range(num_shards)]
        self._written: dict[int, float] = {}
        self._holdings: dict[str, _Holding] = {}
        if store is None:
            return
        with store.transaction() as db:
            db.execute(_SCHEMA)
        for shard, passes, position, sequences in store.query(
            "SELECT shard, passes, position, sequences FROM shard_cursors"
        ):
            if 0 <= shard < num_shards:
                self._cursors[shard] = Cursor(passes, position, sequences)
        for record in store.peers_unordered():
            self.hold(record.session_id, record.lease_shard, record.next_shard, record.last_seen_unix_s)
            if record.left_unix_s is not None or record.banned:
                self._holdings[record.session_id].gone = True

    def hold(self, session_id: str, lease: int, next_shard: int, now: float) -> None:
        with self._lock:
            self._holdings[session_id] = _Holding(lease, next_shard, now, False)

    def release(self, session_id: str, now: float | None = None) -> None:
        """The peer left (`now`: cleanly, then) or was banned: its shards are free for others, after
        HOLD_AFTER_LEAVE_S for a clean leave, except for a returning peer's claim."""
        with self._lock:
            holding = self._holdings.get(session_id)
            if holding is not None:
                holding.gone, holding.left_unix_s = True, now

    def _busy(self, now: float, but: str, held: bool = True) -> Counter:
        """Readers per shard: live peers' leases and reservations (and, with `held`, those of peers
        that left cleanly a short while ago)."""
        busy: Counter = Counter()
        for session_id, h in self._holdings.items():
            live = not h.gone and now - h.last_seen_unix_s <= self.live_s
            waiting = held and h.left_unix_s is not None and now - h.left_unix_s <= HOLD_AFTER_LEAVE_S
            if session_id != but and (live or waiting):
                busy.update(s for s in {h.lease, h.next} if s >= 0)
        return busy

    def lease(self, now: float, session_id: str, claim: Claim | None = None) -> tuple[int, Cursor, str]:
        """A joiner's shard, where to start in it, and why; the lease is held from now on."""
        with self._lock:
            busy = self._busy(now, session_id)
            if (
                claim is not None
                and 0 <= claim.shard < self.num_shards
                and not self._busy(now, session_id, held=False)[claim.shard]
            ):
                busy[claim.shard] = 0  # a returning peer gets back what was held for it
            shard, start, reason = choose_shard(self.num_shards, self._cursors, busy, claim)
            if start.key() > self._cursors[shard].key():
                self._cursors[shard] = start
            self._holdings[session_id] = _Holding(shard, -1, now, False)
        return shard, start, reason

    def report(
        self, now: float, session_id: str, lease: int, next_shard: int, claim: Claim
    ) -> tuple[int, int]:
        """A heartbeat's data position: (lease, next shard) after it. A peer that moved on to its
        reserved shard holds that one now; a new reservation is made for a peer without one."""
        with self._lock:
            if 0 <= next_shard == claim.shard != lease:
                lease, next_shard = next_shard, -1
            if 0 <= lease == claim.shard < self.num_shards:
                self._move(now, lease, claim)
            if lease >= 0 and next_shard < 0:
                busy = self._busy(now, session_id)
                next_shard, _, _ = choose_shard(self.num_shards, self._cursors, busy, exclude=(lease,))
            self._holdings[session_id] = _Holding(lease, next_shard, now, False)
        return lease, next_shard

    def cursor(self, shard: int) -> Cursor:
        with self._lock:
            return self._cursors[shard] if 0 <= shard < self.num_shards else Cursor()

    def coverage(self) -> Coverage:
        with self._lock:
            return coverage_of(self._cursors)

    def _move(self, now: float, shard: int, claim: Claim) -> None:
        before = self._cursors[shard]
        after, note = advance(before, claim, max_sequences=max(1, self.shard_bytes[shard]))
        if note:
            logger.debug("shard %d: %s", shard, note)
        self._cursors[shard] = after
        due = now - self._written.get(shard, -1e18) >= WRITE_BEHIND_S or after.passes != before.passes
        if self.store is not None and after != before and due:
            self._written[shard] = now
            with self.store.transaction() as db:
                db.execute(
                    "INSERT OR REPLACE INTO shard_cursors (shard, passes, position, sequences) VALUES (?, ?, ?, ?)",
                    (shard, after.passes, after.position, after.sequences),
                )

    def flush(self) -> None:
        """Write every cursor now (at shutdown)."""
        if self.store is None:
            return
        with self._lock:
            rows = [
                (i, c.passes, c.position, c.sequences) for i, c in enumerate(self._cursors) if c != Cursor()
            ]
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO shard_cursors (shard, passes, position, sequences) VALUES (?, ?, ?, ?)",
                rows,
            )
