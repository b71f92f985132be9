"""Reachability (the coordinator dials what a peer announces) and "am I contributing?" (standings):
pure functions, then the servicer over in-process gRPC on 127.0.0.1:0."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from crowdtrain.coordinator import reachability
from crowdtrain.coordinator.registry import HealthSettings
from crowdtrain.coordinator.service import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.standings import Standings, rank_totals
from crowdtrain.coordinator.store import Store
from crowdtrain.peer.client import CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.protos import coordinator_pb2 as pb

from tests.conftest import serving


@pytest.mark.parametrize(
    ("maddr", "parsed"),
    [
        ("/ip4/1.2.3.4/tcp/4001/p2p/QmX", ("1.2.3.4", 4001)),
        ("/ip6/::1/tcp/80", ("::1", 80)),
        ("/ip4/1.2.3.4/udp/4001/quic", None),
        ("/ip4/::1/tcp/80", None),
        ("/ip4/1.2.3.4/tcp/0", None),
        ("/ip4/1.2.3.4/tcp/99999", None),
        ("/dns4/example.org/tcp/1", None),
        ("ip4/1.2.3.4/tcp/1", None),
    ],
)
def test_multiaddrs_are_parsed_strictly(maddr, parsed):
    assert reachability.parse_maddr(maddr) == parsed


def test_only_the_peers_own_address_or_a_public_one_is_ever_dialed():
    maddrs = [
        "/ip4/203.0.113.7/tcp/4001/p2p/Qm",  # where the coordinator sees it: dialed
        "/ip4/10.0.0.5/tcp/4001/p2p/Qm",  # someone's private network: never
        "/ip4/127.0.0.1/tcp/22",  # the coordinator's own machine: never
        "/ip4/169.254.169.254/tcp/80",  # a cloud metadata service: never
        "/ip4/8.8.8.8/tcp/53",  # public: dialed
    ]
    targets, skipped = reachability.dial_targets("203.0.113.7", maddrs)
    assert targets == [("203.0.113.7", 4001), ("8.8.8.8", 53)]
    assert len(skipped) == 3 and all("private" in s for s in skipped)
    many = [f"/ip4/8.8.8.{i}/tcp/1" for i in range(20)]
    assert len(reachability.dial_targets("203.0.113.7", many)[0]) == reachability.MAX_DIALS


def test_advice_says_what_to_forward_and_announce():
    announced = ["/ip4/192.168.1.5/tcp/31337/p2p/Qm"]
    reachable, advice = reachability.verdict("203.0.113.7", announced, [], [])
    assert not reachable and "forward TCP port 31337" in advice and "--announce-host" in advice
    reachable, advice = reachability.verdict("203.0.113.7", announced, [], [31337])
    assert "port 31337 is open at 203.0.113.7" in advice and "--announce-host 203.0.113.7" in advice
    assert reachability.verdict("203.0.113.7", announced, ["203.0.113.7:31337"], []) == (True, "")
    assert reachability.host_of("ipv4:203.0.113.7:5555") == "203.0.113.7"
    assert reachability.host_of("ipv6:[::1]:5555") == "::1"
    assert reachability.host_of("unix:/tmp/x") == ""


def test_ranks_share_ties_and_ignore_empty_ledgers():
    ranks, total, count = rank_totals({"a": 50, "b": 100, "c": 50, "d": 0})
    assert ranks == {"b": (100, 1), "a": (50, 2), "c": (50, 2)} and (total, count) == (200, 3)
    now = [0.0]
    ledger = {"a": 10}
    standings = Standings(lambda: dict(ledger), clock=lambda: now[0], refresh_s=10.0)
    assert standings.of("a").rank == 1
    ledger["b"] = 30
    assert standings.of("a").rank == 1  # cached until the next refresh
    now[0] = 11.0
    a = standings.of("a")
    assert (a.accepted_samples, a.share, a.rank, a.ranked_peers) == (10, 0.25, 2, 2)
    assert standings.of("nobody").rank == 0


@pytest.fixture
def served(tmp_path: Path):
    store = Store(tmp_path / "state.sqlite3")
    run = RunInfo(
        manifest_json='{"run_id": "r"}',
        manifest_sha256="abc",
        tokenizer_json="{}",
        num_shards=2,
        http_base_url="http://127.0.0.1:1",
        checkpoint_root=tmp_path / "checkpoints",
    )
    servicer = CoordinatorServicer(run, store, HealthSettings(2.0, 10.0), initial_peers=list)
    dialed: list[tuple[str, int]] = []

    def dial(host: str, port: int) -> bool:
        dialed.append((host, port))
        return reachability.tcp_dial(host, port, timeout_s=1.0)

    servicer.dial = dial
    with serving(servicer, store) as client:
        yield client, store, dialed


def test_a_listening_peer_is_reachable_and_one_announcing_an_unreachable_address_is_told_why(served):
    client, store, dialed = served
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        joined = client.join(pb.JoinRequest(name="home"))
        answer = client.check_reachability(
            joined.session_id, joined.session_token, [f"/ip4/127.0.0.1/tcp/{port}/p2p/QmX"]
        )
        assert answer.reachable and answer.seen_host == "127.0.0.1" and answer.advice == ""
        assert store.get_peer(joined.session_id).reachability == "reachable"
        # a peer behind NAT announces an address nobody can dial (TEST-NET): not dialed, and the
        # port it listens on, open where the coordinator sees it, is named in the advice
        other = client.join(pb.JoinRequest(name="nat"))
        answer = client.check_reachability(
            other.session_id, other.session_token, [f"/ip4/192.0.2.1/tcp/{port}/p2p/QmY"]
        )
        assert not answer.reachable and "--announce-host 127.0.0.1" in answer.advice
        assert ("192.0.2.1", port) not in dialed
        assert store.get_peer(other.session_id).reachability == "unreachable"
    finally:
        listener.close()
    # nothing listens there any more: unreachable, with the port-forwarding advice
    answer = client.check_reachability(
        joined.session_id, joined.session_token, [f"/ip4/127.0.0.1/tcp/{port}"]
    )
    assert not answer.reachable and f"forward TCP port {port}" in answer.advice


def test_reachability_requests_are_bounded_and_rate_limited(served):
    client, _, dialed = served
    joined = client.join(pb.JoinRequest(name="x"))
    sid, token = joined.session_id, joined.session_token
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        client._call(
            client._stub.CheckReachability,
            pb.ReachabilityRequest(session_id=sid, session_token=token, maddrs=["/ip4/1.2.3.4/tcp/1"] * 17),
        )
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        client.check_reachability(sid, token, ["/ip4/1.2.3.4/tcp/1\n/evil"])
    with pytest.raises(CoordinatorRejected, match="UNAUTHENTICATED|NOT_FOUND|PERMISSION"):
        client.check_reachability(sid, "A" * 43, ["/ip4/127.0.0.1/tcp/1"])
    for _ in range(3):  # the burst
        client.check_reachability(sid, token, ["/ip4/127.0.0.1/tcp/1"])
    before = len(dialed)
    with pytest.raises(CoordinatorUnavailable, match="RESOURCE_EXHAUSTED"):  # a peer retries later
        client.check_reachability(sid, token, ["/ip4/127.0.0.1/tcp/1"])
    assert len(dialed) == before  # refused before dialing anything


def test_a_peer_shows_a_hostile_coordinators_advice_as_bounded_plain_text(caplog):
    from crowdtrain.peer.reach import MAX_ADVICE_CHARS, ensure_reachable

    class Dht:
        stopped = False

        def get_visible_maddrs(self):
            return ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]

        def shutdown(self):
            self.stopped = True

    class Client:
        def check_reachability(self, session_id, token, maddrs):
            advice = "\x1b[2J\x1b]0;owned\x07forward port 1\nrm -rf ~" + "x" * 10_000
            return pb.ReachabilityResponse(reachable=False, seen_host="\x1b[31m1.2.3.4", advice=advice)

    dht, restarted = Dht(), object()
    with caplog.at_level("WARNING"):
        used, reachable = ensure_reachable(dht, Client(), "s", "t", lambda: restarted)
    assert used is restarted and reachable is False and dht.stopped  # client mode, old node stopped
    shown = caplog.records[-1].getMessage()
    assert "\x1b" not in shown and "\n" not in shown and "\x07" not in shown
    assert len(shown) < MAX_ADVICE_CHARS + 100


def test_a_coordinators_next_shard_hint_is_checked_before_it_is_read():
    from types import SimpleNamespace

    from crowdtrain.peer.feed import DataFeed
    from crowdtrain.peer.heartbeat import StatsBox
    from crowdtrain.peer.shardread import Place

    answer = [None]
    config = SimpleNamespace(cache_dir="/nonexistent", coordinator="c:1", name="n")
    manifest = SimpleNamespace(data=SimpleNamespace(shards=[0, 1, 2]), run_id="r")
    joined = SimpleNamespace(settings=pb.PeerSettings(shard_index=1))
    feed = DataFeed(config, manifest, joined, None, StatsBox(), answers=lambda: answer[0])
    assert feed._hint(1) is None  # no answer yet: the reader moves on by itself
    for hostile in (dict(next_shard=7), dict(next_shard=2, next_shard_position=-5), dict(next_shard=1)):
        answer[0] = pb.HeartbeatResponse(**hostile)
        assert feed._hint(1) is None, hostile
    answer[0] = pb.HeartbeatResponse(next_shard=2, next_shard_position=40, next_shard_pass=1)
    assert feed._hint(1) == Place(2, 1, 40)
