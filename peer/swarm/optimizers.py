"""The run's torch optimizers, built from its manifest (no hivemind here).

Synchronous mode: `adamw` steps on the swarm-averaged gradient, warmed up by `warmup_schedule`.
DiLoCo mode (peer/swarm/diloco.py): `inner_optimizer` steps locally on every micro-batch, and
`outer_optimizer` steps on the averaged pseudo-gradient once per epoch.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the (swarm-averaged) gradient norm right before each update, and skips an
    update whose gradient is not finite (counted in `skipped_steps`): a bad average never reaches
    the parameters."""

    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm, self.skipped_steps = max_grad_norm, 0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if not torch.isfinite(total_norm):
            self.skipped_steps += 1
            msg = "skipped an optimizer step: the averaged gradient is not finite (a groupmate's NaN/Inf or "
            logger.warning(msg + "our own overflow; %d skipped so far)", self.skipped_steps)
            for p in params:
                p.grad.zero_()
            return None
        return super().step(closure)


def adamw(params, *, optim) -> ClippedAdamW:
    """The run's AdamW (`optim`: the manifest's OptimSpec), clipping at `optim.max_grad_norm`."""
    return ClippedAdamW(
        params,
        lr=optim.learning_rate,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
    )


def warmup_schedule(opt, *, warmup_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup of the learning rate over the first `warmup_epochs` epochs, then constant."""
    warmup = max(1, warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / warmup))


def outer_optimizer(params, *, learning_rate: float, momentum: float) -> torch.optim.SGD:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum, stepped on the averaged pseudo-gradient."""
    return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, nesterov=momentum > 0)


class InnerSteps:
    """The local optimizer of a DiLoCo peer and its schedule: the run's AdamW (clipped, skipping
    non-finite steps) with the learning rate warmed up linearly over its first `warmup_steps` local
    steps, counted by AdamW's own step count. Its state exists from the start (`state_tensors`), so
    hivemind shares it with joiners, who therefore continue the count instead of warming up again."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, learning_rate: float, warmup_steps: int):
        self.optimizer, self.learning_rate = optimizer, learning_rate
        self.warmup_steps = max(1, warmup_steps)

    def step(self) -> None:
        first = self.optimizer.param_groups[0]["params"][0]
        taken = float(self.optimizer.state[first]["step"]) if first in self.optimizer.state else 0.0
        lr = self.learning_rate * min(1.0, (taken + 1) / self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def state_tensors(self) -> list[torch.Tensor]:
        """AdamW's moments and step counts, in parameter order (hivemind's `extra_tensors`: sent to
        joiners and averaged with the state, in place)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return [self.optimizer.state[p][key] for key in ("exp_avg", "exp_avg_sq", "step") for p in params]


def inner_optimizer(manifest, model) -> InnerSteps:
    """DiLoCo mode: the peer's local optimizer on `model` (the run's AdamW, clipped), with its warmup
    and its state created up front (as torch's AdamW creates it at the first step)."""
    optim = manifest.optim
    opt = adamw(model.parameters(), optim=optim)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    return InnerSteps(opt, learning_rate=optim.learning_rate, warmup_steps=manifest.swarm.inner_warmup_steps)


__all__ = ["ClippedAdamW", "InnerSteps", "adamw", "inner_optimizer", "outer_optimizer", "warmup_schedule"]
