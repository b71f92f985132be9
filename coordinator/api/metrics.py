"""Prometheus metrics at /metrics, computed from the same SwarmStatus as the JSON API.

Named by Prometheus' conventions: a count that only grows is a counter ending in `_total`, a level
that can go down is a gauge, build facts are an `_info` gauge of 1, and every label takes a bounded
set of values. docs/monitoring.md lists each metric with its type and labels. `checkpoints` and
`rejected_checkpoints` stay gauges: retention deletes old checkpoints and the store answers only
the newest refusals, so neither only grows.
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
    """Bounds on the `version` label of `crowdtrain_peers_by_version`. Versions come from peers, so
    anyone could send a new one per join: only well-formed `X.Y.Z` of at most `max_version_chars`
    become labels, at most `max_versions` of them (the most common); the rest count as "other"."""

    max_versions: int = 20
    max_version_chars: int = 32

    def count(self, versions: Iterable[str]) -> dict[str, int]:
        """{label: peers}; at most `max_versions` version labels plus OTHER_VERSION."""
        seen = Counter(versions)
        good = [
            (-n, v) for v, n in seen.items() if len(v) <= self.max_version_chars and _VERSION.fullmatch(v)
        ]
        labels = {v: -negative for negative, v in sorted(good)[: self.max_versions]}
        if other := sum(seen.values()) - sum(labels.values()):
            labels[OTHER_VERSION] = other
        return labels


class _StatusCollector:
    def __init__(self, status: Callable[[], SwarmStatus], version: str, version_labels: VersionLabels):
        self.status, self.version, self.version_labels = status, version, version_labels

    def describe(self):
        return []  # metrics are computed on scrape; nothing to pre-register

    def collect(self):
        status = self.status()
        s = status.summary
        info = GaugeMetricFamily("crowdtrain_build_info", "Version and run", labels=["version", "run_id"])
        info.add_metric([self.version, s.run_id], 1)
        peers = GaugeMetricFamily("crowdtrain_peers", "Peers by state", labels=["state"])
        for state, count in sorted(s.peers_by_state.items()):
            peers.add_metric([state], count)
        text = f"Present peers by the version they report ({OTHER_VERSION!r}: malformed or rare)"
        by_version = GaugeMetricFamily("crowdtrain_peers_by_version", text, labels=["version"])
        present = (p.version for p in status.peers if p.state in PRESENT_STATES)
        for version, count in sorted(self.version_labels.count(present).items()):
            by_version.add_metric([version], count)
        yield from (info, peers, by_version)
        for name, text, value in (
            ("swarm_samples_per_second", "Sum of the peers' reported throughput", s.samples_per_s),
            ("global_epoch", "The swarm's epoch", s.global_epoch),
            ("eval_loss", "Held-out loss of the latest checkpoint (nats/token)", s.latest_eval_loss),
            ("latest_checkpoint_step", "Latest checkpoint's step (-1: none)", s.latest_checkpoint_step),
            ("checkpoints", "Published checkpoints kept (retention deletes old ones)", s.checkpoints),
            ("rejected_checkpoints", "Recent states the publisher refused", s.rejected_checkpoints),
        ):
            if math.isfinite(value):  # eval_loss is NaN, so absent, before the first checkpoint
                yield GaugeMetricFamily(f"crowdtrain_{name}", text, value=value)
        text = "Samples in the contribution ledger"
        yield CounterMetricFamily("crowdtrain_contributed_samples_total", text, s.total_contributed_samples)


class CoordinatorMetrics:
    def __init__(
        self,
        status: Callable[[], SwarmStatus],
        version: str = __version__,
        labels: VersionLabels = VersionLabels(),
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status, version, labels))
        self.heartbeat_latency = Histogram(
            "crowdtrain_heartbeat_latency_seconds",
            "Time to handle one heartbeat inside the coordinator",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
