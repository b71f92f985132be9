"""The HTTP views in process: JSON API, dashboard files, and /metrics agreeing with the JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.metrics import CoordinatorMetrics, VersionLabels
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import HttpLimits, WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing.archive import finalize, new_staging_dir
from crowdtrain.peer import __version__
from crowdtrain.peer.checkpoints.format import CheckpointMeta, list_checkpoints
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected
from crowdtrain.protos import coordinator_pb2 as pb
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.identities import identity, signed_join

A_ID, B_ID = identity(801).peer_id, identity(802).peer_id  # the identities of EVIL's and bob's sessions

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture
def site(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    health = HealthSettings(2.0, 10.0, 20.0)
    root = tmp_path / "ckpt"
    clock = [2000.0]
    progress = SwarmProgress(global_epoch=7, samples_per_s=123.5, num_peers=2, read_unix_s=1999.0)

    def status():
        return build_status(
            clock[0],
            "ct_test",
            store.list_peers(),
            store.contribution_totals(),
            health,
            progress,
            list_checkpoints(root),
            store.rejections(),
        )

    metrics = CoordinatorMetrics(status)
    web = WebServer(
        WebContext(tmp_path, frozenset(), root, "{}", store, status, metrics), "127.0.0.1", 0
    ).start()
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 2, "http://x", root),
        store,
        health,
        initial_peers=list,
        clock=lambda: clock[0],
        status=status,
        heartbeat_latency=metrics.heartbeat_latency.observe,
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{web.port}", f"127.0.0.1:{port}", store, root, clock
    finally:
        server.stop(0).wait()
        web.shutdown()
        store.close()


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_metrics_match_the_json_api(site):
    base, address, store, root, clock = site
    with CoordinatorClient(address) as client:
        joined = [
            client.join(signed_join(name=name, device="cpu", now=clock[0], who=who))
            for name, who in ((EVIL, 801), ("bob", 802))
        ]
        for j, dht_id in zip(joined, (A_ID, B_ID), strict=True):
            client.heartbeat(
                pb.HeartbeatRequest(
                    session_id=j.session_id,
                    session_token=j.session_token,
                    phase="training",
                    samples_per_s=5,
                    dht_peer_id=dht_id,
                )
            )
            # as if proven with its hivemind key (tests/test_hostile_peers.py): only then it is credited
            store.upsert_peer(dataclasses.replace(store.get_peer(j.session_id), dht_verified=True))
        client.leave(joined[1].session_id, joined[1].session_token, "bye")
    store.add_contributions([(A_ID, 1, 100), (A_ID, 2, 50), (B_ID, 1, 30)])
    staging = new_staging_dir(root, 3)
    (staging / "f").write_text("x")
    finalize(staging, root, CheckpointMeta("ct_test", 3, 768, 4.25, 1990.0, "m", None, ()))

    store.add_rejection(1995.0, 4, "eval loss 9.0 is worse than the last published 4.25")
    state = json.loads(get(f"{base}/api/v1/state")[2])
    assert state["last_rejection"] == "step 4: eval loss 9.0 is worse than the last published 4.25"
    assert json.loads(get(f"{base}/api/v1/rejections")[2])[0]["step"] == 4
    families = {f.name: f for f in text_string_to_metric_families(get(f"{base}/metrics")[2].decode())}
    by_state = {s.labels["state"]: s.value for s in families["crowdtrain_peers"].samples}
    assert by_state == {k: float(v) for k, v in state["peers_by_state"].items()}
    assert by_state["ONLINE"] == 1 and by_state["LEFT"] == 1
    scalar = {name: families[name].samples[0].value for name in families if len(families[name].samples) == 1}
    assert scalar["crowdtrain_global_epoch"] == state["global_epoch"] == 7
    assert scalar["crowdtrain_swarm_samples_per_second"] == state["samples_per_s"] == 123.5
    assert scalar["crowdtrain_eval_loss"] == state["latest_eval_loss"] == 4.25
    assert scalar["crowdtrain_checkpoints"] == state["checkpoints"] == 1
    assert scalar["crowdtrain_rejected_checkpoints"] == state["rejected_checkpoints"] == 1
    assert scalar["crowdtrain_contributed_samples"] == state["total_contributed_samples"] == 180
    latency = {s.name: s.value for s in families["crowdtrain_heartbeat_latency_seconds"].samples}
    assert latency["crowdtrain_heartbeat_latency_seconds_count"] == 2

    peers = json.loads(get(f"{base}/api/v1/peers")[2])
    assert {p["name"] for p in peers} == {EVIL, "bob"}  # JSON carries the raw name; views escape it
    leaders = json.loads(get(f"{base}/api/v1/contributors")[2])
    assert [(r["name"], r["samples"]) for r in leaders] == [(EVIL, 150), ("bob", 30)]
    history = json.loads(get(f"{base}/api/v1/history")[2])
    assert history["eval"] == [{"t": 1990.0, "step": 3, "eval_loss": 4.25}]


def test_grpc_status_matches_the_json_api(site):
    base, address, store, _, clock = site
    with CoordinatorClient(address) as client:
        joined = client.join(signed_join(name="carol", device="cuda:0", version="0.1.0", now=clock[0]))
        client.heartbeat(
            pb.HeartbeatRequest(
                session_id=joined.session_id,
                session_token=joined.session_token,
                phase="loading_state",
                samples_total=1234,
                uptime_s=754.0,
                swarm_size=5,
            )
        )
        status = client.get_status()
    assert status.summary.global_epoch == 7 and status.summary.peers_by_state["JOINING"] == 1
    [peer] = status.peers
    assert (peer.name, peer.state, peer.reason, peer.device) == (
        "carol",
        "JOINING",
        "loading state",
        "cuda:0",
    )
    assert math.isnan(status.summary.latest_eval_loss) and status.summary.latest_checkpoint_step == -1
    from crowdtrain.coordinator.dashboard.render import format_status

    table = format_status(status, now=clock[0] + 3)
    assert "carol" in table and "JOINING" in table and "3s ago" in table and "1234" in table
    assert peer.version == "0.1.0" and "versions: 0.1.0 x1" in table  # the operator sees who runs what
    header, row = table.splitlines()[-2:]
    assert re.search(r"SWARM\s+UPTIME\s+LAST SEEN$", header) and re.search(r"\s5\s+13m\s+3s ago$", row)
    assert (peer.computed_samples, peer.swarm_size, peer.uptime_s) == (1234, 5, 754.0)
    [carol] = [p for p in json.loads(get(f"{base}/api/v1/peers")[2]) if p["name"] == "carol"]
    assert (carol["computed_samples"], carol["swarm_size"], carol["uptime_s"]) == (1234, 5, 754.0)
    assert carol["phase"] == "loading_state" and carol["version"] == "0.1.0"


def test_dashboard_is_self_contained(site):
    base = site[0]
    status, content_type, body = get(f"{base}/")
    assert status == 200 and content_type.startswith("text/html")
    html = body.decode()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html, (
        "external resource"
    )
    js = get(f"{base}/static/app.js")[2].decode()
    assert "innerHTML" not in js, "peer-supplied text must never be parsed as HTML"
    assert get(f"{base}/static/style.css")[0] == 200
    with pytest.raises(urllib.error.HTTPError):
        get(f"{base}/static/..%2Fwebserver.py")


def test_a_volunteer_bookmarks_its_own_page_by_public_or_hivemind_id(site):
    base, address, store, root, clock = site
    with CoordinatorClient(address) as client:
        joined = [
            client.join(signed_join(name=name, device="cpu", now=clock[0], who=who))
            for name, who in ((EVIL, 801), ("bob", 802), ("carol", 803))
        ]
        for j, dht_id, paused in zip(joined, (A_ID, B_ID, ""), (1, 0, 0), strict=True):
            client.heartbeat(
                pb.HeartbeatRequest(
                    session_id=j.session_id,
                    session_token=j.session_token,
                    phase="paused" if paused else "training",
                    pause_reason="on battery" if paused else "",
                    dht_peer_id=dht_id,
                    shard_index=1,
                    shard_position=8,
                    shard_sequences=40,
                )
            )
            if dht_id:  # as if proven with its hivemind key (tests/test_hostile_peers.py)
                store.upsert_peer(dataclasses.replace(store.get_peer(j.session_id), dht_verified=True))
    store.add_contributions([(A_ID, 1, 300), (B_ID, 1, 100)])
    for key in (joined[0].peer_id, A_ID):
        page = json.loads(get(f"{base}/api/v1/peers/{key}")[2])
        assert page["peer"]["name"] == EVIL and page["peer"]["state"] == "PAUSED"
        assert page["peer"]["reason"] == "paused: on battery" and page["peer"]["shard_position"] == 8
        assert page["standing"] == {
            "accepted_samples": 300,
            "share": 0.75,
            "rank": 1,
            "ranked_peers": 2,
            "credited": True,
        }
    bob = json.loads(get(f"{base}/api/v1/peers/{joined[1].peer_id}")[2])["standing"]
    assert (bob["rank"], bob["accepted_samples"]) == (2, 100)
    carol = json.loads(get(f"{base}/api/v1/peers/{joined[2].peer_id}")[2])["standing"]
    assert (carol["credited"], carol["rank"]) == (False, 0)  # nothing proven, nothing credited
    status, content_type, body = get(f"{base}/peer/QmAqqq22222222222222222222")
    assert status == 200 and content_type.startswith("text/html") and b"/static/peer.js" in body
    assert "innerHTML" not in get(f"{base}/static/peer.js")[2].decode()
    assert json.loads(get(f"{base}/api/v1/state")[2])["peers_by_state"]["PAUSED"] == 1
    # unknown, malformed or path-like ids are not found (answered as plain text, never as a page)
    for key in ("QmNqqq44444444444444444444", "..%2F..%2Fetc", "a" * 65, EVIL.replace(" ", "%20"), "0" * 11):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(f"{base}/api/v1/peers/{key}")
        assert e.value.code == 404 and e.value.headers["Content-Type"].startswith("text/plain")
        with pytest.raises(urllib.error.HTTPError):
            get(f"{base}/peer/{key}/x")


def test_status_rpc_without_a_status_source_is_unimplemented(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 1, "http://x", tmp_path), store, HealthSettings(1, 2), initial_peers=list
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    try:
        with (
            CoordinatorClient(f"127.0.0.1:{port}") as client,
            pytest.raises(CoordinatorRejected, match="UNIMPLEMENTED"),
        ):
            client.get_status()
    finally:
        server.stop(0).wait()
        store.close()


def test_history_reads_only_the_rows_it_returns_spread_over_the_whole_run(tmp_path: Path):
    """Before: every rebuild of /api/v1/history read every row, then kept 2,000 (1.9 s of CPU at
    1 M rows, about two months of a run); SQLite's instruction count shows what a query touched."""
    store = Store(tmp_path / "h.sqlite3", flush_interval_s=0)
    try:
        assert store.history() == []
        store.append_history(1.0, 0, 0.0, 0, None)
        assert [p["t"] for p in store.history()] == [1.0]
        rows = 200_000
        with store._db_lock:
            store._db.execute("BEGIN")
            store._db.executemany(
                "INSERT INTO history VALUES (?, ?, ?, ?, ?)",
                ((2.0 + i, i, 10.0, 3, 4.5) for i in range(rows - 1)),
            )
            store._db.execute("COMMIT")
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0  # go on

        store._db.set_progress_handler(count, 100)  # called every 100 SQLite VM instructions
        points = store.history()
        store._db.set_progress_handler(None, 100)
        times = [p["t"] for p in points]
        assert len(points) == 2000 and times == sorted(times) and (times[0], times[-1]) == (1.0, rows)
        gaps = {b - a for a, b in zip(times, times[1:], strict=False)}
        assert max(gaps) - min(gaps) <= 1  # evenly spread
        assert steps[0] * 100 < 150 * len(points), f"{steps[0] * 100} instructions for {len(points)} points"
        assert [p["t"] for p in store.history(max_points=3)] == [1.0, (rows + 1) // 2, rows]
    finally:
        store.close()


def test_metrics_follow_the_prometheus_naming_conventions(site):
    """Before: the ledger's cumulative count was a gauge without `_total`, and there was no
    `_info` metric and no count of peers by version."""
    base, address, store, _, clock = site
    with CoordinatorClient(address) as client:
        client.join(signed_join(name="carol", device="cpu", version="0.1.0", now=clock[0]))
    store.add_contributions([(A_ID, 1, 40)])
    text = get(f"{base}/metrics")[2].decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    counters = [name for name, kind in types.items() if kind == "counter"]
    assert counters == ["crowdtrain_contributed_samples_total"]  # the only count that never goes down
    assert types["crowdtrain_checkpoints"] == "gauge"  # retention deletes old checkpoints
    assert "crowdtrain_contributed_samples_total 40.0" in text.splitlines()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [info] = families["crowdtrain_build_info"].samples
    assert (info.labels, info.value) == ({"version": __version__, "run_id": "ct_test"}, 1.0)
    by_state = {s.labels["state"]: s.value for s in families["crowdtrain_peers"].samples}
    assert by_state["JOINING"] == 1 and by_state["ONLINE"] == 0  # a state with no peer is 0, not absent
    by_version = {s.labels["version"]: s.value for s in families["crowdtrain_peers_by_version"].samples}
    assert by_version == {"0.1.0": 1.0}
    assert families["crowdtrain_latest_checkpoint_step"].samples[0].value == -1  # none yet


def test_peer_versions_become_bounded_metric_labels(site):
    """Versions are whatever peers send: malformed, long or rare ones are counted as "other", so
    a hostile peer cannot add time series to the operator's Prometheus."""
    _, address, store, _, clock = site
    with CoordinatorClient(address) as client:
        client.join(signed_join(name="carol", device="cpu", version="0.1.0", now=clock[0]))
    status = build_status(
        clock[0], "ct_test", store.list_peers(), {}, HealthSettings(2.0, 10.0, 20.0), SwarmProgress(), []
    )
    [carol] = status.peers
    hostile = ["1.2.3-evil", "1.2.3\n", "x" * 40, "", "\uff11.\uff12.\uff13", "1.2." + "3" * 40, '1"} 1\n']
    versions = ["0.1.0"] * 5 + [f"1.0.{i}" for i in range(25)] + hostile
    peers = [dataclasses.replace(carol, version=v, peer_id=f"p{i}") for i, v in enumerate(versions)]
    peers.append(dataclasses.replace(carol, version="9.9.9", state="DEAD"))  # not present: not counted
    metrics = CoordinatorMetrics(lambda: dataclasses.replace(status, peers=tuple(peers)))
    text = generate_latest(metrics.registry).decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "crowdtrain_peers_by_version"]
    by_version = {s.labels["version"]: s.value for s in family.samples}
    assert len(by_version) == 21 and by_version["0.1.0"] == 5  # 20 versions, the most common first
    assert by_version["other"] == 6 + len(hostile) and sum(by_version.values()) == len(versions)
    assert all(v == "other" or re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", v) for v in by_version)
    assert "9.9.9" not in by_version
    assert VersionLabels(max_versions=1).count(["1.0.0", "2.0.0", "2.0.0"]) == {"2.0.0": 2, "other": 1}
    assert VersionLabels().count([]) == {}


def test_readyz_answers_ready_only_while_the_grpc_api_serves(tmp_path: Path):
    """/readyz is cheap (it never builds the status: here building it fails) and rate limited like
    every other answer."""

    def no_status():
        raise AssertionError("/readyz built the status")

    store = Store(tmp_path / "s.sqlite3")
    limits = HttpLimits(requests_burst=6, requests_per_s_per_address=0.01)
    context = WebContext(tmp_path, frozenset(), tmp_path / "ckpt", "{}", store, no_status)
    web = WebServer(context, "127.0.0.1", 0, limits).start()
    url = f"http://127.0.0.1:{web.port}/readyz"
    try:
        with pytest.raises(urllib.error.HTTPError) as before:
            get(url)
        assert before.value.code == 503 and before.value.headers["Retry-After"] == "2"
        assert before.value.read() == b"not ready: the gRPC API is not up yet\n"
        web.announce_grpc("203.0.113.5:50051", tls=False)
        assert get(url) == (200, "text/plain", b"ready\n")
        head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10)
        assert head.status == 200
        web.withdraw("the coordinator is\nshutting down")
        with pytest.raises(urllib.error.HTTPError) as after:
            get(url)
        assert (
            after.value.code == 503 and after.value.read() == b"not ready: the coordinator is shutting down\n"
        )
        statuses = []
        for _ in range(3):
            try:
                statuses.append(get(url)[0])
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        assert statuses == [503, 503, 429]  # the burst of 6 is spent
    finally:
        web.shutdown()
        store.close()


def test_data_read_never_goes_down_as_shards_get_sized():
    """The review saw 91%, 94% then 62% within minutes: the share's denominator grew as shards
    got sized. Now a share appears only once every shard is sized, and never falls after."""
    from crowdtrain.coordinator.dashboard.numbers import data_read, read_card, read_note
    from crowdtrain.coordinator.peers.shardbook import Coverage

    # (read, total known, shards sized) as peers read on and report shard sizes, 8 shards
    seen = [(91, 100, 1), (188, 200, 2), (250, 265, 3), (400, 640, 7), (520, 800, 8), (560, 800, 8)]
    shares = [Coverage(read, total, 8, sized).share for read, total, sized in seen]
    assert shares[:4] == [None] * 4 and shares[4:] == [0.65, 0.7]
    assert (read_card(Coverage(91, 100, 8, 1)), read_note(Coverage(91, 100, 8, 1))) == (
        "91 seq",
        "1 of 8 shards sized; a share once all are",
    )
    assert read_card(Coverage(560, 800, 8, 8)) == "70.0%" and read_card(Coverage(1200, 800, 8, 8)) == "150.0%"
    summary = pb.SwarmSummary(dataset_shards=8)  # no shard sized yet: nothing to show
    assert data_read(summary) is None


def test_the_epoch_shown_is_the_latest_known():
    """The swarm left (its records expired: epoch 0) while checkpoint 64 is published: 64, said so."""
    from crowdtrain.coordinator.dashboard.numbers import dashboard_numbers, epoch_shown

    assert epoch_shown(0, 64) == epoch_shown(12, 64) and epoch_shown(0, 64).source == "checkpoint"
    assert (epoch_shown(70, 64).epoch, epoch_shown(70, 64).source) == (70, "swarm")
    assert (epoch_shown(0, -1).epoch, epoch_shown(0, -1).source) == (0, "swarm")  # nothing published yet
    numbers = dashboard_numbers(pb.SwarmSummary(global_epoch=0, latest_checkpoint_step=64, samples_per_s=2))
    assert (numbers["epoch"], numbers["epoch_source"], numbers["data_read"]) == (64, "checkpoint", None)
    assert "progress records" in numbers["swarm_throughput_label"]
    assert "heartbeat" in numbers["peer_throughput_label"]


def test_join_box_commands_use_the_real_flags():
    """The join and pull commands parse with the real `crowdtrain` parser, flag for flag."""
    from crowdtrain.coordinator.cli import build_parser
    from crowdtrain.coordinator.dashboard.join import JoinFacts, join_json, pull_command

    facts = JoinFacts("203.0.113.7:50051", False, 8080, 40123, "invite", "ab" * 32)
    box = join_json(facts)
    assert box["join_command"] == "crowdtrain peer --coordinator 203.0.113.7:50051"
    assert box["invite_command"] == "crowdtrain peer --coordinator 203.0.113.7:50051 --invite CODE"
    assert [(p["name"], p["port"]) for p in box["ports"]] == [("gRPC", 50051), ("HTTP", 8080), ("DHT", 40123)]
    pull = pull_command(facts, 64)
    assert box["pull_command"].replace("STEP", "64") == pull
    parser = build_parser()
    args = parser.parse_args(pull.split()[1:])
    assert (args.coordinator, args.step, args.out, args.public_key) == (
        "203.0.113.7:50051",
        64,
        "./model",
        "ab" * 32,
    )
    args = parser.parse_args(box["invite_command"].replace("CODE", "x1").split()[1:])
    assert (args.coordinator, args.invite) == ("203.0.113.7:50051", "x1")
    tls = join_json(JoinFacts("[::1]:1", True, 2, 0, "open", ""))
    assert tls["invite_command"] == "" and [p["name"] for p in tls["ports"]] == ["gRPC", "HTTP"]
    assert tls["join_command"] == "crowdtrain peer --coordinator '[::1]:1' --tls"
    assert "--public-key" not in tls["pull_command"]  # a run without a key: nothing to pin


def test_join_box_is_served_once_the_grpc_api_is_announced(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    manifest = json.dumps({"signing_public_key": "cd" * 32})
    web = WebServer(
        WebContext(tmp_path, frozenset(), tmp_path, manifest, store, lambda: None), "127.0.0.1", 0
    )
    with web:
        base = f"http://127.0.0.1:{web.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            get(f"{base}/api/v1/join")
        assert e.value.code == 503
        web.announce_grpc("198.51.100.1:50051", False, dht_port=4000, admission="open")
        box = json.loads(get(f"{base}/api/v1/join")[2])
    store.close()
    assert box["run_key"] == "cd" * 32 and box["join_command"].endswith("--coordinator 198.51.100.1:50051")
    assert {p["name"]: p["port"] for p in box["ports"]} == {"gRPC": 50051, "HTTP": web.port, "DHT": 4000}
    assert box["pull_command"].endswith("--step STEP --out ./model --public-key " + "cd" * 32)


def test_dashboard_numbers_are_served_beside_the_state(site):
    base = site[0]
    numbers = json.loads(get(f"{base}/api/v1/dashboard")[2])
    state = json.loads(get(f"{base}/api/v1/state")[2])
    assert (numbers["epoch"], numbers["epoch_source"]) == (state["global_epoch"], "swarm") == (7, "swarm")
    assert numbers["swarm_samples_per_s"] == state["samples_per_s"] == 123.5
