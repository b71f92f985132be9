"""Process hygiene for whoever runs hivemind: the fork start method, no orphans after kill -9, and
signal handlers that stop the parent, not its forked children.

hivemind 1.1.12 forks its DHT and averager processes (the DHT's starts the p2pd daemon); volunteers
and the coordinator both call these once, early, before any hivemind object exists.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from pathlib import Path

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
