"""Prometheus metrics at /metrics, computed from the same SwarmStatus as the JSON API.

crowdtrain_peers{state="ONLINE"}            peers by state
crowdtrain_swarm_samples_per_second         sum of the peers' reported throughput
crowdtrain_global_epoch                     the swarm's epoch
crowdtrain_eval_loss                        held-out loss of the latest checkpoint (absent before one)
crowdtrain_checkpoints                      published checkpoints
crowdtrain_rejected_checkpoints             states refused by the publisher's checks
crowdtrain_contributed_samples              samples in the contribution ledger
crowdtrain_heartbeat_latency_seconds        time to handle one heartbeat (histogram)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from crowdtrain.coordinator.peers.status import SwarmStatus
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily


class _StatusCollector:
    def __init__(self, status: Callable[[], SwarmStatus]):
        self.status = status

    def describe(self):
        return []  # metrics are computed on scrape; nothing to pre-register

    def collect(self):
        summary = self.status().summary
        peers = GaugeMetricFamily("crowdtrain_peers", "Peers by state", labels=["state"])
        for state, count in sorted(summary.peers_by_state.items()):
            peers.add_metric([state], count)
        yield peers
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
        yield GaugeMetricFamily("crowdtrain_checkpoints", "Published checkpoints", value=summary.checkpoints)
        yield GaugeMetricFamily(
            "crowdtrain_rejected_checkpoints",
            "States the publisher refused to publish",
            value=summary.rejected_checkpoints,
        )
        yield GaugeMetricFamily(
            "crowdtrain_contributed_samples",
            "Samples in the contribution ledger",
            value=summary.total_contributed_samples,
        )


class CoordinatorMetrics:
    def __init__(self, status: Callable[[], SwarmStatus]):
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status))
        self.heartbeat_latency = Histogram(
            "crowdtrain_heartbeat_latency_seconds",
            "Time to handle one heartbeat inside the coordinator",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
