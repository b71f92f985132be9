"""Measuring a volunteer's machine for peer/pause.py: other processes' CPU load, the battery, the GPU.

`SystemSampler()` is called every few seconds; each call returns a `Reading` (None: unknown). CPU load
is the share of all cores that processes outside this peer's process tree used since the previous call
(the first call only takes the baseline). psutil is imported at the first call, not at import.

    sampler = SystemSampler()
    sampler()                       # baseline: cpu_busy_pct is None
    reading = sampler(measure_gpu=False)
    reading.cpu_busy_pct            # e.g. 87.0: others kept 87% of all cores busy
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One sample of the machine (None: unknown)."""

    cpu_busy_pct: float | None = None
    gpu_busy_pct: float | None = None
    on_battery: bool | None = None


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


@dataclass(frozen=True)
class _CpuSnapshot:
    taken_at_epoch_s: float
    busy_s: float
    total_s: float
    ours_s: dict  # (pid, create_time) -> user + system CPU seconds of one process in our tree


def _busy_and_total_s(times) -> tuple[float, float]:
    """All cores' busy and total CPU seconds since boot (Linux counts guest time inside user time)."""
    fields = times._asdict()
    total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
    return total - fields.get("idle", 0.0) - fields.get("iowait", 0.0), total


class SystemSampler:
    """Measures the machine for `decide`: other processes' CPU busy percent of all cores between two
    calls (the system's busy time minus that of process `pid` and all its descendants: hivemind's
    averagers and p2pd), the battery (psutil), and the GPU's utilization via torch.cuda.utilization
    (NVML), only where this process already initialized CUDA and only when asked (see PauseMonitor)."""

    def __init__(self, pid: int | None = None, gpu_index: int | None = None) -> None:
        self._pid = os.getpid() if pid is None else pid
        self._gpu_index = gpu_index  # None: torch's current CUDA device
        self._previous: _CpuSnapshot | None = None
        self._gpu_broken = False
        self._warned: set[str] = set()

    def __call__(self, measure_gpu: bool = False) -> Reading:
        gpu = self.gpu_busy_pct() if measure_gpu else None
        return Reading(self.cpu_busy_pct(), gpu, self.on_battery())

    def _warn_once(self, what: str, error: BaseException | str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("cannot measure %s (%s); the peer will not pause for it meanwhile", what, error)

    def _snapshot(self, psutil) -> _CpuSnapshot:
        busy_s, total_s = _busy_and_total_s(psutil.cpu_times())
        root = psutil.Process(self._pid)
        ours = {}
        for process in [root, *root.children(recursive=True)]:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    ours[(process.pid, process.create_time())] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return _CpuSnapshot(time.time(), busy_s, total_s, ours)

    def cpu_busy_pct(self) -> float | None:
        """Other processes' share of all cores since the previous call, 0-100; None on the first call."""
        psutil = _psutil()
        if psutil is None:
            self._warn_once("the CPU load", "psutil is not installed: pip install psutil")
            return None
        try:
            snapshot = self._snapshot(psutil)
        except (psutil.Error, OSError) as error:
            self._warn_once("the CPU load", error)
            return None
        previous, self._previous = self._previous, snapshot
        if previous is None or snapshot.total_s - previous.total_s <= 0:
            return None
        ours_s = 0.0
        for key, seconds in snapshot.ours_s.items():
            # a process new to our tree counts from 0 when it started after the previous sample
            born_since = key[1] >= previous.taken_at_epoch_s
            ours_s += max(0.0, seconds - previous.ours_s.get(key, 0.0 if born_since else seconds))
        others_s = snapshot.busy_s - previous.busy_s - ours_s
        return min(100.0, max(0.0, 100.0 * others_s / (snapshot.total_s - previous.total_s)))

    def on_battery(self) -> bool | None:
        psutil = _psutil()
        sensors = getattr(psutil, "sensors_battery", None)
        if sensors is None:
            return None
        try:
            battery = sensors()
        except Exception as error:  # psutil raises platform-specific errors here
            self._warn_once("the battery", error)
            return None
        if battery is None:
            return False  # no battery: never on battery
        plugged = battery.power_plugged
        return None if plugged is None else not plugged

    def gpu_busy_pct(self) -> float | None:
        """torch.cuda.utilization() includes our own kernels: the monitor asks only while paused."""
        torch = sys.modules.get("torch")
        if self._gpu_broken or torch is None or not torch.cuda.is_initialized():
            return None  # never initialize CUDA ourselves (hivemind forks after us)
        try:
            value = float(torch.cuda.utilization(self._gpu_index))
        except Exception as error:  # pynvml missing, NVML or driver errors: their types vary
            self._gpu_broken = True
            self._warn_once("the GPU's load", error)
            return None
        return value if math.isfinite(value) else None
