"""Reachability (the coordinator dials what a peer announces) and "am I contributing?" (standings):
pure functions, then the servicer over in-process gRPC on 127.0.0.1:0."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from crowdtrain.coordinator.api import reachability
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.errors import NotServedError
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.standings import Standings, rank_totals
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.link.client import CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.protos import coordinator_pb2 as pb

from tests.helpers import serving
from tests.identities import signed_join


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


PUBLIC = "93.184.216.34"  # a globally routable caller (never dialed in these tests: `dial` is recorded)

NEVER_DIALED = [
    "/ip4/127.0.0.1/tcp/22",  # the coordinator's own machine
    "/ip6/::1/tcp/22",
    "/ip4/10.0.0.5/tcp/5432",  # someone's private network
    "/ip4/172.16.0.1/tcp/80",
    "/ip4/192.168.1.5/tcp/4001",
    "/ip4/100.64.0.1/tcp/80",  # carrier-grade NAT
    "/ip4/169.254.169.254/tcp/80",  # a cloud metadata service (link-local)
    "/ip6/fe80::1/tcp/80",
    "/ip6/fc00::5/tcp/80",  # unique local
    "/ip6/fec0::5/tcp/80",  # site-local (deprecated, still is_global in Python 3.11)
    "/ip4/224.0.0.1/tcp/80",  # multicast (is_global in Python 3.11)
    "/ip6/ff02::1/tcp/80",
    "/ip4/240.0.0.1/tcp/80",  # reserved
    "/ip4/0.0.0.0/tcp/80",  # unspecified
    "/ip6/::/tcp/80",
    "/ip6/64:ff9b::a00:5/tcp/5432",  # NAT64 of 10.0.0.5 (is_global in Python 3.11)
    "/ip6/64:ff9b::a9fe:a9fe/tcp/80",  # NAT64 of the metadata service
    "/ip6/64:ff9b::7f00:1/tcp/22",  # NAT64 of 127.0.0.1
    "/ip6/64:ff9b:1::a00:5/tcp/5432",  # local-use NAT64 prefix
    "/ip6/2002:a00:5::1/tcp/5432",  # 6to4 of 10.0.0.5 (is_global in Python 3.11)
    "/ip6/2002:7f00:1::1/tcp/22",  # 6to4 of 127.0.0.1
    "/ip6/::ffff:10.0.0.5/tcp/5432",  # IPv4-mapped
    "/ip6/::ffff:127.0.0.1/tcp/22",
    "/ip6/::10.0.0.5/tcp/5432",  # IPv4-compatible (is_global in Python 3.11)
    "/ip6/::ffff:0:a00:5/tcp/5432",  # IPv4-translated
    "/ip6/2001:0:4136:e378:8000:63bf:f5ff:fffa/tcp/5432",  # Teredo, client 10.0.0.5
]


@pytest.mark.parametrize("maddr", NEVER_DIALED)
def test_no_private_loopback_or_special_address_is_dialed_even_as_the_callers_own(maddr):
    """Before: an address equal to the caller's own was dialed whatever it was (behind a proxy on
    the coordinator's machine every caller is 127.0.0.1), and NAT64/6to4 spellings of private
    addresses counted as global."""
    host, port = reachability.parse_maddr(maddr)
    dialed: list = []
    for seen in (PUBLIC, host):
        for settings in (reachability.ReachSettings(), reachability.ReachSettings(allow_loopback_dial=True)):
            if settings.allow_loopback_dial and reachability._is_loopback(seen):
                continue  # one machine's own swarm: the one case loopback is dialed (below)
            targets, skipped = reachability.dial_targets(seen, [maddr], settings)
            assert targets == [] and len(skipped) == 1, (seen, settings)
            assert reachability.may_dial(host, seen, settings)[0] is False

            def dial(h: str, p: int) -> bool:
                dialed.append((h, p))
                return True

            if seen == PUBLIC:  # its own address is checked at the announced port instead
                assert reachability.check(seen, [maddr], dial, settings=settings)[0] is False
            else:
                with pytest.raises(NotServedError, match="cannot check from here"):
                    reachability.check(seen, [maddr], dial, settings=settings)
    assert set(dialed) == {(PUBLIC, port)}  # only the public caller's own address


def test_public_addresses_and_spellings_of_public_ones_are_dialed():
    maddrs = [
        f"/ip4/{PUBLIC}/tcp/4001/p2p/Qm",  # where the coordinator sees it
        "/ip4/10.0.0.5/tcp/4001/p2p/Qm",  # never
        "/ip6/::ffff:8.8.8.8/tcp/53",  # dialed as the IPv4 it is
        "/ip6/2002:808:808::1/tcp/53",  # 6to4 of a public address
        "/ip6/2606:4700::1111/tcp/443",
    ]
    targets, skipped = reachability.dial_targets(PUBLIC, maddrs)
    assert targets == [(PUBLIC, 4001), ("8.8.8.8", 53), ("2002:808:808::1", 53), ("2606:4700::1111", 443)]
    assert skipped == ["10.0.0.5:4001 (a private address other peers cannot dial)"]
    many = [f"/ip4/8.8.8.{i}/tcp/1" for i in range(20)]
    assert len(reachability.dial_targets(PUBLIC, many)[0]) == reachability.MAX_DIALS
    # loopback only with --allow-loopback-dial, and only for a caller on loopback itself
    one_machine = reachability.ReachSettings(allow_loopback_dial=True)
    assert reachability.dial_targets("127.0.0.1", ["/ip4/127.0.0.1/tcp/9"], one_machine)[0] == [
        ("127.0.0.1", 9)
    ]
    assert reachability.dial_targets("127.0.0.1", ["/ip4/127.0.0.1/tcp/9"])[0] == []
    assert reachability.dial_targets(PUBLIC, ["/ip4/127.0.0.1/tcp/9"], one_machine)[0] == []


def test_a_proxy_header_names_the_caller_only_from_a_configured_trusted_proxy():
    header = [("x-forwarded-for", f"1.1.1.1, {PUBLIC}")]  # the proxy appended the last entry
    caller_host = reachability.caller_host
    assert caller_host("ipv4:127.0.0.1:5555", header) == "127.0.0.1"  # not configured: ignored
    proxied = reachability.ReachSettings(trusted_proxy="127.0.0.1, ::1")
    assert caller_host("ipv4:127.0.0.1:5555", header, proxied) == PUBLIC
    assert caller_host("ipv6:[::1]:5555", header, proxied) == PUBLIC
    assert caller_host("ipv4:8.8.4.4:5555", header, proxied) == "8.8.4.4"  # not from the proxy: ignored
    assert caller_host("ipv4:127.0.0.1:5555", [("x-forwarded-for", "evil")], proxied) == "127.0.0.1"
    assert caller_host("ipv4:127.0.0.1:5555", [], proxied) == "127.0.0.1"
    assert (
        caller_host("ipv4:10.0.0.7:1", header, reachability.ReachSettings(trusted_proxy="10.0.0.0/24"))
        == PUBLIC
    )
    # a caller naming 127.0.0.1 through the proxy is still never dialed
    forged = caller_host("ipv4:127.0.0.1:5555", [("x-forwarded-for", "127.0.0.1")], proxied)
    assert reachability.dial_targets(forged, ["/ip4/127.0.0.1/tcp/22"], proxied)[0] == []
    with pytest.raises(CrowdtrainError, match="--trusted-proxy 'localhost'"):
        reachability.ReachSettings(trusted_proxy="localhost")
    with pytest.raises(CrowdtrainError, match="give only one"):
        reachability.ReachSettings(allow_loopback_dial=True, trusted_proxy="127.0.0.1")


def test_advice_says_what_to_forward_and_announce():
    announced = ["/ip4/192.168.1.5/tcp/31337/p2p/Qm"]
    reachable, advice = reachability.verdict("203.0.113.7", announced, [], [])
    assert not reachable and "forward TCP port 31337" in advice and "--announce-host" in advice
    reachable, advice = reachability.verdict("203.0.113.7", announced, [], [31337])
    assert "port 31337 is open at 203.0.113.7" in advice and "--announce-host 203.0.113.7" in advice
    assert reachability.verdict("203.0.113.7", announced, ["203.0.113.7:31337"], []) == (True, "")
    assert reachability.host_of("ipv4:203.0.113.7:5555") == "203.0.113.7"
    assert reachability.host_of("ipv6:[::1]:5555") == "::1"
    assert reachability.host_of("ipv6:[::ffff:1.2.3.4]:5555") == "1.2.3.4"
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
    """A servicer with default settings, called from 127.0.0.1 as through a proxy on its machine;
    its dials are recorded, and answered from `answers` (never the real network) or, for
    loopback, by a real connect."""
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
    answers: dict[tuple[str, int], bool] = {}

    def dial(host: str, port: int) -> bool:
        dialed.append((host, port))
        if host in ("127.0.0.1", "::1"):
            return reachability.tcp_dial(host, port, timeout_s=1.0)
        return answers.get((host, port), False)

    servicer.dial = dial
    with serving(servicer, store) as client:
        yield client, store, dialed, answers


def test_a_session_behind_a_loopback_proxy_cannot_make_the_coordinator_dial_a_loopback_port(served):
    """Before: behind a reverse proxy or tunnel on the coordinator's machine every caller is
    127.0.0.1, and the coordinator dialed any 127.0.0.1 port a session announced: `reachable` and
    the advice told which of the machine's ports were open."""
    client, store, dialed, _ = served
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port, grpc_port = listener.getsockname()[1], int(client.address.rsplit(":", 1)[1])
    probes = [f"/ip4/127.0.0.1/tcp/{port}", f"/ip6/::1/tcp/{port}", f"/ip4/127.0.0.1/tcp/{grpc_port}"]
    try:
        joined = client.join(signed_join(name="prober"))
        with pytest.raises(CoordinatorRejected, match="UNIMPLEMENTED.*cannot check from here.*127.0.0.1"):
            client.check_reachability(joined.session_id, joined.session_token, probes)
        assert dialed == []
        with pytest.raises(BlockingIOError):  # nothing ever connected to the listener
            listener.accept()
    finally:
        listener.close()
    assert store.get_peer(joined.session_id).reachability == ""  # unchecked: not "unreachable"


def test_behind_a_proxy_a_peer_is_checked_at_its_public_address_or_left_unjudged(served):
    client, store, dialed, answers = served
    answers[(PUBLIC, 4001)] = True
    joined = client.join(signed_join(name="home"))
    maddrs = [f"/ip4/{PUBLIC}/tcp/4001/p2p/QmX", "/ip4/192.168.1.5/tcp/4001/p2p/QmX"]
    answer = client.check_reachability(joined.session_id, joined.session_token, maddrs)
    assert answer.reachable and answer.dialed == f"{PUBLIC}:4001" and answer.seen_host == "127.0.0.1"
    assert store.get_peer(joined.session_id).reachability == "reachable"
    other = client.join(signed_join(name="closed"))
    with pytest.raises(CoordinatorRejected, match="cannot check from here"):
        client.check_reachability(other.session_id, other.session_token, [f"/ip4/{PUBLIC}/tcp/4002"])
    assert dialed == [(PUBLIC, 4001), (PUBLIC, 4002)]
    assert store.get_peer(other.session_id).reachability == ""


def test_on_one_machine_a_listening_peer_is_reachable_and_others_are_told_why():
    """`--allow-loopback-dial` (tests, the demo): the check as a swarm on one machine sees it."""
    one_machine = reachability.ReachSettings(allow_loopback_dial=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        announced = [f"/ip4/127.0.0.1/tcp/{port}/p2p/QmX"]
        assert reachability.check("127.0.0.1", announced, settings=one_machine) == (
            True,
            [f"127.0.0.1:{port}"],
            "",
        )
        # a peer behind NAT announces an address nobody can dial (TEST-NET): not dialed, and the
        # port it listens on, open where the coordinator sees it, is named in the advice
        nat = [f"/ip4/192.0.2.1/tcp/{port}/p2p/QmY"]
        reachable, dialed, advice = reachability.check("127.0.0.1", nat, settings=one_machine)
        assert not reachable and dialed == [] and "--announce-host 127.0.0.1" in advice
    finally:
        listener.close()
    # nothing listens there any more: unreachable, with the port-forwarding advice
    reachable, _, advice = reachability.check("127.0.0.1", announced, settings=one_machine)
    assert not reachable and f"forward TCP port {port}" in advice


def test_reachability_requests_are_bounded_and_rate_limited(served):
    client, _, dialed, answers = served
    answers[(PUBLIC, 1)] = True
    joined = client.join(signed_join(name="x"))
    sid, token = joined.session_id, joined.session_token
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        client._call(
            client._stub.CheckReachability,
            pb.ReachabilityRequest(session_id=sid, session_token=token, maddrs=["/ip4/1.2.3.4/tcp/1"] * 17),
        )
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        client.check_reachability(sid, token, ["/ip4/1.2.3.4/tcp/1\n/evil"])
    with pytest.raises(CoordinatorRejected, match="UNAUTHENTICATED|NOT_FOUND|PERMISSION"):
        client.check_reachability(sid, "A" * 43, [f"/ip4/{PUBLIC}/tcp/1"])
    for _ in range(3):  # the burst
        assert client.check_reachability(sid, token, [f"/ip4/{PUBLIC}/tcp/1"]).reachable
    before = len(dialed)
    with pytest.raises(CoordinatorUnavailable, match="RESOURCE_EXHAUSTED"):  # a peer retries later
        client.check_reachability(sid, token, [f"/ip4/{PUBLIC}/tcp/1"])
    assert len(dialed) == before  # refused before dialing anything


def test_a_peer_shows_a_hostile_coordinators_advice_as_bounded_plain_text(caplog):
    from crowdtrain.peer.link.reach import MAX_ADVICE_CHARS, ensure_reachable

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

    from crowdtrain.peer.data.feed import DataFeed
    from crowdtrain.peer.data.reader import Place
    from crowdtrain.peer.link.heartbeat import StatsBox

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
