"""When a volunteer's peer pauses: a training schedule, a machine busy with its owner's work, a
battery, or SIGUSR1 (until SIGUSR2).

The core is pure: `parse_schedule` validates `--schedule`, and `decide(now, observations, settings,
state)` returns `(Decision(paused, reason), new_state)` with a busy hysteresis (pause only after other
processes kept the machine busy for `busy_pause_after_s`, resume only after they stayed below the
threshold for `busy_resume_after_s`). `SystemSampler` (below) measures
the machine, and `PauseMonitor` is the thin shell: a daemon thread that samples every `poll_s`.
Importing this module is cheap (no torch, no psutil until the first sample).

    settings = PauseSettings.from_peer_config(config)
    with PauseMonitor(settings) as monitor:
        install_pause_signals(monitor)           # main thread: SIGUSR1 pauses, SIGUSR2 resumes
        while not stop.is_set():
            if monitor.decision.paused and not monitor.wait_until_resumed(stop):
                break                            # stop was set while paused
            train_one_step()

Measuring a volunteer's machine: other processes' CPU load, the battery, the GPU.

`SystemSampler()` is called every few seconds; each call returns a `Reading` (None: unknown). CPU load
is the share of all cores that processes outside this peer's process tree used since the previous call
(the first call only takes the baseline). psutil is imported at the first call, not at import.

    sampler = SystemSampler()
    sampler()                       # baseline: cpu_busy_pct is None
    reading = sampler(measure_gpu=False)
    reading.cpu_busy_pct            # e.g. 87.0: others kept 87% of all cores busy
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

MAX_WINDOWS = 16
MAX_SCHEDULE_CHARS = 1000
MANUAL_REASON = "paused by SIGUSR1 (send SIGUSR2 to resume)"
CTL_PAUSE_REASON = "paused by `crowdtrain ctl pause` (`crowdtrain ctl resume` resumes)"
FINISHED_ROUND_REASON = (
    "paused after finishing its round by `crowdtrain ctl finish-and-pause` (`crowdtrain ctl resume` resumes)"
)
_EXAMPLE = "e.g. --schedule 22:00-08:00 or --schedule 09:00-12:00,13:00-17:00"
_WINDOW = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_DAY_S = 24 * 3600


class PauseConfigError(CrowdtrainError, ValueError):
    """A pause setting (--schedule, --pause-when-busy) is malformed or out of range."""


class ScheduleError(PauseConfigError):
    """`--schedule` is malformed: the message names the bad part and shows a correct example."""


@dataclass(frozen=True)
class Window:
    """A daily local-time window [start, end); it wraps midnight when end < start."""

    start_min: int
    end_min: int

    def __str__(self) -> str:
        return f"{_hhmm(self.start_min)}-{_hhmm(self.end_min)}"

    def contains(self, second_of_day: float) -> bool:
        start_s, end_s = self.start_min * 60, self.end_min * 60
        if start_s < end_s:
            return start_s <= second_of_day < end_s
        return second_of_day >= start_s or second_of_day < end_s


def _hhmm(minute_of_day: int) -> str:
    return f"{minute_of_day // 60:02d}:{minute_of_day % 60:02d}"


def _shown(part: str) -> str:
    """A window as quoted in an error: bounded, so a hostile value is not echoed back whole."""
    return repr(part if len(part) <= 40 else part[:40] + "...") if part else "'' (empty, between commas)"


def _minutes(hours: str, minutes: str, part: str) -> int:
    if int(hours) > 23:
        raise ScheduleError(f"--schedule window {part!r}: hour {hours} is not 00-23; {_EXAMPLE}")
    if int(minutes) > 59:
        raise ScheduleError(f"--schedule window {part!r}: minute {minutes} is not 00-59; {_EXAMPLE}")
    return int(hours) * 60 + int(minutes)


def parse_schedule(text: str) -> tuple[Window, ...]:
    """'22:00-08:00' or '09:00-12:00,13:00-17:00' (local time, HH:MM) -> windows; '' -> () (always)."""
    if not isinstance(text, str):
        raise ScheduleError(f"--schedule must be text, not {type(text).__name__}; {_EXAMPLE}")
    if len(text) > MAX_SCHEDULE_CHARS:
        raise ScheduleError(
            f"--schedule is {len(text)} characters long (at most {MAX_SCHEDULE_CHARS}); {_EXAMPLE}"
        )
    if not text.strip():
        return ()
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_WINDOWS:
        raise ScheduleError(f"--schedule has {len(parts)} windows (at most {MAX_WINDOWS}); {_EXAMPLE}")
    windows = []
    for part in parts:
        match = _WINDOW.fullmatch(part)
        if match is None:
            raise ScheduleError(
                f"--schedule window {_shown(part)} is not START-END in 24-hour HH:MM local time; {_EXAMPLE}"
            )
        start = _minutes(match[1], match[2], part)
        end = _minutes(match[3], match[4], part)
        if start == end:
            raise ScheduleError(
                f"--schedule window {part!r} starts and ends at the same time (zero length); "
                f"leave --schedule empty to train at any time, or {_EXAMPLE}"
            )
        windows.append(Window(start, end))
    return tuple(windows)


def _second_of_day(local_time: datetime.time) -> float:
    return local_time.hour * 3600 + local_time.minute * 60 + local_time.second + local_time.microsecond / 1e6


def in_schedule(windows: tuple[Window, ...], local_time: datetime.time) -> bool:
    """Whether `local_time` falls in one of the windows; no windows means always."""
    now_s = _second_of_day(local_time)
    return not windows or any(window.contains(now_s) for window in windows)


def next_start(windows: tuple[Window, ...], local_time: datetime.time) -> Window:
    """The window that opens next after `local_time` (windows must not be empty)."""
    now_s = _second_of_day(local_time)
    return min(windows, key=lambda window: (window.start_min * 60 - now_s) % _DAY_S)


def format_schedule(windows: tuple[Window, ...]) -> str:
    return ",".join(str(window) for window in windows)


@dataclass(frozen=True)
class PauseSettings:
    """When to pause. `busy_threshold_pct` 0 never pauses for load; an empty schedule means always."""

    schedule: tuple[Window, ...] = ()
    busy_threshold_pct: float = 0.0
    pause_on_battery: bool = False
    busy_pause_after_s: float = 10.0
    busy_resume_after_s: float = 60.0
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, tuple) or not all(isinstance(w, Window) for w in self.schedule):
            raise PauseConfigError("PauseSettings.schedule takes parse_schedule(text)'s windows, not text")
        pct = self.busy_threshold_pct
        if not isinstance(pct, (int, float)) or not math.isfinite(pct) or not 0 <= pct <= 100:
            raise PauseConfigError(
                f"--pause-when-busy {pct!r} is not a percent from 0 to 100; e.g. --pause-when-busy 50 "
                "pauses while other processes use more than half the CPU (0: never pause for load)"
            )
        for name in ("busy_pause_after_s", "busy_resume_after_s", "poll_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise PauseConfigError(
                    f"pause setting {name}={value!r} must be a finite number of seconds >= 0"
                )
        if self.poll_s <= 0:
            raise PauseConfigError(f"pause setting poll_s={self.poll_s!r} must be above 0 seconds, e.g. 2")

    @property
    def enabled(self) -> bool:
        """Whether anything automatic can pause the peer (SIGUSR1 works either way)."""
        return bool(self.schedule) or self.busy_threshold_pct > 0 or self.pause_on_battery

    @classmethod
    def from_peer_config(cls, config, **overrides) -> PauseSettings:
        """From `PeerConfig.schedule`, `.pause_when_busy` and `.pause_on_battery`; `overrides` set the
        other fields (e.g. poll_s)."""
        return cls(
            schedule=parse_schedule(config.schedule),
            busy_threshold_pct=config.pause_when_busy,
            pause_on_battery=bool(config.pause_on_battery),
            **overrides,
        )


@dataclass(frozen=True)
class Observations:
    """What the machine looks like now; None means unknown (unknown load never pauses)."""

    local_time: datetime.time
    manual_pause: bool = False
    cpu_busy_pct: float | None = None
    gpu_busy_pct: float | None = None
    on_battery: bool | None = None


@dataclass(frozen=True)
class Decision:
    paused: bool
    reason: str


@dataclass(frozen=True)
class PauseState:
    """The busy hysteresis: whether load paused us, and since when the load has been on the other side
    of the threshold (above while running, below while paused; None when it is not)."""

    busy_paused: bool = False
    crossed_at: float | None = None


def _load(obs: Observations) -> tuple[float, str] | None:
    """The busier of CPU and GPU as (percent, 'CPU' or 'GPU'); None when neither is known."""
    known = []
    for value, what in ((obs.cpu_busy_pct, "CPU"), (obs.gpu_busy_pct, "GPU")):
        if isinstance(value, (int, float)) and math.isfinite(value):
            known.append((min(100.0, max(0.0, float(value))), what))
    return max(known, default=None)


def decide_busy(
    now: float, obs: Observations, settings: PauseSettings, state: PauseState
) -> tuple[Decision, PauseState]:
    """The busy part alone: (Decision, new state) with the hysteresis of `settings`."""
    threshold = settings.busy_threshold_pct
    if threshold <= 0:
        return Decision(False, "running"), PauseState()
    load = _load(obs)
    above = load is not None and load[0] > threshold
    crossed = state.busy_paused != above  # load is on the other side of where our state says
    since = (state.crossed_at if state.crossed_at is not None else now) if crossed else None
    held_s = max(0.0, now - since) if since is not None else 0.0
    if above:
        busy = f"other processes use {load[0]:.0f}% of the {load[1]} (threshold {threshold:g}%)"
    if not state.busy_paused:
        if not above:
            return Decision(False, "running"), PauseState()
        if held_s >= settings.busy_pause_after_s:
            return Decision(True, busy), PauseState(True, None)
        wait = f"pausing if it lasts {settings.busy_pause_after_s:g} s"
        return Decision(False, f"running; {busy} for {held_s:.0f} s, {wait}"), PauseState(False, since)
    if above:
        return Decision(True, busy), PauseState(True, None)
    if held_s >= settings.busy_resume_after_s:
        return Decision(False, "running"), PauseState()
    now_text = f"{load[0]:.0f}% {load[1]}" if load is not None else "load unknown"
    left_s = settings.busy_resume_after_s - held_s
    reason = (
        f"other processes kept the machine busy; resuming once they stay below {threshold:g}% for "
        f"{settings.busy_resume_after_s:g} s (now {now_text}, {left_s:.0f} s to go)"
    )
    return Decision(True, reason), PauseState(True, since)


def decide(
    now: float, obs: Observations, settings: PauseSettings, state: PauseState
) -> tuple[Decision, PauseState]:
    """Pure: whether to pause at monotonic time `now`, why, and the next state. Precedence of the
    reason shown: manual > battery > schedule > busy. The busy hysteresis advances in every case, so
    the load's history is right when a higher-precedence reason ends."""
    busy, new_state = decide_busy(now, obs, settings, state)
    if obs.manual_pause:
        return Decision(True, MANUAL_REASON), new_state
    if settings.pause_on_battery and obs.on_battery is True:
        return Decision(True, "on battery"), new_state
    if not in_schedule(settings.schedule, obs.local_time):
        opens = next_start(settings.schedule, obs.local_time)
        reason = (
            f"outside schedule {format_schedule(settings.schedule)} (resumes at {_hhmm(opens.start_min)})"
        )
        return Decision(True, reason), new_state
    return busy, new_state


def round_finished(asked_at_epoch: int | None, local_epoch: int) -> bool:
    """Pure: whether a `finish-and-pause` asked at `asked_at_epoch` is due: the round it was asked
    in turned (the swarm took this peer's samples and its epoch moved on). None: nothing asked."""
    return asked_at_epoch is not None and local_epoch > asked_at_epoch


def _local_time_now() -> datetime.time:
    return datetime.datetime.now().time()


class PauseMonitor:
    """The shell around `decide`: a daemon thread samples every `settings.poll_s`; `pause(reason)`
    and `resume()` (signal-handler safe) set a manual pause that overrides everything; `update()`
    takes new settings while it runs (`crowdtrain ctl set`, SIGHUP)."""

    def __init__(
        self,
        settings: PauseSettings,
        clock: Callable[[], float] = time.monotonic,
        sampler: Callable[[bool], Reading] | None = None,
        local_time: Callable[[], datetime.time] = _local_time_now,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._sampler = sampler if sampler is not None else SystemSampler()
        self._local_time = local_time
        self._manual = ""  # the manual pause's reason; "" when none
        self._state = PauseState()
        self._step_lock = threading.Lock()  # _step from the monitor's thread and from update()
        self._auto = Decision(False, "running")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_paused = False

    @property
    def decision(self) -> Decision:
        """The current decision; a manual pause shows at once, the rest within `poll_s`."""
        manual = self._manual
        return Decision(True, manual) if manual else self._auto

    @property
    def manual(self) -> bool:
        """Whether a manual pause (SIGUSR1, `crowdtrain ctl`) holds, whatever the automatic rules say."""
        return bool(self._manual)

    def pause(self, reason: str = MANUAL_REASON) -> None:
        self._manual = reason  # one assignment only: this runs in signal handlers

    def resume(self) -> None:
        self._manual = ""

    def update(self, settings: PauseSettings) -> None:
        """Decide from now on by `settings` (checked when built); the decision is taken again at once."""
        self.settings = settings
        if self._thread is not None and not self._stop.is_set():
            self._step()

    def start(self) -> PauseMonitor:
        if self._stop.is_set():
            raise RuntimeError("this PauseMonitor was shut down; create a new one to start again")
        if self._thread is None:
            self._step()
            self._thread = threading.Thread(target=self._run, name="crowdtrain-pause", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.settings.poll_s))

    def __enter__(self) -> PauseMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _step(self) -> None:
        with self._step_lock:
            self._step_locked()

    def _step_locked(self) -> None:
        try:
            wanted = self.settings.busy_threshold_pct > 0 or self.settings.pause_on_battery
            reading = self._sampler(self.decision.paused) if wanted else Reading()
        except Exception:  # a broken sampler must not stop the monitor: nothing is known this round
            logger.exception("sampling the machine's load failed")
            reading = Reading()
        obs = Observations(
            self._local_time(), False, reading.cpu_busy_pct, reading.gpu_busy_pct, reading.on_battery
        )
        self._auto, self._state = decide(self._clock(), obs, self.settings, self._state)
        paused = self.decision.paused
        if paused != self._logged_paused:
            self._logged_paused = paused
            logger.info("%s: %s", "pausing training" if paused else "resuming training", self.decision.reason)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            self._step()

    def wait_until_resumed(self, stop_event: threading.Event, timeout_s: float | None = None) -> bool:
        """Block while paused: True once running, False when `stop_event` is set or `timeout_s` passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not stop_event.is_set():
            if not self.decision.paused:
                return True
            left_s = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left_s <= 0:
                return False
            stop_event.wait(left_s)
        return False


def install_pause_signals(monitor: PauseMonitor) -> Callable[[], None]:
    """SIGUSR1 pauses `monitor`, SIGUSR2 resumes it. Call from the main thread, before hivemind forks
    (forked children inherit the handlers instead of dying on a stray SIGUSR1). Returns a function
    that puts the previous handlers back. A no-op (logged) where these signals do not exist."""
    usr1, usr2 = getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)
    if usr1 is None or usr2 is None:
        logger.info("this platform has no SIGUSR1/SIGUSR2: pausing by signal is unavailable")
        return lambda: None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_pause_signals must be called from the main thread (Python's signal rule)")
    previous = {usr1: signal.getsignal(usr1), usr2: signal.getsignal(usr2)}
    signal.signal(usr1, lambda signum, frame: monitor.pause())
    signal.signal(usr2, lambda signum, frame: monitor.resume())

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    return restore


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
