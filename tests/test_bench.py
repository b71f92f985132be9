"""scripts/bench.py's pure parts: how a peer's samples/s is read from its events, and the table."""

from __future__ import annotations

import pytest

from scripts.bench import Row, _rate_between, markdown, tcp_loopback_mb_s


def _epoch(ts: float, samples: int) -> dict:
    return {"event": "epoch", "ts": ts, "samples_total": samples}


def test_rate_is_read_between_the_last_epochs_before_each_end_of_the_window():
    events = [_epoch(10.0, 100), {"event": "joined", "ts": 11.0}, _epoch(20.0, 300), _epoch(40.0, 700)]
    assert _rate_between(events, t0=15.0, t1=45.0) == pytest.approx((700 - 100) / 30.0)
    assert _rate_between(events, t0=25.0, t1=45.0) == pytest.approx((700 - 300) / 20.0)


def test_no_rate_without_two_epochs_in_the_window():
    events = [_epoch(10.0, 100), _epoch(20.0, 300)]
    assert _rate_between(events, t0=5.0, t1=45.0) is None  # nothing before the window opened
    assert _rate_between(events, t0=25.0, t1=45.0) is None  # no epoch after it opened


def test_the_table_marks_missed_goals():
    rows = [
        Row("a", "1.00", ">= 0.90", True),
        Row("b", "0.50", ">= 0.90", False),
        Row("c", "skipped", "-", None),
    ]
    text = markdown(rows, "python -m scripts.bench", images=[])
    assert "| a | 1.00 | >= 0.90 | yes |" in text
    assert "| b | 0.50 | >= 0.90 | NO |" in text
    assert "| c | skipped | - | - |" in text


def test_raw_tcp_moves_bytes_over_loopback():
    assert tcp_loopback_mb_s(8.0) > 1.0  # MB/s; a stalled or broken copy would hang or fail


def test_bytes_a_process_sends_over_tcp_are_counted():
    import os
    import socket
    import threading

    from scripts.bench import tcp_bytes_acked

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    with server, client, conn:
        before = tcp_bytes_acked({os.getpid()})
        assert before, "ss shows this process's loopback sockets"
        payload = b"x" * 3_000_000
        got = bytearray()

        def read_all():
            while len(got) < len(payload):
                got.extend(conn.recv(1 << 20))

        reader = threading.Thread(target=read_all)
        reader.start()
        client.sendall(payload)
        reader.join(30)
        after = tcp_bytes_acked({os.getpid()})
        sent = sum(v - before.get(k, 0) for k, v in after.items())
        assert len(payload) <= sent < len(payload) + 100_000
        assert tcp_bytes_acked({-1}) == {}  # no such process: nothing counted


def test_profile_shares_split_the_main_threads_wall_time():
    from scripts.bench import profile_shares

    step = "thread (1): MainThread;<module> (peer.py:1);Trainer._step (peer/volunteer/trainer.py:300)"
    raw = "\n".join(
        [
            f"{step};_call_impl (torch/nn/modules/module.py:1);forward (llama.py:3) 30",
            f"{step};Tensor.backward (torch/_tensor.py:5);backward (torch/autograd/__init__.py:9) 50",
            f"{step};Optimizer.step (hivemind/optim/optimizer.py:400);StepControl.result (control.py:1);wait (threading.py:2) 15",
            f"{step};Optimizer.step (hivemind/optim/optimizer.py:400);ClippedAdamW.step (peer/swarm/optimizers.py:30) 5",
            "thread (2): batches;Prefetcher._fill (peer/data/prefetch.py:9) 100",  # not the main thread
        ]
    )
    shares, top = profile_shares(raw)
    assert shares["backward"] == 0.5 and shares["forward"] == 0.3
    assert shares["optimizer update (AdamW)"] == 0.05
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert top[0] == ("wait <- StepControl.result", 0.15)
    assert profile_shares("") == ({}, [])


def test_cpu_of_a_process_tree_counts_children():
    import os
    import subprocess
    import sys
    import time

    from scripts.bench import process_tree_cpu_s

    # a tree of its own (parent -> busy child): pytest's whole tree is no stable baseline, since a
    # descendant of another test reaped meanwhile takes its CPU seconds out of the sum (the likely
    # cause of one CI failure: "never counted" within 60 s, not reproduced since)
    busy = "sum(range(30_000_000)); input()"
    parent_code = (
        "import subprocess, sys; "
        f"c = subprocess.Popen([sys.executable, '-c', {busy!r}], stdin=subprocess.PIPE); "
        "input(); c.communicate(b'\\n')"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while process_tree_cpu_s(parent.pid)["python"] < 0.3:
            assert time.monotonic() < deadline, "the child's CPU time was never counted"
            time.sleep(0.1)
        assert process_tree_cpu_s(os.getpid())["python"] >= 0.3  # pytest's tree holds it too
    finally:
        parent.communicate(b"\n", timeout=60)


def test_the_wan_figure_weights_each_epochs_compute_share_by_its_duration():
    from scripts.bench_wan import compute_share_between, samples_between

    events = [
        {"event": "epoch", "ts": 100.0, "compute_share": 0.1, "samples_total": 64},  # joined, first round
        {"event": "epoch", "ts": 110.0, "compute_share": 0.2, "samples_total": 128},
        {
            "event": "epoch",
            "ts": 120.0,
            "compute_share": 1.0,
            "samples_total": 192,
        },  # 10 s, computing all along
        {"event": "epoch", "ts": 150.0, "compute_share": 0.5, "samples_total": 256},  # 30 s, half of it
    ]
    assert compute_share_between(events, 115.0, 200.0) == pytest.approx((1.0 * 10 + 0.5 * 30) / 40)
    assert samples_between(events, 115.0, 200.0) == 256 - 128
    assert compute_share_between(events, 160.0, 200.0) is None  # no epoch ended in the window
    assert samples_between(events, 160.0, 200.0) == 0
    assert compute_share_between(events, 0.0, 105.0) is None  # the first epoch has no start


def test_the_quiet_rate_ignores_the_seconds_a_round_runs():
    from scripts.bench_wan import quiet_rate

    timeline = [(0.0, 0), (1.0, 1_000), (2.0, 2_000), (3.0, 5_002_000), (4.0, 5_003_000), (5.0, 5_004_000)]
    assert quiet_rate(timeline) == pytest.approx(1_000)
    assert quiet_rate([(0.0, 0)]) == 0.0
