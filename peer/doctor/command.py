"""`crowdtrain doctor`: is this machine ready to join a run? One verdict per check, before joining.

    crowdtrain doctor                                   # this machine: torch, memory, disk
    crowdtrain doctor --coordinator 203.0.113.7:50051   # and the run: reachable, compatible, clock
    crowdtrain doctor --json                            # [{"name", "verdict", "detail", "next_step"}]

peer/doctor/measure.py measures, peer/doctor/verdicts.py judges (ok, warn, fail or skip, one line,
the next step); this module prints one aligned line per check (colored on a terminal, plain ASCII
otherwise, within 80 columns) and a summary. Exit status: 0 when no check failed (warnings and
skips allowed), 1 when one did, so `crowdtrain doctor --coordinator ADDR && crowdtrain peer
--coordinator ADDR` joins only from a machine that can.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap

from crowdtrain.peer import __version__
from crowdtrain.peer.doctor import measure
from crowdtrain.peer.doctor.verdicts import (
    VERDICTS,
    Check,
    ModelToFit,
    check_clock,
    check_compatible,
    check_coordinator,
    check_disk,
    check_memory,
    check_reachable,
    check_torch,
    preset_models,
    run_disk_needs,
)
from crowdtrain.peer.link.tls import ClientTls

LINE_COLUMNS = 80
NAME_COLUMNS = 11


def exit_status(checks: list[Check]) -> int:
    """0 when no check failed (warnings and skips allowed), 1 when one did."""
    return 1 if any(c.verdict == "fail" for c in checks) else 0


_COLORS = {"ok": "32", "warn": "33", "fail": "31", "skip": "2"}
_UNIT = re.compile(r"(\d) (GB|MB|kB|B|ms|s)\b")


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    """`text` in lines of at most `width` columns, the first after `first`, the others after `rest`;
    a number and its unit ("4.5 MB") stay on one line."""
    kept = _UNIT.sub("\\1\u00a0\\2", text)
    lines = textwrap.wrap(kept, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines] or [first.rstrip()]


def format_lines(checks: list[Check], *, tty: bool = False, columns: int = LINE_COLUMNS) -> list[str]:
    """Pure: one aligned line per check (wrapped under its detail when longer than `columns`), the
    next step under a warn or fail, and a summary. `tty`: the verdicts in color; otherwise plain
    ASCII only."""
    indent = " " * (4 + 2 + NAME_COLUMNS + 2)
    width = max(40, columns) - 1
    lines = []
    for c in checks:
        detail, step = (c.detail, c.next_step) if tty else (_ascii(c.detail), _ascii(c.next_step))
        wrapped = _wrap(detail, width, f"{c.verdict:<4}  {c.name:<{NAME_COLUMNS}}  ", indent)
        if tty:  # the verdict in color; wrapped without the escapes, which take no columns
            wrapped[0] = f"\033[{_COLORS[c.verdict]}m{c.verdict:<4}\033[0m" + wrapped[0][4:]
        lines += wrapped
        if step and c.verdict in ("warn", "fail"):
            lines += _wrap(step, width, indent + "next: ", indent + "  ")
    counts = ", ".join(f"{sum(c.verdict == v for c in checks)} {v}" for v in VERDICTS)
    ready = "not ready: fix what failed above" if exit_status(checks) else "ready to join"
    lines.append(f"{ready} ({counts}; exit status {exit_status(checks)})")
    return lines


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


def checks_json(checks: list[Check]) -> list[dict]:
    """`--json`: one object per check, with stable keys."""
    return [dataclasses.asdict(c) for c in checks]


def run_doctor(config) -> int:
    """`crowdtrain doctor` (config: settings.commands.DoctorConfig): measure, judge, print; the
    exit status (`exit_status`)."""
    import platform

    tls = ClientTls.from_flags(config.tls, config.tls_ca)
    facts = measure.probe_coordinator(config.coordinator, tls) if config.coordinator else None
    manifest = facts.manifest if facts is not None else None
    run_model = needs = None
    if manifest is not None:
        swarm = manifest.swarm
        label = f"the run's {manifest.preset} model"
        run_model = ModelToFit(label, manifest.model.num_parameters, swarm.mode, swarm.overlap_communication)
        needs = run_disk_needs(manifest, facts.checkpoint_bytes)
    torch_facts = measure.gather_torch()
    ram, device = measure.gather_memory(torch_facts, config.gpu)
    checks = [
        check_torch(torch_facts, config.gpu),
        check_memory(ram, device, preset_models(), run_model),
        check_disk(measure.gather_disk(config.cache_dir, manifest.run_id if manifest else None), needs),
        check_coordinator(facts),
        check_compatible(facts, __version__),
        check_reachable(measure.global_addresses()),
        check_clock(facts),
    ]
    if config.json:
        print(json.dumps(checks_json(checks), indent=2))
        return exit_status(checks)
    tty = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    columns = min(LINE_COLUMNS, shutil.get_terminal_size((LINE_COLUMNS, 24)).columns) if tty else LINE_COLUMNS
    print(
        f"crowdtrain {__version__} doctor on {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )
    print("\n".join(format_lines(checks, tty=tty, columns=columns)))
    return exit_status(checks)
