"""Progress events: the human line unchanged, one JSON object per line for programs."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
from crowdtrain.peer.events import EVENTS, JsonFormatter, emit, parse_event


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-events-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_an_event_is_the_same_human_line_and_a_json_object():
    fields = dict(
        epoch=12,
        loss=5.231,
        samples_per_s=37.6,
        swarm_peers=2,
        lr=3e-3,
        samples_total=1536,
        compute_share=0.78,
        averaged_with=2,
        group="3f9a0c1e",
    )
    args = (12, 5.231, 37.6, 2, 3e-3, 1536, 0.78, 2, "3f9a0c1e")
    text = (
        "epoch=%d loss=%.3f samples_per_s=%.1f swarm_peers=%d lr=%.1e samples_total=%d compute_share=%.2f "
        "averaged_with=%d group=%s"
    )
    human, human_out = _capture(logging.Formatter("%(message)s"))
    emit(human, "epoch", text, *args, **fields)
    assert (
        human_out.getvalue().strip()
        == "epoch=12 loss=5.231 samples_per_s=37.6 swarm_peers=2 lr=3.0e-03 samples_total=1536 compute_share=0.78 "
        "averaged_with=2 group=3f9a0c1e"
    )

    machine, machine_out = _capture(JsonFormatter())
    emit(machine, "epoch", text, *args, **fields)
    obj = json.loads(machine_out.getvalue())
    assert obj["event"] == "epoch" and obj["level"] == "INFO" and obj["msg"].startswith("epoch=12 ")
    assert {k: obj[k] for k in EVENTS["epoch"]} == fields
    assert parse_event(machine_out.getvalue()) == obj


def test_fields_must_match_the_schema_and_json_stays_valid():
    logger, out = _capture(JsonFormatter())
    with pytest.raises(TypeError, match="takes fields"):
        emit(logger, "state_loaded", "loaded", epoch=3)
    emit(logger, "state_loaded", "loaded", epoch=3, seconds=math.nan)
    obj = json.loads(out.getvalue())  # NaN is not JSON: it becomes null
    assert obj["seconds"] is None
    logger.info("a plain record")
    plain = out.getvalue().splitlines()[-1]
    assert json.loads(plain)["msg"] == "a plain record" and parse_event(plain) is None
    assert parse_event("Traceback (most recent call last):") is None
    assert parse_event('{"event": "epoch", "epo') is None


def test_a_round_without_partners_is_one_warning_line_and_other_errors_keep_their_traceback():
    from crowdtrain.peer.events import quiet_expected_averaging_failures
    from hivemind.averaging.partition import AllreduceException

    quiet_expected_averaging_failures()
    quiet_expected_averaging_failures()  # idempotent: one filter
    averager_logger = logging.getLogger("hivemind.averaging.averager")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    averager_logger.addHandler(handler)
    try:
        for error in (AllreduceException("Averaging step failed: could not find a group"), KeyError("bug")):
            try:
                raise error
            except Exception as e:
                averager_logger.exception(e)  # as hivemind 1.1.12's DecentralizedAverager._step does
    finally:
        averager_logger.removeHandler(handler)
    text = out.getvalue()
    expected, _, unexpected = text.partition("ERROR 'bug'")
    assert expected.startswith("WARNING Averaging step failed: could not find a group (no partner was ready")
    assert "Traceback" not in expected and expected.count("\n") == 1
    assert "Traceback" in unexpected and "KeyError" in unexpected
    assert sum(type(f).__name__ == "ExpectedAveragingFailures" for f in averager_logger.filters) == 1


def test_an_epochs_compute_share_is_computing_time_over_wall_time():
    from crowdtrain.peer.volunteer.meter import EpochMeter

    now = [100.0]
    meter = EpochMeter(3, clock=lambda: now[0])
    for _ in range(4):  # 4 micro-batches of 1 s each, 0.75 s of it computing
        now[0] += 1.0
        meter.add(16, 5.0, 1.0, compute_s=0.75)
    now[0] += 4.0  # then 4 s waiting for the all-reduce
    assert meter.compute_share() == pytest.approx(3.0 / 8.0)
    assert meter.epoch_rate() == pytest.approx(64 / 8.0)
    meter.start_epoch(4)
    now[0] += 1.0
    meter.add(16, 4.0, 1.0, compute_s=1.0)
    assert meter.compute_share() == pytest.approx(1.0) and meter.samples_total == 80


def test_a_round_names_its_group_and_a_failed_one_leaves_the_peer_alone():
    from concurrent.futures import Future

    from crowdtrain.peer.swarm.averaging import round_group
    from crowdtrain.peer.volunteer.meter import group_fingerprint

    def finished(result=None, error=None) -> Future:
        f = Future()
        f.set_exception(error) if error else f.set_result(result)
        return f

    together = round_group(finished({"QmB": b"", "QmA": b""}), "QmA")
    assert together == ("QmA", "QmB") == round_group(finished({"QmA": 1, "QmB": 2}), "QmB")
    assert group_fingerprint(together) == group_fingerprint(("QmA", "QmB")) != group_fingerprint(("QmA",))
    assert len(group_fingerprint(together)) == 8
    cancelled = Future()
    cancelled.cancel()
    for alone in (None, Future(), cancelled, finished(error=TimeoutError("could not find a group"))):
        assert round_group(alone, "QmA") == ("QmA",)


def test_am_i_contributing_is_said_from_the_coordinators_answer_every_so_often(monkeypatch):
    from crowdtrain.peer.volunteer.meter import ContributionSummary, standing_text
    from crowdtrain.protos import coordinator_pb2 as pb

    answer = pb.HeartbeatResponse(accepted_samples=12400, share=0.31, rank=2, ranked_peers=5)
    assert standing_text(answer) == "accepted 12,400 samples (31.0% of the run, rank 2 of 5)"
    assert standing_text(pb.HeartbeatResponse()) == "" and standing_text(None) == ""
    hostile = pb.HeartbeatResponse(accepted_samples=1, share=7.5, rank=1, ranked_peers=1)
    assert "100.0% of the run" in standing_text(hostile)  # a share is shown within 0-100%
    logged = []
    monkeypatch.setattr(
        "crowdtrain.peer.volunteer.meter.emit",
        lambda logger, event, msg, *args, **fields: logged.append((event, fields)),
    )
    now = [0.0]
    summary = ContributionSummary(every_s=300.0, clock=lambda: now[0])
    summary.maybe_log(answer)  # not before 300 s
    now[0] = 301.0
    summary.maybe_log(answer)
    summary.maybe_log(answer)  # not again before another 300 s
    summary.maybe_log(answer, force=True)  # leaving
    assert [e for e, _ in logged] == ["contribution", "contribution"]
    assert logged[0][1] == {"accepted_samples": 12400, "share": 0.31, "rank": 2, "ranked_peers": 5}
