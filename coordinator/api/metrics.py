"""Prometheus metrics at /metrics, computed from the same SwarmStatus as the JSON API.

Named by Prometheus' conventions: a count that only grows is a counter ending in `_total`, a level
that can go down is a gauge, and build facts are an `_info` gauge of value 1. docs/monitoring.md
lists every metric with its labels and gives alert rules.

crowdtrain_build_info{version,run_id}       1: this coordinator's crowdtrain version and its run
crowdtrain_peers{state="ONLINE"}            peers by state (every state, 0 included)
crowdtrain_peers_by_version{version}        present peers (joining, online, paused, stale) by the
                                            crowdtrain version they report, bounded (`VersionLabels`)
crowdtrain_swarm_samples_per_second         sum of the peers' reported throughput
crowdtrain_global_epoch                     the swarm's epoch
crowdtrain_eval_loss                        held-out loss of the latest checkpoint (absent before one)
crowdtrain_latest_checkpoint_step           step of the latest checkpoint (-1 before one)
crowdtrain_checkpoints                      published checkpoints kept (retention deletes old ones)
crowdtrain_rejected_checkpoints             recent states refused by the publisher's checks (capped)
crowdtrain_contributed_samples_total        samples in the contribution ledger (counter)
crowdtrain_heartbeat_latency_seconds        time to handle one heartbeat (histogram)

`checkpoints` and `rejected_checkpoints` stay gauges: retention deletes old checkpoints and the
store answers only the newest refusals, so neither only grows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable

from crowdtrain.coordinator.peers.status import SwarmStatus
from crowdtrain.peer import __version__
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PRESENT_STATES = ("JOINING", "ONLINE", "PAUSED", "STALE")  # as `crowdtrain status` counts versions
OTHER_VERSION = "other"
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")  # [0-9]: ASCII digits only, unlike \d


@dataclasses.dataclass(frozen=True)
class VersionLabels:
    """Bounds on the `version` label of `crowdtrain_peers_by_version`. Versions come from peers,
    so anyone could send a new one per join: only well-formed `X.Y.Z` of at most
    `max_version_chars` become labels, at most `max_versions` of them (the most common), and every
    other peer is counted under `version="other"`."""

    max_versions: int = 20
    max_version_chars: int = 32

    def well_formed(self, version: str) -> bool:
        return len(version) <= self.max_version_chars and _VERSION.fullmatch(version) is not None

    def count(self, versions: Iterable[str]) -> dict[str, int]:
        """{label: peers}; at most `max_versions` version labels plus OTHER_VERSION."""
        seen = Counter(versions)
        good = sorted(((-n, v) for v, n in seen.items() if self.well_formed(v)))[: self.max_versions]
        labels = {v: -negative for negative, v in good}
        other = sum(seen.values()) - sum(labels.values())
        if other:
            labels[OTHER_VERSION] = other
        return labels


class _StatusCollector:
    def __init__(self, status: Callable[[], SwarmStatus], version: str, version_labels: VersionLabels):
        self.status, self.version, self.version_labels = status, version, version_labels

    def describe(self):
        return []  # metrics are computed on scrape; nothing to pre-register

    def collect(self):
        status = self.status()
        summary = status.summary
        info = GaugeMetricFamily(
            "crowdtrain_build_info",
            "This coordinator's crowdtrain version and run",
            labels=["version", "run_id"],
        )
        info.add_metric([self.version, summary.run_id], 1)
        yield info
        peers = GaugeMetricFamily("crowdtrain_peers", "Peers by state", labels=["state"])
        for state, count in sorted(summary.peers_by_state.items()):
            peers.add_metric([state], count)
        yield peers
        by_version = GaugeMetricFamily(
            "crowdtrain_peers_by_version",
            "Present peers (joining, online, paused, stale) by the crowdtrain version they report; "
            f"malformed or rare versions count as {OTHER_VERSION!r}",
            labels=["version"],
        )
        present = (p.version for p in status.peers if p.state in PRESENT_STATES)
        for version, count in sorted(self.version_labels.count(present).items()):
            by_version.add_metric([version], count)
        yield by_version
        yield from _swarm_metrics(status)


def _swarm_metrics(status: SwarmStatus):
    summary = status.summary
    yield GaugeMetricFamily(
        "crowdtrain_swarm_samples_per_second",
        "Sum of the peers' reported throughput",
        value=summary.samples_per_s,
    )
    yield GaugeMetricFamily("crowdtrain_global_epoch", "The swarm's epoch", value=summary.global_epoch)
    if math.isfinite(summary.latest_eval_loss):
        yield GaugeMetricFamily(
            "crowdtrain_eval_loss",
            "Held-out loss of the latest checkpoint (nats/token)",
            value=summary.latest_eval_loss,
        )
    yield GaugeMetricFamily(
        "crowdtrain_latest_checkpoint_step",
        "Step of the latest published checkpoint (-1 before the first)",
        value=summary.latest_checkpoint_step,
    )
    yield GaugeMetricFamily(
        "crowdtrain_checkpoints",
        "Published checkpoints kept on disk (retention deletes old ones)",
        value=summary.checkpoints,
    )
    yield GaugeMetricFamily(
        "crowdtrain_rejected_checkpoints",
        "Recent states the publisher refused to publish (only the newest are counted)",
        value=summary.rejected_checkpoints,
    )
    yield CounterMetricFamily(
        "crowdtrain_contributed_samples_total",
        "Samples in the contribution ledger",
        value=summary.total_contributed_samples,
    )


class CoordinatorMetrics:
    def __init__(
        self,
        status: Callable[[], SwarmStatus],
        version: str = __version__,
        version_labels: VersionLabels = VersionLabels(),
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status, version, version_labels))
        self.heartbeat_latency = Histogram(
            "crowdtrain_heartbeat_latency_seconds",
            "Time to handle one heartbeat inside the coordinator",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
