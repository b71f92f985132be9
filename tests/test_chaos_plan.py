"""The chaos harness's pure parts: replayable fault plans and the throughput interpolation."""

from __future__ import annotations

from scripts.chaos_harness import ChaosConfig, Fault, plan_faults, samples_at


def test_a_seed_replays_the_same_plan_and_another_seed_does_not():
    config = ChaosConfig(peers=4, duration_s=600, seed=7)
    plan = plan_faults(config)
    assert plan == plan_faults(ChaosConfig(peers=4, duration_s=600, seed=7))
    assert plan != plan_faults(ChaosConfig(peers=4, duration_s=600, seed=8))
    assert 8 <= len(plan) <= 30, len(plan)  # ~ (600 - 30 - 60) / 30 faults
    assert {f.kind for f in plan} == {"kill", "stop", "leave", "coordinator"}


def test_plans_respect_warmup_cooldown_slots_and_durations():
    config = ChaosConfig(peers=3, duration_s=900, seed=3, mean_fault_interval_s=10)
    for f in plan_faults(config):
        assert config.warmup_s < f.at_s <= config.duration_s - config.cooldown_s
        if f.kind == "coordinator":
            assert (
                f.slot == -1 and config.coordinator_down_s[0] <= f.duration_s <= config.coordinator_down_s[1]
            )
        else:
            assert 0 <= f.slot < 3
        if f.kind == "stop":
            assert config.stop_s[0] <= f.duration_s <= config.stop_s[1]
    assert [f.at_s for f in plan_faults(config)] == sorted(f.at_s for f in plan_faults(config))


def test_an_explicit_plan_is_used_as_given_in_time_order():
    faults = (Fault(50, "stop", 1, 40), Fault(20, "kill", 0, 10))
    assert plan_faults(ChaosConfig(faults=faults)) == [faults[1], faults[0]]


def test_samples_at_interpolates_a_peer_timeline():
    timeline = [(10.0, 100), (20.0, 300)]
    assert samples_at(timeline, 5.0) == 0.0
    assert samples_at(timeline, 10.0) == 100
    assert samples_at(timeline, 15.0) == 200
    assert samples_at(timeline, 99.0) == 300
    assert samples_at([], 3.0) == 0.0
