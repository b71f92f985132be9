"""What operators monitor with: docs/alerts.yml and docs/grafana-dashboard.json parse, and every
metric they name is one a real /metrics scrape serves; with promtool (Debian's prometheus package,
scripts/test.sh installs it), `promtool check metrics` on that scrape, `promtool check rules` on the
alerts and on the dashboard's queries, and `promtool test rules`: the alerts fire when they should."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.metrics import CoordinatorMetrics
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.status import SwarmProgress, build_status
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.coordinator.signing import new_key
from crowdtrain.peer.checkpoints.format import CheckpointMeta, list_checkpoints
from crowdtrain.peer.link.client import CoordinatorClient
from prometheus_client.parser import text_string_to_metric_families

from tests.identities import signed_join

DOCS = Path(__file__).resolve().parent.parent / "docs"
ALERTS = DOCS / "alerts.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"
METRIC = re.compile(r"\bcrowdtrain_[a-z0-9_]+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus; scripts/test.sh does as root)",
)


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> str:
    """The text of /metrics from an in-process coordinator with a joined peer, a published
    checkpoint and a handled heartbeat: every metric family has samples."""
    tmp = tmp_path_factory.mktemp("coordinator")
    store, root, now = Store(tmp / "s.sqlite3"), tmp / "ckpt", 2000.0
    health = HealthSettings(2.0, 10.0, 20.0)
    staging = archive.new_staging_dir(root, 3)
    (staging / "model.safetensors").write_bytes(b"weights")
    archive.finalize(
        staging, root, CheckpointMeta("ct_test", 3, 768, 4.5, 1.0, "m", None, ()), signing_key=new_key()
    )
    progress = SwarmProgress(global_epoch=7, samples_per_s=123.5, num_peers=1, read_unix_s=now)

    def status():
        return build_status(
            now,
            "ct_test",
            store.list_peers(),
            store.contribution_totals(),
            health,
            progress,
            list_checkpoints(root),
            store.rejections(),
        )

    metrics = CoordinatorMetrics(status)
    web = WebServer(WebContext(tmp, frozenset(), root, "{}", store, status, metrics), "127.0.0.1", 0).start()
    servicer = CoordinatorServicer(
        RunInfo("{}", "x", "{}", 2, "http://x", root), store, health, list, clock=lambda: now, status=status
    )
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    try:
        with CoordinatorClient(f"127.0.0.1:{port}") as client:
            client.join(signed_join(name="carol", device="cpu", version="0.1.0", now=now))
        metrics.heartbeat_latency.observe(0.003)
        with urllib.request.urlopen(f"http://127.0.0.1:{web.port}/metrics", timeout=10) as response:
            return response.read().decode()
    finally:
        server.stop(0).wait()
        web.shutdown()
        store.close()


def _served(scrape: str) -> set[str]:
    """Every metric name a query can use: the families' and their samples' (`_bucket`, `_total`)."""
    families = list(text_string_to_metric_families(scrape))
    return {f.name for f in families} | {s.name for f in families for s in f.samples}


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_queries() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_the_scrape_has_samples_of_every_metric_docs_monitoring_lists(scrape: str):
    listed = set(re.findall(r"^\| `(crowdtrain_[a-z0-9_]+)`", (DOCS / "monitoring.md").read_text(), re.M))
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    assert "crowdtrain_build_info" in listed and "crowdtrain_peers_by_version" in listed
    for name in listed:
        family = families.get(name.removesuffix("_total"))  # the parser names a counter without it
        assert family is not None and family.samples, f"{name} is documented but not served with samples"
        kind = "counter" if name.endswith("_total") else family.type
        assert (family.type == "counter") == name.endswith("_total"), (name, kind)


def test_every_alert_is_well_formed_and_names_only_served_metrics(scrape: str):
    served, rules = _served(scrape), _rules()
    assert {r["alert"] for r in rules} >= {
        "CrowdtrainCoordinatorDown",
        "CrowdtrainNoCheckpointPublished",
        "CrowdtrainNoPeersOnline",
        "CrowdtrainEpochNotAdvancing",
        "CrowdtrainCheckpointRejections",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        names = set(METRIC.findall(rule["expr"]))
        assert names <= served, f"{rule['alert']} names {names - served}, which /metrics does not serve"
        assert names or "up{" in rule["expr"], rule["alert"]


def test_the_dashboard_is_importable_and_queries_only_served_metrics(scrape: str):
    dashboard, served = json.loads(DASHBOARD.read_text()), _served(scrape)
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert [i["pluginId"] for i in dashboard["__inputs"]] == ["prometheus"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried = {name for query in _dashboard_queries() for name in METRIC.findall(query)}
    assert queried <= served, f"the dashboard queries {queried - served}, which /metrics does not serve"
    wanted = {"crowdtrain_peers", "crowdtrain_swarm_samples_per_second", "crowdtrain_global_epoch"}
    assert (
        wanted | {"crowdtrain_latest_checkpoint_step", "crowdtrain_heartbeat_latency_seconds_bucket"}
        <= queried
    )
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["targets"], panel["title"]


def _promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_the_scrape_the_alerts_and_the_dashboard_queries(scrape: str, tmp_path: Path):
    assert _promtool("check", "metrics", stdin=scrape).strip() == ""  # no lint complaint at all
    assert f"SUCCESS: {len(_rules())} rules found" in _promtool("check", "rules", str(ALERTS))
    # the dashboard's queries as recording rules: promtool parses each as PromQL
    recorded = [
        {"record": f"crowdtrain:dashboard_query_{i}", "expr": q.replace("$instance", ".*")}
        for i, q in enumerate(_dashboard_queries())
    ]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": recorded}]}))
    assert f"SUCCESS: {len(recorded)} rules found" in _promtool(
        "check", "rules", str(tmp_path / "queries.yml")
    )


def _firing(alert: str, at: str, **labels: str) -> dict:
    """What `promtool test rules` should see firing: the rule's labels and rendered annotations."""
    [rule] = [r for r in _rules() if r["alert"] == alert]
    annotations = {
        k: v.replace("{{ $labels.instance }}", labels["instance"]) for k, v in rule["annotations"].items()
    }
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}],
    }


@needs_promtool
def test_the_alerts_fire_when_they_should_and_not_before(tmp_path: Path):
    job = {"job": "crowdtrain-coordinator", "instance": "c:8080"}
    where = 'job="crowdtrain-coordinator", instance="c:8080"'
    series = [
        {"series": f"up{{{where}}}", "values": "1 1 0x20"},  # the coordinator stops answering at 2m
        {"series": f'crowdtrain_peers{{{where}, state="ONLINE"}}', "values": "3x10 0x80"},  # all gone at 11m
        {"series": f"crowdtrain_global_epoch{{{where}}}", "values": "0+1x10 10x80"},  # stuck from 10m
    ]
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "CrowdtrainCoordinatorDown", "exp_alerts": []},
                    _firing("CrowdtrainCoordinatorDown", "5m", **job),
                    {"eval_time": "10m", "alertname": "CrowdtrainNoPeersOnline", "exp_alerts": []},
                    _firing("CrowdtrainNoPeersOnline", "17m", **job, state="ONLINE"),
                    # peers left at 11m: a stuck epoch without peers is not this alert's business
                    {"eval_time": "60m", "alertname": "CrowdtrainEpochNotAdvancing", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'crowdtrain_peers{{{where}, state="ONLINE"}}', "values": "3x90"},
                    {"series": f"crowdtrain_global_epoch{{{where}}}", "values": "0+1x10 10x80"},
                ],
                "alert_rule_test": [
                    {"eval_time": "50m", "alertname": "CrowdtrainEpochNotAdvancing", "exp_alerts": []},
                    _firing("CrowdtrainEpochNotAdvancing", "60m", **job),
                ],
            },
            {
                "interval": "1m",
                "input_series": [  # a checkpoint a minute until 20m, then none
                    {"series": f"crowdtrain_latest_checkpoint_step{{{where}}}", "values": "0+10x20 200x160"}
                ],
                "alert_rule_test": [
                    {"eval_time": "130m", "alertname": "CrowdtrainNoCheckpointPublished", "exp_alerts": []},
                    _firing("CrowdtrainNoCheckpointPublished", "145m", **job),
                ],
            },
        ],
    }
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
