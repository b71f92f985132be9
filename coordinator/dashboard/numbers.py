"""The run's headline numbers, each defined once: the dashboard (/api/v1/dashboard) and
`crowdtrain status` show these, never their own arithmetic. Pure.

- the epoch shown is the latest one known: the swarm's, from its progress records, or the latest
  published checkpoint's step (a checkpoint's step is the swarm epoch it was taken at) once the
  swarm's records are gone, so a swarm that left does not read "epoch 0" beside "step 64";
- the data read is a share only once every shard's size is known (its denominator then never
  changes, so the share never goes down); before, it is the sequences read and how many shards
  are sized, with no share that would fall as more shards get sized;
- throughput: the swarm's is the sum of the rates in the swarm's progress records; a peer's row
  shows the rate in its own heartbeat; both are labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class DataRead:
    sequences_read: int  # every finished pass over a shard counted
    sequences_total: int  # in the shards whose size is known
    shards: int
    shards_sized: int

    @property
    def share(self) -> float | None:
        """Sequences read over all training sequences (above 1 after a full pass); None until every
        shard is sized, since a share of a denominator that still grows could go down."""
        if self.shards == 0 or self.shards_sized < self.shards or self.sequences_total <= 0:
            return None
        return self.sequences_read / self.sequences_total

    def card(self) -> str:
        """The dashboard's short form: "42.0%", or "1,234 seq" while a shard is not sized."""
        share = self.share
        return f"{self.sequences_read:,} seq" if share is None else f"{share:.1%}"

    def note(self) -> str:
        """What the card's figure is, under it."""
        if self.share is None:
            return f"{self.shards_sized} of {self.shards} shards sized; a share once all are"
        return f"of {self.sequences_total:,} training sequences, every pass counted"

    def text(self) -> str:
        """The long form `crowdtrain status` prints and the dashboard shows on hover."""
        share = self.share
        if share is not None:
            return f"{self.sequences_read:,} of {self.sequences_total:,} training sequences ({share:.1%})"
        return (
            f"{self.sequences_read:,} training sequences; {self.shards_sized} of {self.shards} shards "
            "sized (a share once every shard is)"
        )


def data_read(summary) -> DataRead | None:
    """From a SwarmSummary (proto or dataclass); None before any peer reported a shard's size."""
    if not summary.dataset_shards or not summary.dataset_sequences:
        return None
    return DataRead(
        int(summary.dataset_sequences_read),
        int(summary.dataset_sequences),
        int(summary.dataset_shards),
        int(summary.dataset_shards_sized),
    )


def dashboard_numbers(summary) -> dict:
    """/api/v1/dashboard's numbers from a SwarmSummary: what each card shows, with its definition."""
    epoch = epoch_shown(int(summary.global_epoch), int(summary.latest_checkpoint_step))
    read = data_read(summary)
    return {
        "epoch": epoch.epoch,
        "epoch_source": epoch.source,
        "data_read": None
        if read is None
        else {"card": read.card(), "note": read.note(), "text": read.text(), "share": read.share},
        "swarm_samples_per_s": summary.samples_per_s,
        "swarm_throughput_label": SWARM_THROUGHPUT_LABEL,
        "peer_throughput_label": PEER_THROUGHPUT_LABEL,
    }
