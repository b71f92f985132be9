"""The run's headline numbers, each defined once: the dashboard (/api/v1/dashboard) and
`crowdtrain status` show these, never their own arithmetic. Pure.

- the epoch shown is the latest one known: the swarm's, from its progress records, or the latest
  published checkpoint's step (a checkpoint's step is the swarm epoch it was taken at) once the
  swarm's records are gone, so a swarm that left does not read "epoch 0" beside "step 64";
- the data read: `peers/shardbook.Coverage` (the model card's too), from the summary's fields;
- throughput: the swarm's is the sum of the rates in the swarm's progress records; a peer's row
  shows the rate in its own heartbeat; both are labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from crowdtrain.coordinator.peers.shardbook import Coverage

SWARM_THROUGHPUT_LABEL = "swarm samples/s (sum of the swarm's progress records)"
PEER_THROUGHPUT_LABEL = "samples/s the peer reports in its heartbeat"


@dataclass(frozen=True)
class EpochShown:
    epoch: int
    source: str  # "swarm": its progress records; "checkpoint": the latest checkpoint's step


def epoch_shown(swarm_epoch: int, latest_checkpoint_step: int) -> EpochShown:
    """The latest epoch known (`latest_checkpoint_step` is -1 before the first checkpoint)."""
    if latest_checkpoint_step > swarm_epoch:
        return EpochShown(latest_checkpoint_step, "checkpoint")
    return EpochShown(swarm_epoch, "swarm")


def data_read(summary) -> Coverage | None:
    """From a SwarmSummary (proto or dataclass); None before any peer reported a shard's size."""
    if not summary.dataset_shards or not summary.dataset_sequences:
        return None
    return Coverage(
        int(summary.dataset_sequences_read),
        int(summary.dataset_sequences),
        int(summary.dataset_shards),
        int(summary.dataset_shards_sized),
    )


def read_card(read: Coverage) -> str:
    """The dashboard's short form: "42.0%", or "1,234 seq" while a shard is not sized."""
    return f"{read.read:,} seq" if read.share is None else f"{read.share:.1%}"


def read_note(read: Coverage) -> str:
    """What the card's figure is, under it."""
    if read.share is None:
        return f"{read.sized} of {read.shards} shards sized; a share once all are"
    return f"of {read.total:,} training sequences, every pass counted"


def dashboard_numbers(summary) -> dict:
    """/api/v1/dashboard's numbers from a SwarmSummary: what each card shows, with its definition."""
    epoch = epoch_shown(int(summary.global_epoch), int(summary.latest_checkpoint_step))
    read = data_read(summary)
    return {
        "epoch": epoch.epoch,
        "epoch_source": epoch.source,
        "data_read": None
        if read is None
        else {"card": read_card(read), "note": read_note(read), "text": read.text(), "share": read.share},
        "swarm_samples_per_s": summary.samples_per_s,
        "swarm_throughput_label": SWARM_THROUGHPUT_LABEL,
        "peer_throughput_label": PEER_THROUGHPUT_LABEL,
    }
