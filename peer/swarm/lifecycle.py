"""A hivemind peer's life: its processes, leaving the swarm in order, and finding the
coordinator's DHT node again after it restarted. hivemind is imported only inside the functions
that need it: the process set-up runs before any hivemind import.

Processes: the fork start method, no orphans after kill -9, and signal handlers that stop the
parent, not its forked children. hivemind 1.1.12 forks its DHT and averager processes (the DHT's
starts the p2pd daemon); volunteers and the coordinator both call these once, early, before any
hivemind object exists.

Leaving: hivemind's background work ends before its processes do, so a peer that stops prints no
tracebacks or "Task was destroyed but it is pending!", and the others learn at once that it left.
Each use of a hivemind internal is listed in docs/hivemind.md.

Rejoining: hivemind drops a peer from the routing table once it stops answering; after the
coordinator restarts (same identity and address, empty memory) neither side would otherwise look
for the other, and the swarm would split from the coordinator's publisher and monitor. When
heartbeats reach the coordinator again, the peer pings its bootstrap node(s) from a background
thread (never the heartbeat thread: a ping can take seconds), retrying while none answers.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from crowdtrain.peer.events import emit

if TYPE_CHECKING:
    from hivemind.optim.progress_tracker import ProgressTracker

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_tied = False


def _kill_own_children() -> None:
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def tie_children_to_this_process() -> None:
    """Make every process forked from here die with us, even when we are killed with SIGKILL.

    hivemind's DHT and averagers are forked Python processes, and the DHT process starts the p2pd
    daemon; none of them notices when our process is killed with `kill -9` (or the OOM killer), so
    they would run on as orphans, p2pd still listening. After each fork the child asks the kernel
    for SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG); its SIGTERM handler kills its own
    children (p2pd) and exits. Call once, early, in the process that owns the swarm. No-op off Linux.
    """
    global _tied
    if _tied or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def on_parent_death(signum, frame):
        _kill_own_children()
        os._exit(128 + signum)

    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_parent_death)
        if os.getppid() != forking[0]:  # the parent died before prctl took effect
            on_parent_death(signal.SIGTERM, None)

    # note: the kernel sends the signal when the forking *thread* exits; hivemind forks its DHT and
    # averagers from the main thread (it must: see make_optimizer), which lives as long as we do
    os.register_at_fork(before=before, after_in_child=in_child)
    _tied = True


def use_fork_start_method() -> None:
    """hivemind's averager is an mp.Process that cannot be pickled: only 'fork' works."""
    mp.set_start_method("fork", force=True)


def stop_on_signals(stop_event: threading.Event, what_next: str) -> None:
    """SIGINT and SIGTERM set `stop_event` (logging "received SIG..., <what_next>"); a second one
    raises KeyboardInterrupt (stop waiting for a clean exit). In a hivemind child forked from this
    process the handler does not stop the parent's work: Ctrl+C in a terminal sends SIGINT to the
    whole process group, which the child ignores (the parent shuts its children down in order),
    and SIGTERM, which hivemind itself sends a child that did not stop in time, is obeyed."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if stop_event.is_set():
            raise KeyboardInterrupt
        logger.info("received %s, %s", signal.Signals(signum).name, what_next)
        stop_event.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


logger = logging.getLogger(__name__)


def leave_swarm(opt, dht, timeout_s: float = 10.0) -> None:
    """Stop the optimizer, then the DHT, so that hivemind's background work ends before its
    processes do: no tracebacks, no "Task was destroyed but it is pending!", and the others learn
    at once that we left. Either argument may be None (start-up failed before it existed).

    hivemind 1.1.12's `Optimizer.shutdown()` cancels a round looking for a group, finishes delayed
    updates and stops the averagers at once: a DHT request an averager sent then is lost with a
    FileNotFoundError and a 3 s stall. So those steps run here first, averagers stopped last.
    """
    try:
        if opt is not None:
            try:
                _let_the_averagers_finish(opt, timeout_s)
            finally:  # whatever happened, stop hivemind's processes
                try:
                    opt.shutdown()  # what is left: tag along with a running round, stop the averagers
                    opt.tracker.join(timeout_s)  # _TidyProgressTracker: its event loop closes
                    _say_goodbye(opt.tracker, opt.dht, timeout_s)
                finally:
                    _stop_averagers(opt)
    finally:
        if dht is not None:
            dht.shutdown()


def _stop_averagers(opt) -> None:
    """Stop the averager processes that `opt.shutdown()` left running because it failed midway: a
    live averager keeps its background thread in this process, and an interpreter exiting under it
    aborts ("terminate called without an active exception"). Once they are stopped, the optimizer's
    `__del__` does not run its shutdown a second time on a closed DHT."""
    for averager in (opt.state_averager, getattr(opt, "grad_averager", None)):
        if averager is not None and averager.is_alive():
            averager.shutdown()


def _let_the_averagers_finish(opt, timeout_s: float) -> None:
    """The first steps of hivemind's Optimizer.shutdown(), then a wait until the DHT has received
    what the averagers sent in response (they react asynchronously)."""
    _cancel_rounds_looking_for_group(opt, timeout_s)
    opt.tracker.shutdown(timeout_s)
    opt.state_averager.step(wait_for_delayed_updates=True)
    time.sleep(0.25)  # an averager that just let go of a round tells the DHT a few moments later
    _dht_barrier(opt.dht, timeout_s)


def _cancel_rounds_looking_for_group(opt, timeout_s: float) -> None:
    """Cancel the averaging rounds hivemind scheduled ahead that found no group yet (as
    `Optimizer.shutdown()` would) and wait until the averagers have let go of them.
    hivemind 1.1.12: `Optimizer.scheduled_grads` / `scheduled_state` hold those rounds."""
    from hivemind.averaging.control import AveragingStage

    rounds = [
        r
        for r in (opt.scheduled_grads, opt.scheduled_state)
        if r is not None and r.stage == AveragingStage.LOOKING_FOR_GROUP
    ]
    for r in rounds:
        r.cancel()
    deadline = time.monotonic() + timeout_s
    while any(r.stage != AveragingStage.FINISHED for r in rounds) and time.monotonic() < deadline:
        time.sleep(0.05)
    # cancelled once is enough: hivemind's shutdown() cancels a round it still sees looking for a group
    # again, and a second cancel raises InvalidStateError (its cancel future is already set)
    if opt.scheduled_grads in rounds:
        opt.scheduled_grads = None
    if opt.scheduled_state in rounds:
        opt.scheduled_state = None


async def _nothing(_dht, _node) -> None:
    return None


def _dht_barrier(dht, timeout_s: float) -> None:
    """Return once the DHT process has read every request sent to it before this call (all
    processes write to one pipe, read in order)."""
    try:
        dht.run_coroutine(_nothing, return_future=True).result(timeout=timeout_s)
    except Exception as e:  # a DHT that is already gone: nothing left to wait for
        logger.debug("DHT barrier: %r", e)


def _say_goodbye(tracker: ProgressTracker, dht, timeout_s: float) -> None:
    """Clear our progress record and wait until it is stored, so the swarm stops counting us now.
    hivemind 1.1.12's `ProgressTracker.shutdown()` sends the same `None` but does not wait, and a
    DHT shut down right after drops it; the record is signed under `tracker._local_public_key`."""
    from hivemind.utils import get_dht_time

    try:
        dht.store(
            tracker.training_progress_key,
            subkey=tracker._local_public_key,
            value=None,
            expiration_time=get_dht_time() + tracker.metadata_expiration,
            return_future=True,
        ).result(timeout=timeout_s)
    except Exception as e:  # leaving anyway; the record expires by itself
        logger.debug("could not clear our progress record: %r", e)


logger = logging.getLogger(__name__)


def rejoin_bootstrap_peers(
    dht,
    initial_peers: Sequence[str],
    *,
    attempts: int = 4,
    retry_s: float = 5.0,
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
) -> int:
    """Ping the bootstrap node(s) until at least one answers (`attempts` tries, `retry_s` apart);
    returns how many answered the last try and logs the `swarm_rejoined` event."""
    if dht is None or not initial_peers:
        return 0
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    stop = stop or threading.Event()
    peer_ids = list({PeerID.from_base58(Multiaddr(m)["p2p"]) for m in initial_peers})
    answered = 0
    for attempt in range(1, attempts + 1):
        try:
            future = dht.run_coroutine(partial(_ping_all, peer_ids), return_future=True)
            answered = future.result(timeout=timeout_s)
        except Exception as e:  # the DHT is shutting down, or the ping timed out
            logger.info("pinging the bootstrap peers failed (%r), try %d/%d", e, attempt, attempts)
            answered = 0
        if answered or attempt == attempts or stop.wait(retry_s):
            break
    emit(
        logger,
        "swarm_rejoined",
        "re-joined the swarm through %d of %d bootstrap peer(s)",
        answered,
        len(peer_ids),
        reached=answered,
        bootstrap_peers=len(peer_ids),
    )
    return answered


def rejoin_in_background(dht, initial_peers: Sequence[str]) -> threading.Thread:
    """`rejoin_bootstrap_peers` on a daemon thread (a failure is logged, never raised)."""

    def run() -> None:
        try:
            rejoin_bootstrap_peers(dht, initial_peers)
        except Exception as e:
            logger.warning("could not re-join the coordinator's DHT node: %r", e)

    thread = threading.Thread(target=run, name="dht-rejoin", daemon=True)
    thread.start()
    return thread


async def _ping_all(peer_ids, _dht, node) -> int:
    """Runs inside hivemind's DHT process (so it must be a picklable module-level function).
    hivemind 1.1.12: `DHTNode.protocol.call_ping` is how a node (re)adds a peer to its routing table;
    DHT has no public "ping" or "add peer" call."""
    results = await asyncio.gather(*(node.protocol.call_ping(p) for p in peer_ids), return_exceptions=True)
    return sum(1 for r in results if r is not None and not isinstance(r, BaseException))
