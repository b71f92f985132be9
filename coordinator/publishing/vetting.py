"""What a state must pass before it is published. Pure. (Its model card: `card.py`.)

A state reaches the publisher already shaped like the model and finite: the one check of its
tensors runs where its stream is read (peer/swarm/statewire.py, `peer.run.tensors.check_tensors`),
before anything is copied into the model. What is left to decide here is its quality:
`check_candidate` returns None for a state whose held-out loss may be published, or why not; the
publisher records rejections (shown by `crowdtrain status`, /api/v1/state and the dashboard).
"""

from __future__ import annotations

import math


def check_candidate(eval_loss: float, last_eval_loss: float | None, max_regression_nats: float) -> str | None:
    """None if a state with held-out loss `eval_loss` may be published after one at
    `last_eval_loss` (None: nothing published yet), else why not."""
    if not math.isfinite(eval_loss):
        return f"eval loss is {eval_loss}"
    if last_eval_loss is not None and eval_loss > last_eval_loss + max_regression_nats:
        return (
            f"eval loss {eval_loss:.4f} is worse than the last published {last_eval_loss:.4f} by "
            f"{eval_loss - last_eval_loss:.4f} nats (allowed {max_regression_nats:.4f})"
        )
    return None
