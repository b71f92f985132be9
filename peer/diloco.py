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
- the inner optimizer is a plain torch optimizer on the model (peer/optimizers.py `inner_optimizer`),
  stepped by the training loop.

hivemind 1.1.12 specifics: `Optimizer._make_gradient_averager` passes `reuse_grad_buffers` (ours is
forced on: no accumulators are needed) and points the offloaded parameters' `.grad` at our averaged
tensors, which the outer step then reads; `GradientAverager.step` calls
`load_accumulators_into_averager_` right before the round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from crowdtrain.peer.averaging import GuardedGradientAverager

logger = logging.getLogger(__name__)


class PseudoGradients:
    """Makes a hivemind GradientAverager average pseudo-gradients (outer parameters minus local
    ones) instead of gradients; mixed in before the averager class.

    `outer_parameters` (hivemind's offloaded copy, in the order of `parameters`) must be set before
    the first round; `_Optimizer` in peer/swarm.py does it right after hivemind builds both."""

    def __init__(self, *args, **kwargs):
        kwargs["reuse_grad_buffers"] = True  # nothing to accumulate: the parameters hold the progress
        kwargs.pop("accumulate_grads_on", None)
        super().__init__(*args, **kwargs)
        self.outer_parameters: Sequence[torch.Tensor] = ()

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
            for outer, local, out in zip(self.outer_parameters, self.parameters, averaged, strict=True):
                torch.sub(outer, local.detach().to(outer.device), out=out)

    @torch.no_grad()
    def reset_accumulated_grads_(self):
        self._accumulators_used_in_step = False
        self.local_samples_accumulated = self.local_times_accumulated = 0
        self._anchor_batch_size = None


class PseudoGradientAverager(PseudoGradients, GuardedGradientAverager):
    """The run's gradient averager in mode=diloco: pseudo-gradients, averaged robustly behind the
    admission gate (peer/averaging.py)."""


def attach_outer_parameters(opt) -> None:
    """Point a PseudoGradientAverager at hivemind's offloaded copy of the parameters (the outer
    model). hivemind 1.1.12: `Optimizer.state_averager.optimizer.param_groups` hold that copy, in
    the order of the model's parameters, as hivemind's `_make_gradient_averager` itself relies on."""
    if isinstance(opt.grad_averager, PseudoGradients):
        groups = opt.state_averager.optimizer.param_groups
        opt.grad_averager.outer_parameters = [p for group in groups for p in group["params"]]


__all__ = ["PseudoGradientAverager", "attach_outer_parameters"]
