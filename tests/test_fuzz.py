"""Fuzzing a live coordinator (scripts/fuzz.py): 4,000 hypothesis-made requests over every RPC and
HTTP route, while a good peer heartbeats every 50 ms.

The coordinator runs in its own process, as in production; the run is seeded, so a failure repeats
with the same requests. The long run is `python -m scripts.fuzz --requests 200000`.
"""

from __future__ import annotations

import grpc
from crowdtrain.coordinator.api import webserver
from crowdtrain.protos import coordinator_pb2 as pb
from hypothesis import given, settings

from scripts import fuzz
from scripts.fuzz_inputs import METHODS, SERVICE, GrpcCall, grpc_call, message_class, route_templates
from scripts.fuzz_target import credentials

REQUESTS = 4_000


def test_four_thousand_fuzzed_requests_leave_the_coordinator_serving(tmp_path):
    report = fuzz.fuzz(REQUESTS, seed=20261128, directory=tmp_path / "coordinator")
    print(report.summary())  # figures for the record: pytest -s
    assert report.requests >= REQUESTS
    rpcs = {label.split()[1] for label in report.outcomes if label.startswith("gRPC ")}
    assert rpcs == {m.name for m in METHODS}, "every RPC was fuzzed"
    routes = {label.split()[1] for label in report.outcomes if label.startswith("HTTP /")}
    assert routes == set(route_templates(webserver.__doc__)), "every HTTP route was fuzzed"
    assert report.outcomes["gRPC Heartbeat"]["OK"] > 0, "fuzzed heartbeats got past the session check"
    assert report.problems() == [], report.summary()


def test_requests_are_built_from_the_descriptors():
    """Every field of every request message is drawn at some point (so a new field is fuzzed)."""
    seen: dict[str, set[str]] = {m.name: set() for m in METHODS}

    @settings(max_examples=400, database=None, derandomize=True)
    @given(grpc_call())
    def collect(call: GrpcCall):
        for fields in call.requests:
            message_class(SERVICE.methods_by_name[call.method].input_type)(**fields)  # valid kwargs
            seen[call.method] |= set(fields)

    collect()
    for method in METHODS:
        assert seen[method.name] == {f.name for f in method.input_type.fields}, method.name


def test_a_peer_copies_its_credentials_from_join_by_field_name():
    join = pb.JoinResponse(session_id="abc", manifest_json="{}")
    for request in (pb.HeartbeatRequest, pb.LeaveRequest):
        shared = {f.name for f in request.DESCRIPTOR.fields} & {f.name for f in join.DESCRIPTOR.fields}
        copied = credentials(join, request)
        assert set(copied) == shared and copied["session_id"] == "abc" and "manifest_json" not in copied


def test_the_checks_fail_on_a_crash_an_oversized_answer_and_a_slow_peer():
    """The report's judgement itself: what the fuzz test relies on to fail."""
    report = fuzz.FuzzReport(heartbeats_s=[0.001] * 99)
    assert report.problems() == []
    report.record("gRPC Join", "UNKNOWN", 0, "UNKNOWN (boom)", b"\xff")
    report.record("HTTP /api/v1/peers", "HTTP 200", fuzz.MAX_RESPONSE_BYTES + 1, None, b"GET /")
    report.heartbeats_s.append(0.2)
    report.heartbeats_s.append(0.2)
    problems = report.problems()
    assert any("UNKNOWN" in p and "\\xff" in p for p in problems)
    assert any(f"{fuzz.MAX_RESPONSE_BYTES + 1} bytes" in p for p in problems)
    assert any("p99" in p for p in problems)
    assert fuzz.ALLOWED_CODES.isdisjoint({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


def test_an_answer_ends_at_its_length_its_last_chunk_or_its_head():
    assert fuzz._head_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", is_head=False)
    assert not fuzz._head_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok", is_head=False)
    assert fuzz._head_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", is_head=True)
    assert fuzz._head_complete(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False
    )
    assert not fuzz._head_complete(b"HTTP/1.1 100 Continue\r\n\r\n", is_head=False)
    assert fuzz._head_complete(b"HTTP/1.1 204 No Content\r\n\r\n", is_head=False)
