"""Helpers for the harnesses, benchmarks and tests that drive real `crowdtrain` processes.

They read the processes' progress events (`--log-format json`, see crowdtrain.peer.events), never
their human log text. Starting and stopping processes is crowdtrain.coordinator.demo's `spawn` and
`stop_children` (the demo needs them too); what only harnesses need lives here, outside the wheel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from crowdtrain.coordinator.demo import Child


def add_swarm_option(parser) -> None:
    """`--swarm KEY=VALUE ...`: a harness's run settings, passed to `crowdtrain coordinator --swarm`."""
    parser.add_argument(
        "--swarm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="the run's swarm settings, e.g. mode=diloco",
    )


def events_named(child: Child, event: str, start: int = 0) -> list[dict]:
    """`child`'s `event` events so far, from index `start` of child.events."""
    return [e for e in child.events[start:] if e["event"] == event]


def rounds_together(a: Child, b: Child) -> dict[int, bool]:
    """For each epoch both peers logged: whether the gradient round that ended it put them in the
    same group (the `group` fingerprint of their epoch events; a round with no partner or a failed
    one leaves a peer alone, and its model then differs until the next state averaging)."""
    groups = [
        {e["epoch"]: (e["group"], e["averaged_with"]) for e in events_named(c, "epoch")} for c in (a, b)
    ]
    return {
        epoch: groups[0][epoch] == groups[1][epoch] and groups[0][epoch][1] >= 2
        for epoch in sorted(groups[0].keys() & groups[1].keys())
    }


def index_after(child: Child, event: dict) -> int:
    """The index in child.events just after `event` (one that wait_for_event returned)."""
    return next(i for i, e in enumerate(child.events) if e is event) + 1


def any_event(event: dict) -> bool:
    """The default condition of wait_for_event: any event of the name."""
    return True


def wait_for_event(
    child: Child, event: str, timeout_s: float, start: int = 0, where: Callable[[dict], bool] = any_event
) -> dict:
    """The first `event` event of `child` from index `start` of child.events for which `where` holds;
    waits up to `timeout_s` for it. TimeoutError (with the last lines of output) if none comes, or
    at once if the process exited without it."""
    deadline = time.monotonic() + timeout_s
    seen = start
    while True:
        exited = child.proc.poll() is not None
        if exited and child.reader is not None:
            child.reader.join(timeout=10)  # everything it printed before exiting is read
        events = child.events
        for e in events[seen:]:
            if e["event"] == event and where(e):
                return e
        seen = max(seen, len(events))
        if exited or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    wanted = f"{event!r} event" + ("" if where is any_event else " matching the condition")
    if exited:
        what = f"{child.name} exited with {child.proc.returncode}, no {wanted} logged"
    else:
        what = f"{child.name} logged no {wanted} in {timeout_s:.0f}s"
    tail = "\n".join(child.lines[-30:])
    raise TimeoutError(f"{what}; last lines:\n{tail}")


def processes_in_groups(pgids: set[int]) -> list[tuple[int, str]]:
    """(pid, command) of every live process whose process group is in `pgids`."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            found.append((int(proc_dir.name), command))
    return found
