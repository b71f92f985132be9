"""A short chaos run: kill -9, SIGSTOP past the averaging timeout, and a coordinator crash, all in
three minutes; the swarm must keep training and lose nothing (the long run: scripts/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.chaos import ChaosConfig, Fault, missed_targets, run_chaos

pytestmark = pytest.mark.swarm


def test_short_chaos_run(tmp_path: Path):
    config = ChaosConfig(
        peers=3,
        duration_s=180,
        faults=(
            Fault(40, "kill", 0, 10),
            Fault(60, "stop", 1, 40),  # longer than the tiny preset's 30 s averaging timeout
            Fault(75, "coordinator", -1, 12),
        ),
    )
    report = run_chaos(config, tmp_path / "chaos")
    print(report.summary())
    assert report.faults_injected == {"kill": 1, "stop": 1, "coordinator": 1}, report.summary()
    assert report.end_epoch >= 10, report.summary()
    assert report.final_eval_loss < report.initial_eval_loss - 0.5, report.summary()
    assert report.checkpoints_published >= 3 and report.checkpoints_verified == report.checkpoints_published
    assert not report.checkpoints_lost and not report.checkpoint_errors
    assert not report.orphans, report.orphans
    assert len(report.detect_dead_s) == 2, report.summary()  # the killed and the stopped peer
    assert max(report.detect_dead_s) <= 2 * config.heartbeat_timeout_s, report.summary()
    assert report.resumed_after_stop_s, "the stopped peer never trained again"
    assert "p0.1" not in report.joiners_never_contributed, report.summary()
    assert set(report.exit_codes.values()) == {0}, report.exit_codes
    assert not missed_targets(report, config, joiner_limit_s=120), report.summary()
