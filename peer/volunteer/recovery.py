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

A donor can send any state. So the loaded state is verified (`verify_loaded`) before we train on
it: every parameter finite, and - once a signed checkpoint is published - no further from that
checkpoint than the epochs since it allow (`drift_check`). Otherwise it is discarded (optimizer
statistics zeroed too) and we start from the checkpoint instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.client import CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.peer.link.tls import ClientTls
from crowdtrain.peer.run.manifest import SwarmSpec
from crowdtrain.peer.run.tensors import check_finite
from crowdtrain.peer.swarm.wiring import refresh_offloaded_parameters, set_local_epoch

logger = logging.getLogger(__name__)

STATE_LOAD_ATTEMPTS = 5  # then fall back to the latest published checkpoint
CATCH_UP_ROUNDS = 3  # rounds of (swarm's state, else a checkpoint) before a peer gives up
CATCH_UP_RETRY_S = 15.0  # between those rounds
# How far the swarm's parameters may move per epoch, in units of the peak learning rate (RMS over
# all parameters). One Adam(W) step moves each coordinate by at most about lr when
# (1 - beta1) <= sqrt(1 - beta2), as in every crowdtrain preset (Kingma & Ba 2015, section 2.1),
# plus lr * weight_decay * |w|; state averaging mixes peers' parameters convexly and cannot move
# them further. Measured: honest tiny-preset swarms move 0.29 x lr per epoch (RMS between
# consecutive published checkpoints, tests/test_forged_state.py's swarm); 1.5 leaves 5x of room.
DRIFT_LR_SLACK = 1.5
DRIFT_SPREAD = 0.01  # plus this share of the checkpoint's RMS: honest peers differ this much (the publisher's agreement tolerance)


def drift_check(
    loaded: Mapping[str, object],
    checkpoint: Mapping[str, object],
    epochs: int,
    peak_lr: float,
    slack: float = DRIFT_LR_SLACK,
    spread: float = DRIFT_SPREAD,
) -> tuple[bool, str]:
    """Pure: whether a state loaded from a peer can be the swarm's `epochs` epochs after
    `checkpoint` (name -> tensor; names the checkpoint lacks, such as a tied lm_head, are not
    compared): every tensor finite, and RMS(loaded - checkpoint) <= slack * peak_lr * (epochs + 2)
    + spread * RMS(checkpoint) (+2: a step in flight, and the checkpoint's own lag). And why."""
    for name, tensor in loaded.items():
        problem = check_finite(tensor, name)
        if problem:
            return False, problem
    diff = norm = 0.0
    count = 0
    for name, ref in checkpoint.items():
        got = loaded.get(name)
        if got is None or tuple(got.shape) != tuple(ref.shape):
            return False, f"{name} is missing or has another shape than in the checkpoint"
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        diff += float((got - ref).pow(2).sum())
        norm += float(ref.pow(2).sum())
        count += ref.numel()
    rms = math.sqrt(diff / max(count, 1))
    allowed = slack * peak_lr * (max(epochs, 0) + 2) + spread * math.sqrt(norm / max(count, 1))
    reason = (
        f"RMS distance {rms:.3g} to the checkpoint, allowed {allowed:.3g} for {epochs} epoch(s) "
        f"at peak learning rate {peak_lr:g}"
    )
    return rms <= allowed, reason


def peak_learning_rate(opt) -> float:
    """The largest learning rate the schedule reaches: LambdaLR keeps the base in `initial_lr`
    (the warm-up multiplier never exceeds 1). hivemind 1.1.12: the optimizer stepping the
    parameters is `opt.state_averager.optimizer`."""
    groups = opt.state_averager.optimizer.param_groups
    return max(float(g.get("initial_lr", g["lr"])) for g in groups)


def reset_optimizer_statistics(opt) -> None:
    """Zero the optimizer's statistics in place (a discarded donor sent them): Adam starts afresh
    (its step counter still advances before use, so no division by zero). In place, because
    hivemind's state averager shares these tensors."""
    import torch

    with torch.no_grad():
        for state in opt.state_averager.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


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
    loaded_step: int | None = None  # the published checkpoint the model holds (load_checkpoint)

    def use_key(self, run_key: str, tls: ClientTls | None) -> None:
        """Pull checkpoints with the run's key pinned (the key the Join manifest was signed with,
        as trusted for this run at this coordinator address: see peer/run/runproof.py), over `tls`."""
        self.run_key, self.tls = run_key, tls

    def load_checkpoint(self, step: int) -> None:
        """Download (verified, see peer/checkpoints/pull.py) and load the weights of a published checkpoint."""
        import torch
        from crowdtrain.peer.checkpoints.pull import pull
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
        self.loaded_step = step
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
        """Before the first step: learn the swarm's epoch and, if it is ahead, get its state (one we
        can believe: `verify_loaded`)."""
        global_epoch = self._swarm_epoch(opt, swarm)
        if global_epoch is None:
            return
        for attempt in range(1, CATCH_UP_ROUNDS + 1):
            loaded = self._load_state_from_peers(opt, swarm, global_epoch)
            if (loaded and self.verify_loaded(opt, global_epoch)) or self.stop_event.is_set():
                return
            try:
                return self.fall_back_to_checkpoint(opt, global_epoch, discarded=loaded)
            except RecoveryError as e:
                # the other peers unreachable (a partition) while the coordinator restarts: both
                # come back, so try both again before giving up (chaos run: a restarted peer met both)
                if attempt == CATCH_UP_ROUNDS:
                    raise
                logger.warning(
                    "%s; trying the swarm and the coordinator again in %.0fs (%d/%d)",
                    e,
                    CATCH_UP_RETRY_S,
                    attempt,
                    CATCH_UP_ROUNDS,
                )
                if self.stop_event.wait(CATCH_UP_RETRY_S):
                    return

    def verify_loaded(self, opt, global_epoch: int) -> bool:
        """Whether the state just loaded from a peer passes `drift_check` against the latest
        published checkpoint (finiteness only when none is published or the coordinator cannot be
        reached); if not, it is discarded with a warning (its optimizer statistics are zeroed)."""
        from crowdtrain.peer.checkpoints.pull import PullError, list_published

        loaded = {name: p.detach() for name, p in self.model.named_parameters()}
        try:
            listed, _ = list_published(self.coordinator, self.tls)
        except (PullError, CoordinatorUnavailable, CoordinatorRejected) as e:
            listed = []
            logger.warning("could not list published checkpoints to check the loaded state against: %s", e)
        if listed:
            step = listed[-1].step
            epochs = min(opt.local_epoch, global_epoch + 1) - step
            ok, why = drift_check(loaded, self._checkpoint_tensors(step), epochs, peak_learning_rate(opt))
            why = f"{why} (checkpoint step {step}, loaded epoch {opt.local_epoch})"
        else:
            ok, why = drift_check(loaded, {}, 0, 0.0)
        if ok:
            logger.info("the state loaded from the swarm is believable: %s", why)
            return True
        logger.warning(
            "discarding the state loaded from the swarm (the donor is not named by hivemind; it "
            "declared the highest priority): %s; starting from the latest published checkpoint",
            why,
        )
        reset_optimizer_statistics(opt)
        return False

    def _checkpoint_tensors(self, step: int) -> dict:
        """The parameters of published checkpoint `step`, downloaded and verified (peer/checkpoints/pull.py)."""
        from crowdtrain.peer.checkpoints.pull import pull
        from safetensors.torch import load_file

        out = self.cache_dir / "resume-checkpoint"
        pull(self.coordinator, out, step=step, public_key=self.run_key, new_run_ok=True, tls=self.tls)
        return load_file(str(out / "model.safetensors"), device="cpu")

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

    def fall_back_to_checkpoint(self, opt, global_epoch: int, discarded: bool = False) -> None:
        """No peer could serve the swarm's state (or it was `discarded`: not believable): start
        from the latest published checkpoint.

        The weights are at most one publishing interval old; we then take part in the swarm's
        current epoch (as hivemind itself does when a peer is one epoch behind), and the next
        state-averaging round pulls our parameters to the swarm's.
        """
        from crowdtrain.peer.checkpoints.pull import PullError, list_published

        try:
            listed, _ = list_published(self.coordinator, self.tls)
        except (PullError, CoordinatorUnavailable, CoordinatorRejected) as e:
            listed = []
            logger.warning("could not list published checkpoints: %s", e)
        if discarded and not listed:
            raise RecoveryError(
                "the state a peer sent is not usable (see the warning above) and no checkpoint is "
                "published to start from instead; restart later, or ask the operator to ban that peer"
            )
        holds_latest = (
            bool(listed) and listed[-1].step == self.loaded_step == opt.local_epoch and not discarded
        )
        if not listed or (listed[-1].step <= opt.local_epoch and not discarded and not holds_latest):
            raise RecoveryError(
                f"no peer could send the swarm's state (epoch {global_epoch}) and no newer checkpoint is "
                "published; the other peers may be overloaded or unreachable - restart later"
            )
        step = listed[-1].step
        emit(
            logger,
            "checkpoint_fallback",
            "%s: starting from published checkpoint step %d and joining the swarm at epoch %d",
            "the state loaded from the swarm was discarded"
            if discarded
            else "no peer could send the swarm's state",
            step,
            global_epoch,
            level=logging.WARNING,
            step=step,
            swarm_epoch=global_epoch,
        )
        if not holds_latest:  # else Join already had us start from it, and nothing overwrote it
            self.load_checkpoint(step)
            # the optimizer works on its own (offloaded) copy of the parameters: refresh it too
            refresh_offloaded_parameters(opt, self.model)
        self.continue_epoch_count(opt, max(step, global_epoch))
