"""A joining peer's model before its first step: the swarm's current state, or the community's
latest published checkpoint when no peer can send that state (or nobody trains).

    recovery = Recovery(coordinator, model, device, cache_dir, stop_event)
    recovery.load_checkpoint(step)             # nobody trains: start from a published checkpoint...
    recovery.continue_epoch_count(opt, step)   # ...and number epochs on from its step
    recovery.catch_up(opt, manifest.swarm)     # the swarm is ahead: load its state, else fall back

hivemind's `load_state_from_peers` asks one donor and gives up quietly; a joiner that got nothing
would train from random weights and drag the swarm back. So: up to STATE_LOAD_ATTEMPTS tries with
backoff, then the latest published checkpoint (at most one publishing interval old), joining the
swarm's current epoch; the next state average pulls our parameters to the swarm's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.client import CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.manifest import SwarmSpec
from crowdtrain.peer.swarm import refresh_offloaded_parameters, set_local_epoch
from crowdtrain.peer.tls import ClientTls

logger = logging.getLogger(__name__)

STATE_LOAD_ATTEMPTS = 5  # then fall back to the latest published checkpoint


class RecoveryError(CrowdtrainError):
    """Neither the swarm's state nor a usable checkpoint could be had; the message says what to do."""


@dataclass
class Recovery:
    coordinator: str  # HOST:PORT of the coordinator's gRPC API (checkpoints come from there)
    model: object  # the peer's torch model, loaded in place
    device: object  # torch.device the model lives on
    cache_dir: Path  # the run's cache; a checkpoint lands in cache_dir/resume-checkpoint
    stop_event: threading.Event  # set when the peer is asked to stop: no more retries
    run_key: str = ""  # the run's signing key (hex) as trusted at Join: checkpoints must carry it
    tls: ClientTls | None = None  # how to reach the coordinator (None: plaintext)

    def use_key(self, run_key: str, tls: ClientTls | None) -> None:
        """Pull checkpoints with the run's key pinned (the key the Join manifest was signed with,
        as trusted for this run at this coordinator address: see peer/runproof.py), over `tls`."""
        self.run_key, self.tls = run_key, tls

    def load_checkpoint(self, step: int) -> None:
        """Download (verified, see peer/pull.py) and load the weights of a published checkpoint."""
        import torch
        from crowdtrain.peer.pull import pull
        from safetensors.torch import load_file

        out = self.cache_dir / "resume-checkpoint"
        meta = pull(self.coordinator, out, step=step, public_key=self.run_key, new_run_ok=True, tls=self.tls)
        state = load_file(str(out / "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RecoveryError(
                f"checkpoint step {step} does not fit the run's model (missing {missing}, unexpected {unexpected})"
            )
        with torch.no_grad():
            self.model.tie_weights()
        emit(
            logger,
            "resumed_from_checkpoint",
            "resuming the run from published checkpoint step %d (eval loss %.4f)",
            step,
            meta.eval_loss,
            step=step,
            eval_loss=meta.eval_loss,
        )

    def continue_epoch_count(self, opt, step: int) -> None:
        """Number epochs on from the checkpoint, as hivemind does after loading state from a peer
        (optimizer statistics start afresh; the learning-rate schedule catches up to `step`)."""
        set_local_epoch(opt, step)

    def catch_up(self, opt, swarm: SwarmSpec) -> None:
        """Before the first step: learn the swarm's epoch and, if it is ahead, get its state."""
        global_epoch = self._swarm_epoch(opt, swarm)
        if global_epoch is None or self._load_state_from_peers(opt, swarm, global_epoch):
            return
        if not self.stop_event.is_set():
            self.fall_back_to_checkpoint(opt, global_epoch)

    def _swarm_epoch(self, opt, swarm: SwarmSpec) -> int | None:
        """The swarm's epoch when it is ahead of ours, else None (nothing to load)."""
        tracker = opt.tracker
        wait_s = max(10.0, 3 * swarm.matchmaking_time_s)
        if not tracker.fetched_global_progress_this_epoch.wait(wait_s):
            logger.warning(
                "no progress records from the swarm after %.0fs; starting from the run's initial weights",
                wait_s,
            )
            return None
        global_epoch = tracker.global_epoch
        if global_epoch <= opt.local_epoch:
            logger.info(
                "swarm is at epoch %d, we are at %d: nothing newer to load", global_epoch, opt.local_epoch
            )
            return None
        logger.info(
            "swarm is at epoch %d with %d peer(s): loading its state",
            global_epoch,
            tracker.global_progress.num_peers,
        )
        return global_epoch

    def _load_state_from_peers(self, opt, swarm: SwarmSpec, global_epoch: int) -> bool:
        """Up to STATE_LOAD_ATTEMPTS tries with backoff; True once we hold a state at most one epoch
        behind the swarm (hivemind itself accepts that)."""
        deadline = time.monotonic() + 3 * swarm.load_state_timeout_s
        for attempt in range(1, STATE_LOAD_ATTEMPTS + 1):
            t0 = time.monotonic()
            opt.load_state_from_peers()
            if opt.local_epoch >= global_epoch - 1:
                seconds = time.monotonic() - t0
                emit(
                    logger,
                    "state_loaded",
                    "loaded the swarm's state at epoch %d in %.1fs",
                    opt.local_epoch,
                    seconds,
                    epoch=opt.local_epoch,
                    seconds=round(seconds, 3),
                )
                return True
            logger.warning(
                "attempt %d/%d: no peer served a state at the swarm's epoch %d (we have %d); retrying",
                attempt,
                STATE_LOAD_ATTEMPTS,
                global_epoch,
                opt.local_epoch,
            )
            if time.monotonic() > deadline or self.stop_event.wait(min(2.0 * attempt, 10.0)):
                break
        return False

    def fall_back_to_checkpoint(self, opt, global_epoch: int) -> None:
        """No peer could serve the swarm's state: start from the latest published checkpoint.

        The weights are at most one publishing interval old; we then take part in the swarm's
        current epoch (as hivemind itself does when a peer is one epoch behind), and the next
        state-averaging round pulls our parameters to the swarm's.
        """
        from crowdtrain.peer.pull import PullError, list_published

        try:
            listed, _ = list_published(self.coordinator, self.tls)
        except (PullError, CoordinatorUnavailable, CoordinatorRejected) as e:
            listed = []
            logger.warning("could not list published checkpoints: %s", e)
        if not listed or listed[-1].step <= opt.local_epoch:
            raise RecoveryError(
                f"no peer could send the swarm's state (epoch {global_epoch}) and no newer checkpoint is "
                "published; the other peers may be overloaded or unreachable - restart later"
            )
        step = listed[-1].step
        emit(
            logger,
            "checkpoint_fallback",
            "no peer could send the swarm's state: starting from published checkpoint step %d "
            "and joining the swarm at epoch %d",
            step,
            global_epoch,
            level=logging.WARNING,
            step=step,
            swarm_epoch=global_epoch,
        )
        self.load_checkpoint(step)
        # the optimizer works on its own (offloaded) copy of the parameters: refresh it too
        refresh_offloaded_parameters(opt, self.model)
        self.continue_epoch_count(opt, max(step, global_epoch))
