"""Leaving the swarm in order: hivemind's background work ends before its processes do, so a peer
that stops prints no tracebacks or "Task was destroyed but it is pending!", and the others learn at
once that it left. Each use of a hivemind internal is listed in docs/hivemind.md."""

from __future__ import annotations

import logging
import time

from hivemind.averaging.control import AveragingStage
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

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
