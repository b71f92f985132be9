"""The low-communication mode (`swarm.mode = "diloco"`): DiLoCo on hivemind's own optimizer.

Each peer takes local AdamW steps on its own data (the *inner* optimizer). When the
swarm has processed `target_batch_size` samples, every peer averages its *pseudo-gradient* - the
outer parameters minus its local ones, i.e. how far it moved since the last outer step - and one
outer step (SGD with Nesterov momentum, `outer_learning_rate`, `outer_momentum`) moves the outer
parameters; the local ones are reset to them. A peer sends its model once per outer step instead
of once per `target_batch_size` of the synchronous mode (Douillard et al., DiLoCo, 2023).

No new machinery: it is hivemind's `Optimizer` with three choices made here.
- `offload_optimizer=True` already keeps a copy of the parameters that only the (outer) optimizer
  writes: that copy is the outer model. It is what peers send joiners and what the coordinator
  publishes; hivemind writes it into the model after every outer step (the reset).
- `PseudoGradientAverager` is the run's gradient averager: it only counts samples between outer
  steps, and when a round begins it loads outer minus local into the tensors it averages (robustly,
  with the admission gate: it is a `GuardedGradientAverager`). A round that finds no partner steps
  with the peer's own pseudo-gradient, as DiLoCo's single worker would.
- the inner optimizer is a plain torch optimizer on the model (peer/swarm/optimizers.py `inner_optimizer`),
  stepped by the training loop.

With `overlap_communication` the round runs in the background while inner steps go on (hivemind's
`delay_grad_averaging` and `delay_optimizer_step`): the pseudo-gradient is taken when the round
begins, and when the outer step lands the model becomes the new outer model *plus the local
progress made since the pseudo-gradient was taken* (`KeepsLocalProgress`), so no inner step is
thrown away; that progress goes into the next round's pseudo-gradient. This is the delayed outer
step of Streaming DiLoCo's overlapping (Douillard et al., 2025) without fragments.

hivemind 1.1.12 specifics: `Optimizer._make_gradient_averager` passes `reuse_grad_buffers` (ours is
forced on: no accumulators are needed) and points the offloaded parameters' `.grad` at our averaged
tensors, which the outer step then reads; `GradientAverager.step` calls
`load_accumulators_into_averager_` right before the round.

With the sparse codec (`grad_compression = "topk2bit"`, peer/robust/sparsecodec.py) the averager
sends `sparsify(pseudo-gradient + residual)` and keeps the rest as its residual (error feedback,
`ErrorFeedback`, in this process's memory: not in checkpoints; a peer that restarts or joins starts
from a zero residual; one that downloads a state mid-run keeps it: an update it has not sent yet).
The residual is updated when the round's result is used, right before the outer step
(`notify_used_averaged_gradients`), from the pseudo-gradient recomputed (the outer model and the
local one, or the overlap's snapshot, have not changed since the round began); values the reducers
dropped when they re-sparsified the average stay in it too (`ErrorFeedback.commit`). A round without
partners steps with the sparse pseudo-gradient alone, as a round with partners does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from crowdtrain.peer.robust.sparsecodec import ErrorFeedback, TopKCodec
from crowdtrain.peer.swarm.averaging import GuardedGradientAverager, GuardedStateAverager

logger = logging.getLogger(__name__)


class PseudoGradients:
    """Makes a hivemind GradientAverager average pseudo-gradients (outer parameters minus local
    ones) instead of gradients; mixed in before the averager class.

    `outer_parameters` (hivemind's offloaded copy, in the order of `parameters`) must be set before
    the first round; `_Optimizer` in peer/swarm/wiring.py does it right after hivemind builds both."""

    def __init__(self, *args, **kwargs):
        kwargs["reuse_grad_buffers"] = True  # nothing to accumulate: the parameters hold the progress
        kwargs.pop("accumulate_grads_on", None)
        super().__init__(*args, **kwargs)
        self.outer_parameters: Sequence[torch.Tensor] = ()
        self.progress: LocalProgress | None = None  # overlap: where the pseudo-gradient was taken
        codec = kwargs.get("compression")
        self.error_feedback = ErrorFeedback(codec) if isinstance(codec, TopKCodec) else None

    @torch.no_grad()
    def accumulate_grads_(self, batch_size: int):
        """Count the samples of one inner step (the inner optimizer already applied its gradients)."""
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1

    @torch.no_grad()
    def load_accumulators_into_averager_(self):
        """Put outer minus local parameters (this peer's pseudo-gradient) into the averaged tensors."""
        if len(self.outer_parameters) != len(self.parameters):
            raise RuntimeError(
                "PseudoGradientAverager.outer_parameters was not set to hivemind's offloaded copy"
            )
        with self.get_tensors() as averaged:
            if self.progress is not None:
                # overlap: inner steps may run meanwhile (a failed round reloads from hivemind's thread),
                # so read each tensor once, into the snapshot the outer step will be measured from
                for local, base in zip(self.parameters, self.progress.base, strict=True):
                    base.copy_(local.detach())
                self.progress.known = True
            for out, pseudo_gradient in zip(averaged, self._pseudo_gradients(), strict=True):
                out.copy_(pseudo_gradient)
            if self.error_feedback is not None:
                self.error_feedback.sparsify_(averaged, self.outer_parameters)

    def _pseudo_gradients(self):
        """Outer minus local parameters, one tensor at a time (local: the snapshot when overlapping)."""
        locals_ = self.parameters if self.progress is None else self.progress.base
        for outer, local in zip(self.outer_parameters, locals_, strict=True):
            yield outer.detach() - local.detach().to(outer.device)

    def notify_used_averaged_gradients(self):
        """The round's result goes into the outer step now (hivemind calls this before it steps):
        the sparse codec's residual keeps what this round's pseudo-gradient did not send."""
        if self.error_feedback is not None:
            with self.get_tensors() as averaged:  # the round's average, as the reducers returned it
                self.error_feedback.commit(self._pseudo_gradients, self.outer_parameters, averaged)
        super().notify_used_averaged_gradients()

    @torch.no_grad()
    def reset_accumulated_grads_(self):
        self._accumulators_used_in_step = False
        self.local_samples_accumulated = self.local_times_accumulated = 0
        self._anchor_batch_size = None


class PseudoGradientAverager(PseudoGradients, GuardedGradientAverager):
    """The run's gradient averager in mode=diloco: pseudo-gradients, averaged robustly behind the
    admission gate (peer/swarm/averaging.py)."""


class LocalProgress:
    """The model's local progress not yet sent is `model - base`. `base` is the model when the last
    pseudo-gradient was taken, then the outer model it was rebased on; unknown (`known` False)
    until the first round or after state was loaded, when the model is simply the outer model."""

    def __init__(self, parameters: Sequence[torch.Tensor]):
        self.base = [p.detach().clone() for p in parameters]
        self.known = False


class KeepsLocalProgress:
    """Mixed in before hivemind's TrainingStateAverager (mode=diloco with overlap): writing the
    outer model into the model keeps the local progress made since the pseudo-gradient was taken.
    Without overlap no inner step runs in between, so the result is the outer model exactly."""

    progress: LocalProgress | None = None

    @torch.no_grad()
    def _apply_optimizer_parameters_(self):
        progress = self.progress
        if progress is None or not progress.known:
            super()._apply_optimizer_parameters_()
        else:
            outer = [p for group in self.optimizer.param_groups for p in group["params"]]
            for main, new, base in zip(self.main_parameters, outer, progress.base, strict=True):
                kept = main.detach() - base.to(main.device)
                main.copy_(new.to(main.device)).add_(kept)
        if progress is not None:  # what remains unsent is now measured from this outer model
            forget_local_progress(progress, [p for g in self.optimizer.param_groups for p in g["params"]])
            progress.known = True

    def load_state_from_peers(self, *args, **kwargs):
        """A downloaded state replaces the model: no local progress survives it."""
        if self.progress is not None:
            self.progress.known = False
        return super().load_state_from_peers(*args, **kwargs)


class OuterStateAverager(KeepsLocalProgress, GuardedStateAverager):
    """The run's state averager in mode=diloco: hivemind's offloaded parameters are the outer model."""


def forget_local_progress(progress: LocalProgress | None, outer: Sequence[torch.Tensor]) -> None:
    """Measure local progress from `outer` from now on (after an outer step, or a checkpoint load)."""
    if progress is not None:
        with torch.no_grad():
            for base, p in zip(progress.base, outer, strict=True):
                base.copy_(p)


def attach_outer_parameters(opt, overlap: bool = False) -> None:
    """Point a PseudoGradientAverager at hivemind's offloaded copy of the parameters (the outer
    model). hivemind 1.1.12: `Optimizer.state_averager.optimizer.param_groups` hold that copy, in
    the order of the model's parameters, as hivemind's `_make_gradient_averager` itself relies on.
    With `overlap`, both averagers share one LocalProgress (see KeepsLocalProgress)."""
    if isinstance(opt.grad_averager, PseudoGradients):
        groups = opt.state_averager.optimizer.param_groups
        opt.grad_averager.outer_parameters = [p for group in groups for p in group["params"]]
        if overlap and isinstance(opt.state_averager, KeepsLocalProgress):
            progress = LocalProgress(opt.grad_averager.outer_parameters)
            opt.grad_averager.progress = opt.state_averager.progress = progress


__all__ = [
    "KeepsLocalProgress",
    "LocalProgress",
    "OuterStateAverager",
    "PseudoGradientAverager",
    "attach_outer_parameters",
    "forget_local_progress",
]
