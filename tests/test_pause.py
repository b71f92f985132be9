"""Pausing a volunteer's peer (peer/machine/pause.py, peer/machine/pause.py): the schedule's parsing, the pure
decision with an injected clock, and two real checks: a CPU load from processes outside our tree
pauses a monitor, and SIGUSR1/SIGUSR2 pause and resume one."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.machine.pause import (
    MANUAL_REASON,
    Decision,
    Observations,
    PauseConfigError,
    PauseMonitor,
    PauseSettings,
    PauseState,
    Reading,
    ScheduleError,
    SystemSampler,
    Window,
    decide,
    in_schedule,
    install_pause_signals,
    parse_schedule,
)
from crowdtrain.peer.settings.commands import PeerConfig

NOON = datetime.time(12, 0)


def at(hhmm: str) -> datetime.time:
    return datetime.time.fromisoformat(hhmm)


# --- the schedule -------------------------------------------------------------------------------


def test_a_window_wrapping_midnight_covers_the_night_and_not_the_day():
    windows = parse_schedule("22:00-08:00")
    assert windows == (Window(22 * 60, 8 * 60),)
    assert [in_schedule(windows, at(t)) for t in ("22:00", "23:59:59", "00:00", "07:59:59")] == [True] * 4
    assert [in_schedule(windows, at(t)) for t in ("08:00", "12:00", "21:59:59")] == [False] * 3


def test_several_windows_and_spaces_around_them():
    windows = parse_schedule(" 09:00-12:00 , 13:00-17:30 ")
    assert [str(w) for w in windows] == ["09:00-12:00", "13:00-17:30"]
    assert in_schedule(windows, at("09:00")) and in_schedule(windows, at("17:29"))
    assert not in_schedule(windows, at("12:30")) and not in_schedule(windows, at("17:30"))
    assert not in_schedule(windows, at("08:59:59"))


def test_an_empty_schedule_means_always():
    assert parse_schedule("") == () and parse_schedule("   ") == ()
    assert in_schedule((), at("03:00"))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("25:00-08:00", "hour 25"),
        ("22:00-08:60", "minute 60"),
        ("9:00-17:00", "'9:00-17:00'"),
        ("22:00", "'22:00'"),
        ("22:00-", "'22:00-'"),
        ("10pm-8am", "'10pm-8am'"),
        ("22.00-08.00", "'22.00-08.00'"),
        ("\u0661\u0662:00-08:00", "'\u0661\u0662:00-08:00'"),  # Arabic-Indic digits are not HH
        ("10:00-10:00", "zero length"),
        ("09:00-12:00,,13:00-17:00", "empty, between commas"),
        ("09:00-12:00,", "empty, between commas"),
        ("09:00-12:00,lunch", "'lunch'"),
        (",".join(["01:00-02:00"] * 17), "17 windows"),
        ("x" * 5000, "5000 characters"),
        ("09:00-12:00," + "y" * 900, "'yyyyyyyyyy"),
    ],
)
def test_each_malformed_schedule_is_refused_naming_the_bad_part(text: str, named: str):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert isinstance(caught.value, CrowdtrainError)
    assert named in message, message
    assert "22:00-08:00" in message, "the message shows a correct example"
    assert len(message) < 300, "a hostile schedule is not echoed back whole"


def test_settings_come_from_the_peers_config_and_are_validated():
    config = PeerConfig(coordinator="x:1", schedule="22:00-08:00", pause_when_busy=50, pause_on_battery=True)
    settings = PauseSettings.from_peer_config(config, poll_s=0.5)
    assert settings.schedule == (Window(1320, 480),) and settings.busy_threshold_pct == 50
    assert settings.pause_on_battery and settings.poll_s == 0.5 and settings.enabled
    assert not PauseSettings.from_peer_config(PeerConfig(coordinator="x:1")).enabled
    for bad in (150.0, -1.0, float("nan")):
        with pytest.raises(PauseConfigError, match="--pause-when-busy"):
            PauseSettings.from_peer_config(PeerConfig(coordinator="x:1", pause_when_busy=bad))
    with pytest.raises(ScheduleError, match="hour 24"):
        PauseSettings.from_peer_config(PeerConfig(coordinator="x:1", schedule="24:00-08:00"))
    with pytest.raises(PauseConfigError, match="poll_s"):
        PauseSettings(poll_s=0)
    with pytest.raises(PauseConfigError, match="parse_schedule"):
        PauseSettings(schedule="22:00-08:00")


# --- the pure decision --------------------------------------------------------------------------

BUSY = PauseSettings(busy_threshold_pct=50, busy_pause_after_s=10, busy_resume_after_s=60)


def replay(settings: PauseSettings, steps, state: PauseState | None = None):
    """Feed (now, Observations) pairs to decide; return the decisions and the final state."""
    state = state or PauseState()
    decisions = []
    for now, obs in steps:
        decision, state = decide(now, obs, settings, state)
        decisions.append(decision)
    return decisions, state


def cpu(pct: float | None, **kw) -> Observations:
    return Observations(local_time=NOON, cpu_busy_pct=pct, **kw)


def test_a_sustained_load_pauses_after_the_delay_and_resumes_only_after_a_long_quiet():
    loaded, state = replay(BUSY, [(float(t), cpu(87)) for t in range(11)])
    assert [d.paused for d in loaded] == [False] * 10 + [True]
    assert (
        loaded[4].reason
        == "running; other processes use 87% of the CPU (threshold 50%) for 4 s, pausing if it lasts 10 s"
    )
    assert loaded[10].reason == "other processes use 87% of the CPU (threshold 50%)"
    quiet, _ = replay(BUSY, [(float(t), cpu(12)) for t in range(11, 72)], state)
    assert [d.paused for d in quiet] == [True] * 60 + [False]
    assert quiet[15].reason == (
        "other processes kept the machine busy; resuming once they stay below 50% for 60 s "
        "(now 12% CPU, 45 s to go)"
    )
    assert quiet[-1] == Decision(False, "running")


def test_a_short_spike_is_ignored_and_restarts_the_count():
    steps = [(0.0, cpu(95)), (1.0, cpu(20))] + [(float(t), cpu(95)) for t in range(5, 16)]
    decisions, _ = replay(BUSY, steps)
    assert not any(d.paused for d in decisions[:-1]), "9 s above since the spike ended is not enough"
    assert decisions[-1].paused  # 10 s above, counted from t=5


def test_a_load_dip_while_paused_restarts_the_quiet_count():
    _, paused = replay(BUSY, [(0.0, cpu(90)), (10.0, cpu(90))])
    steps = [(float(t), cpu(10)) for t in range(11, 50)] + [(50.0, cpu(70))]
    steps += [(float(t), cpu(10)) for t in range(51, 111)]
    decisions, state = replay(BUSY, steps, paused)
    assert all(d.paused for d in decisions), "60 s below the threshold only counts from t=51"
    after, _ = replay(BUSY, [(111.0, cpu(10))], state)
    assert not after[0].paused


def test_unknown_load_never_pauses_and_the_gpu_is_named_when_it_is_the_busy_one():
    decisions, _ = replay(BUSY, [(float(t), cpu(None)) for t in range(0, 100, 5)])
    assert not any(d.paused for d in decisions)
    gpu = [(float(t), Observations(NOON, cpu_busy_pct=5, gpu_busy_pct=97)) for t in range(11)]
    decisions, _ = replay(BUSY, gpu)
    assert decisions[-1] == Decision(True, "other processes use 97% of the GPU (threshold 50%)")
    hostile = [(float(t), cpu(float("nan"))) for t in range(30)]
    assert not any(d.paused for d in replay(BUSY, hostile)[0])
    never = PauseSettings(busy_threshold_pct=0)
    assert not any(d.paused for d in replay(never, [(float(t), cpu(100)) for t in range(30)])[0])


def test_battery_pauses_only_when_asked_and_known():
    battery = PauseSettings(pause_on_battery=True)
    for on_battery, paused in ((True, True), (False, False), (None, False)):
        decision, _ = decide(0.0, cpu(None, on_battery=on_battery), battery, PauseState())
        assert decision.paused is paused
    assert decide(0.0, cpu(None, on_battery=True), battery, PauseState())[0].reason == "on battery"
    assert not decide(0.0, cpu(None, on_battery=True), PauseSettings(), PauseState())[0].paused


@pytest.mark.parametrize(
    ("schedule", "outside", "inside", "reason"),
    [
        ("22:00-08:00", "12:00", "02:00", "outside schedule 22:00-08:00 (resumes at 22:00)"),
        (
            "09:00-12:00,13:00-17:00",
            "12:30",
            "16:00",
            "outside schedule 09:00-12:00,13:00-17:00 (resumes at 13:00)",
        ),
        (
            "09:00-12:00,13:00-17:00",
            "18:00",
            "09:00",
            "outside schedule 09:00-12:00,13:00-17:00 (resumes at 09:00)",
        ),
    ],
)
def test_outside_the_schedule_the_reason_says_when_it_resumes(schedule, outside, inside, reason):
    settings = PauseSettings(schedule=parse_schedule(schedule))
    assert decide(0.0, Observations(at(outside)), settings, PauseState())[0] == Decision(True, reason)
    assert decide(0.0, Observations(at(inside)), settings, PauseState())[0] == Decision(False, "running")


def test_manual_beats_battery_beats_schedule_beats_busy():
    everything = PauseSettings(
        schedule=parse_schedule("22:00-08:00"),
        busy_threshold_pct=50,
        busy_pause_after_s=0,
        pause_on_battery=True,
    )
    cases = [
        (dict(manual_pause=True, on_battery=True), "12:00", MANUAL_REASON),
        (dict(on_battery=True), "12:00", "on battery"),
        ({}, "12:00", "outside schedule 22:00-08:00 (resumes at 22:00)"),
        ({}, "23:00", "other processes use 90% of the CPU (threshold 50%)"),
    ]
    for flags, now, reason in cases:
        obs = Observations(at(now), cpu_busy_pct=90, **flags)
        assert decide(5.0, obs, everything, PauseState())[0] == Decision(True, reason)


def test_the_busy_count_goes_on_under_a_manual_pause():
    steps = [(float(t), cpu(90, manual_pause=True)) for t in range(11)]
    decisions, state = replay(BUSY, steps)
    assert {d.reason for d in decisions} == {MANUAL_REASON}
    after, _ = replay(BUSY, [(11.0, cpu(90))], state)
    assert after[0] == Decision(True, "other processes use 90% of the CPU (threshold 50%)")


# --- the monitor, fed by injected functions -----------------------------------------------------


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_the_monitor_decides_at_start_and_asks_for_the_gpu_only_while_paused():
    asked = []

    def sampler(measure_gpu: bool) -> Reading:
        asked.append(measure_gpu)
        return Reading(cpu_busy_pct=30.0)

    settings = PauseSettings(schedule=parse_schedule("22:00-08:00"), busy_threshold_pct=50, poll_s=0.05)
    with PauseMonitor(settings, sampler=sampler, local_time=lambda: NOON) as monitor:
        assert monitor.decision == Decision(True, "outside schedule 22:00-08:00 (resumes at 22:00)")
        assert wait_for(lambda: len(asked) >= 3) and all(asked[1:]), "the first sample precedes any pause"
    night = PauseSettings(schedule=parse_schedule("22:00-08:00"), busy_threshold_pct=50, poll_s=0.05)
    asked.clear()
    with PauseMonitor(night, sampler=sampler, local_time=lambda: at("23:00")) as monitor:
        assert wait_for(lambda: len(asked) >= 3) and not monitor.decision.paused and not any(asked)
        monitor.pause()
        assert monitor.decision == Decision(True, MANUAL_REASON)
        count = len(asked)
        assert wait_for(lambda: len(asked) > count + 1) and asked[-1] is True


def test_a_failing_sampler_leaves_the_monitor_running_and_shutdown_is_idempotent():
    def broken(measure_gpu: bool) -> Reading:
        raise OSError("sensor gone")

    monitor = PauseMonitor(
        PauseSettings(busy_threshold_pct=10, busy_pause_after_s=0, poll_s=0.02), sampler=broken
    )
    monitor.start()
    time.sleep(0.2)
    assert monitor.decision == Decision(False, "running")
    monitor.shutdown()
    monitor.shutdown()
    assert not any(t.name == "crowdtrain-pause" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="create a new one"):
        monitor.start()


def test_wait_until_resumed_returns_on_resume_stop_or_timeout():
    with PauseMonitor(PauseSettings()) as monitor:
        assert monitor.wait_until_resumed(threading.Event(), timeout_s=0) is True
        monitor.pause()
        started = time.monotonic()
        threading.Timer(0.3, monitor.resume).start()
        assert monitor.wait_until_resumed(threading.Event(), timeout_s=5) is True
        assert time.monotonic() - started >= 0.25
        monitor.pause()
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        assert monitor.wait_until_resumed(stop, timeout_s=5) is False and stop.is_set()
        started = time.monotonic()
        assert monitor.wait_until_resumed(threading.Event(), timeout_s=0.2) is False
        assert 0.15 <= time.monotonic() - started < 2


# --- real checks --------------------------------------------------------------------------------

_SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n    pass\n"
_TREE = "import subprocess, sys\nsubprocess.Popen([sys.executable, sys.argv[1]])\n" + _SPIN
# starts the tree (a busy loop with a busy child of its own) and exits at once: the loops are then
# nobody's descendants here, like a game the volunteer starts (and both end after 30 s regardless)
_LAUNCH = """import subprocess, sys
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tree = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True, **quiet)
print(tree.pid)
"""


def _start_foreign_busy_loops(tmp_path) -> psutil.Process:
    (tmp_path / "spin.py").write_text(_SPIN)
    (tmp_path / "tree.py").write_text(_TREE)
    command = [sys.executable, "-c", _LAUNCH, str(tmp_path / "tree.py"), str(tmp_path / "spin.py")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stderr
    root = psutil.Process(int(out.stdout))
    assert wait_for(lambda: len(root.children()) == 1), "the busy loop's child did not start"
    return root


def _cpu_s(processes) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def test_a_cpu_load_outside_our_process_tree_is_seen_and_pauses_the_monitor(tmp_path):
    idle = SystemSampler()
    idle()
    time.sleep(0.5)
    idle_pct = idle().cpu_busy_pct
    root = _start_foreign_busy_loops(tmp_path)
    try:
        assert root.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        ours, theirs = SystemSampler(), SystemSampler(pid=root.pid)  # theirs: the loops count as own
        loops = [root, *root.children(recursive=True)]
        ours(), theirs()
        loops_cpu_s, started = _cpu_s(loops), time.monotonic()
        time.sleep(1.5)
        seen, seen_by_loops = ours().cpu_busy_pct, theirs().cpu_busy_pct
        # what the loops got of the machine: all of the cores they could take on an idle one, less
        # beside other work (another test worker, a swarm)
        loops_pct = 100 * (_cpu_s(loops) - loops_cpu_s) / ((time.monotonic() - started) * psutil.cpu_count())
        assert loops_pct >= 20, f"the busy loops got {loops_pct:.0f}% of the machine"
        assert seen is not None and seen >= 40, f"two busy loops on 2 cores: {seen}% (idle: {idle_pct}%)"
        # a sampler told the loops are its own tree leaves them out: what it sees drops by their share
        assert seen_by_loops is not None and seen - seen_by_loops >= loops_pct / 2, (
            seen,
            seen_by_loops,
            loops_pct,
        )
        settings = PauseSettings(
            busy_threshold_pct=40, busy_pause_after_s=0.5, busy_resume_after_s=30, poll_s=0.2
        )
        with PauseMonitor(settings) as monitor:
            assert wait_for(lambda: monitor.decision.paused, timeout_s=6), monitor.decision
            assert monitor.decision.reason.endswith("of the CPU (threshold 40%)")
    finally:
        processes = [root, *root.children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=5)


def test_sigusr1_pauses_and_sigusr2_resumes_a_real_monitor():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)
    with PauseMonitor(PauseSettings(poll_s=0.05)) as monitor:
        restore = install_pause_signals(monitor)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert wait_for(lambda: monitor.decision.paused, timeout_s=2)
            assert monitor.decision.reason == "paused by SIGUSR1 (send SIGUSR2 to resume)"
            os.kill(os.getpid(), signal.SIGUSR2)
            assert monitor.wait_until_resumed(threading.Event(), timeout_s=2) is True
        finally:
            restore()
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)) == before
        failed = []
        thread = threading.Thread(target=lambda: _install_expecting_refusal(monitor, failed))
        thread.start()
        thread.join()
        assert failed == ["main thread"]


def _install_expecting_refusal(monitor: PauseMonitor, failed: list) -> None:
    try:
        install_pause_signals(monitor)
    except RuntimeError as error:
        failed.append("main thread" if "main thread" in str(error) else str(error))
