"""Health tracking end to end: real coordinator and peers, the dashboard in a real headless Chromium.

One scenario, in order: two peers (one named like an XSS payload) show ONLINE; one is killed with
kill -9 and shows DEAD within two heartbeat timeouts; the charts have points on one time axis; the
join box and each checkpoint's pull command carry the real address and run key; the payload renders as
text; /metrics agrees with the JSON API; `crowdtrain status` prints the table; the coordinator is
killed with kill -9 and restarted on the same data dir with its history, ledger and peers intact,
while the surviving peer trains on and reconnects; a clean exit shows LEFT at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from crowdtrain.coordinator.demo import cli_command
from prometheus_client.parser import text_string_to_metric_families

from scripts.harness import events_named
from tests.helpers import ARTIFACTS

pytestmark = pytest.mark.swarm
EVIL = "<img src=x onerror=alert(1)>"
HEARTBEAT_TIMEOUT_S = 6.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def api(base: str, name: str):
    with urllib.request.urlopen(f"{base}/api/v1/{name}", timeout=10) as response:
        return json.loads(response.read())


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def states(base: str) -> dict[str, str]:
    return {p["name"]: p["state"] for p in api(base, "peers")}


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)"
)
def test_dashboard_health_and_coordinator_crash(launcher, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    data_dir = tmp_path / "coordinator"
    coordinator_args = (
        "--checkpoint-interval-s",
        "8",
        "--heartbeat-interval-s",
        "1",
        "--heartbeat-timeout-s",
        str(HEARTBEAT_TIMEOUT_S),
        "--contribution-grace-s",
        "40",
    )
    coordinator = launcher.start_coordinator(data_dir, *coordinator_args)
    endpoints = launcher.wait_for_endpoints(data_dir, coordinator)
    base = endpoints["http"]

    alice = launcher.start_peer("alice", endpoints["grpc"], tmp_path / "cache", label="peer-alice")
    evil = launcher.start_peer(EVIL, endpoints["grpc"], tmp_path / "cache", label="peer-evil")
    wait_until(lambda: states(base) == {"alice": "ONLINE", EVIL: "ONLINE"}, 300, "both peers ONLINE")
    wait_until(lambda: api(base, "checkpoints"), 180, "a published checkpoint")
    wait_until(
        lambda: all(p["contributing"] for p in api(base, "peers")), 60, "both peers in the DHT records"
    )

    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/?refresh=1000")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            page.wait_for_function(
                "document.querySelectorAll('#peers tr[data-state=ONLINE]').length === 2", timeout=60_000
            )
            names = page.locator("#peers td.name").all_text_contents()
            assert sorted(names) == sorted(["alice", EVIL]), names
            assert page.locator("#peers img").count() == 0, "a peer name was parsed as HTML"

            # --- kill -9 one peer (its whole process group, like a machine that vanished)
            killed_at = time.monotonic()
            os.killpg(evil.proc.pid, signal.SIGKILL)
            wait_until(
                lambda: states(base).get(EVIL) == "DEAD", 2 * HEARTBEAT_TIMEOUT_S + 5, "the killed peer DEAD"
            )
            detect_s = time.monotonic() - killed_at
            assert detect_s <= 2 * HEARTBEAT_TIMEOUT_S + 2
            page.wait_for_function(
                "document.querySelectorAll('#peers tr[data-state=DEAD]').length === 1", timeout=10_000
            )
            page.wait_for_function(
                "document.querySelectorAll('#chart-throughput circle.point').length > 1 && "
                "document.querySelectorAll('#chart-loss circle.point').length > 1",
                timeout=60_000,
            )
            assert page.locator("#checkpoints tbody tr").count() >= 1

            # --- what a newcomer copies: the join command with the announced address, the run key,
            # and a pull command pinned to that key for each checkpoint
            run_key, step = api(base, "run")["signing_public_key"], api(base, "checkpoints")[-1]["step"]
            assert len(run_key) == 64 and page.locator("#run-key").text_content() == run_key
            join = page.locator("#join-command").text_content()
            assert join == f"crowdtrain peer --coordinator {endpoints['grpc']}", join
            page.wait_for_selector(f"#checkpoints tr[data-step='{step}'] code", timeout=10_000)
            assert page.locator(f"#checkpoints tr[data-step='{step}'] code").text_content() == (
                f"crowdtrain pull --coordinator {endpoints['grpc']} --step {step} --out ./model --public-key {run_key}"
            )
            # --- both charts over one window, on one time axis, with values under the mouse
            ticks = page.evaluate(
                "['chart-throughput', 'chart-loss'].map((id) =>"
                " [...document.querySelectorAll(`#${id} text.tick-x`)].map((t) => t.textContent))"
            )
            assert len(ticks[0]) == 5 and ticks[0] == ticks[1], ticks
            page.hover("#chart-throughput rect", position={"x": 200, "y": 40})
            assert "held-out" in page.locator("#chart-loss .cursor-label").text_content()
            assert page.locator("#contributors tbody tr").count() == 2
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert page.locator("#peers img").count() == 0

            # --- each peer's own page, linked from its row: what a volunteer bookmarks
            page.click("#peers td.name a >> text=alice")
            page.wait_for_function(
                "document.getElementById('peer-name').textContent === 'alice'", timeout=30_000
            )
            assert page.locator("#peer-state").text_content() == "ONLINE"
            evil_id = next(p["peer_id"] for p in api(base, "peers") if p["name"] == EVIL)
            page.goto(f"{base}/peer/{evil_id}")
            page.wait_for_function(
                "document.getElementById('peer-state').textContent === 'DEAD'", timeout=30_000
            )
            assert page.locator("#peer-name").text_content() == EVIL and page.locator("img").count() == 0
        finally:
            browser.close()
    assert dialogs == [], f"script ran from a peer name: {dialogs}"

    # --- /metrics agrees with the JSON API on the live coordinator
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    state = api(base, "state")
    assert {s.labels["state"]: s.value for s in families["crowdtrain_peers"].samples} == {
        k: float(v) for k, v in state["peers_by_state"].items()
    }
    assert families["crowdtrain_checkpoints"].samples[0].value >= 1

    # --- the operator's table
    result = subprocess.run(
        cli_command("status", "--coordinator", endpoints["grpc"]), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"alice\s+ONLINE", result.stdout) and EVIL in result.stdout and "DEAD" in result.stdout

    # --- kill -9 the coordinator mid-run; the surviving peer trains on; restart on the same data dir
    before_peers = {p["peer_id"]: p for p in api(base, "peers")}
    before_ledger = {r["dht_peer_id"]: r["samples"] for r in api(base, "contributors")}
    before_history = api(base, "history")
    before_checkpoints = [c["step"] for c in api(base, "checkpoints")]
    assert sum(before_ledger.values()) > 0 and len(before_history["swarm"]) >= 2
    os.killpg(coordinator.proc.pid, signal.SIGKILL)
    coordinator.proc.wait()
    epochs_seen = len(events_named(alice, "epoch"))
    launcher.wait_for_event(alice, "epoch", timeout_s=120, start=len(alice.events))
    restarted = launcher.start_coordinator(data_dir, *coordinator_args, name="coordinator-restarted")
    launcher.wait_for_event(restarted, "coordinator_ready", timeout_s=300)
    new_endpoints = json.loads((data_dir / "endpoints.json").read_text())
    assert (new_endpoints["grpc"], new_endpoints["http"]) == (endpoints["grpc"], endpoints["http"]), (
        "ports changed"
    )
    assert len(events_named(alice, "epoch")) > epochs_seen, "training stopped"

    after_peers = {p["peer_id"]: p for p in api(base, "peers")}
    assert set(before_peers) <= set(after_peers)
    after_ledger = {r["dht_peer_id"]: r["samples"] for r in api(base, "contributors")}
    assert all(after_ledger.get(k, 0) >= v for k, v in before_ledger.items()), (before_ledger, after_ledger)
    after_history = api(base, "history")
    assert after_history["swarm"][: len(before_history["swarm"])] == before_history["swarm"]
    assert [c["step"] for c in api(base, "checkpoints")][: len(before_checkpoints)] == before_checkpoints
    wait_until(lambda: states(base).get("alice") == "ONLINE", 90, "alice ONLINE again after the restart")
    assert states(base)[EVIL] == "DEAD"

    # --- a clean exit is LEFT at once
    alice.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: states(base).get("alice") == "LEFT", 60, "alice LEFT after SIGTERM")
    assert alice.proc.wait(timeout=60) == 0
    (ARTIFACTS / "dashboard_summary.txt").write_text(
        f"killed peer detected DEAD after {detect_s:.1f}s (heartbeat timeout {HEARTBEAT_TIMEOUT_S:.0f}s); "
        f"ledger before restart {sum(before_ledger.values())} samples, after {sum(after_ledger.values())}; "
        f"history points before {len(before_history['swarm'])}, after {len(after_history['swarm'])}\n"
    )
