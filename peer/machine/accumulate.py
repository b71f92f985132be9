"""One training step that fits the machine, and the precision it computes in.

`AccumulatingStep` runs forward and backward over the run's (B, T) batch in micro-batches (sized by
peer/machine/fit.py `plan_micro_batch`), so the accumulated gradient is the whole batch's; on running out of
memory it halves the micro-batch and redoes the batch. It never steps an optimizer: the caller's
hivemind `opt.step()` still counts B samples, so the swarm's math is unchanged.

    dtype, why = choose_precision(device, config.precision)   # torch.bfloat16, or None for fp32
    step = AccumulatingStep(model, micro_batch, dtype=dtype)
    loss = step(batch)            # the batch's mean loss; .grad holds its mean-loss gradient
    opt.step(); opt.zero_grad()
    step.micro_batch, step.back_offs   # what it runs at now, and how often it had to halve
"""

from __future__ import annotations

import logging

import torch
from crowdtrain.peer.machine.fit import FitError, autocast_to, is_out_of_memory

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


def back_off(micro_batch: int) -> int:
    """Pure: the micro-batch to retry with after running out of memory at `micro_batch` (> 1)."""
    return max(1, micro_batch // 2)


class AccumulatingStep:
    """Forward and backward over a (B, T) batch in chunks of `micro_batch` sequences; each chunk's
    mean loss is scaled by chunk/B, so the accumulated .grad equals the full batch's mean-loss
    gradient. Expects .grad zero (or None) on entry, as after the optimizer's zero_grad. Never steps
    an optimizer. On running out of memory it zeroes the partial gradients, halves the micro-batch
    (logged; it stays halved) and redoes the whole batch; at micro-batch 1 it raises FitError."""

    def __init__(self, model: torch.nn.Module, micro_batch: int, *, dtype: torch.dtype | None = None):
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise FitError(f"the micro-batch must be a positive integer, not {micro_batch!r}")
        self.model, self.dtype = model, dtype
        self.micro_batch = micro_batch  # read it to report; lowered by out-of-memory back-offs
        self.back_offs = 0

    def __call__(self, batch: torch.Tensor) -> float:
        """The batch's mean loss; its gradient is accumulated into the model's .grad."""
        if batch.dim() != 2 or batch.shape[0] < 1 or batch.shape[1] < 2:
            raise FitError(
                f"a training batch must be (sequences, tokens) with tokens >= 2, not {tuple(batch.shape)}"
            )
        while True:
            failure = ""
            try:
                return self._accumulate(batch)
            except (RuntimeError, MemoryError) as e:  # anything but running out of memory is re-raised
                if not is_out_of_memory(e):
                    raise
                failure = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            # outside the except: the traceback and the chunk's activations it holds are gone
            self._zero_grads()
            self._give_back(batch.device)
            if min(self.micro_batch, batch.shape[0]) == 1:
                raise FitError(
                    f"{batch.device} ran out of memory even at micro-batch 1 (one sequence of {batch.shape[1]} "
                    f"tokens per forward/backward: {failure}); close other programs using {batch.device.type} "
                    "memory, try --precision bf16 where the device supports it, or use a machine with more memory"
                )
            smaller = back_off(min(self.micro_batch, batch.shape[0]))
            logger.warning(
                "out of memory at micro-batch %d on %s (%s); redoing this batch at micro-batch %d, still "
                "%d sequences per step",
                self.micro_batch,
                batch.device,
                failure,
                smaller,
                batch.shape[0],
            )
            self.micro_batch, self.back_offs = smaller, self.back_offs + 1

    def _accumulate(self, batch: torch.Tensor) -> float:
        size, device = batch.shape[0], batch.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, size, self.micro_batch):
            chunk = batch[start : start + self.micro_batch]
            with autocast_to(device, self.dtype):
                loss = self.model(input_ids=chunk, labels=chunk).loss
            (loss * (chunk.shape[0] / size)).backward()
            total += loss.detach().float() * chunk.shape[0]
            del loss
        return (total / size).item()

    def _zero_grads(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()

    @staticmethod
    def _give_back(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # cached blocks of the failed attempt: less fragmentation


# ------------------------------------------------------------------ precision


def decide_precision(device_type: str, requested: str, bf16_supported: bool) -> tuple[str | None, str]:
    """Pure: ("bf16" or None for fp32, why) for --precision on a device of `device_type` whose
    support of bf16 autocast is `bf16_supported`. auto takes bf16 on CUDA only: on most CPUs bf16
    autocast is slower than fp32 (only those with AMX or AVX512-BF16 gain). An explicit bf16 is
    accepted wherever it runs, the CPU included, and refused where it does not."""
    choice = requested.strip().lower() if isinstance(requested, str) else requested
    if choice not in PRECISIONS:
        raise FitError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if choice == "fp32":
        return None, "fp32, as requested"
    if choice == "bf16":
        if not bf16_supported:
            raise FitError(
                f"--precision bf16 was requested but this {device_type} device cannot run bf16 "
                "(CUDA needs compute capability 8.0 or newer); use --precision fp32 or auto"
            )
        slow = "; on most CPUs it is slower than fp32" if device_type == "cpu" else ""
        return "bf16", f"bf16 autocast, as requested{slow}"
    if device_type == "cuda":
        if bf16_supported:
            return "bf16", "auto: this GPU supports bf16, which halves activation memory"
        return None, "auto: fp32, this GPU does not support bf16 (compute capability 8.0 or newer does)"
    if device_type == "cpu":
        return (
            None,
            "auto: fp32 on the CPU, where bf16 autocast is slower on most processors (--precision bf16 to try)",
        )
    return None, f"auto: fp32 on {device_type} (--precision bf16 to try bf16 autocast)"


def choose_precision(device: torch.device | str, requested: str) -> tuple[torch.dtype | None, str]:
    """`decide_precision` with what this device supports: (torch.bfloat16 or None for fp32, why)."""
    device = torch.device(device)
    if isinstance(requested, str) and requested.strip().lower() == "fp32":
        return decide_precision(device.type, requested, False)
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else _bf16_runs(device)
    name, reason = decide_precision(device.type, requested, supported)
    return (torch.bfloat16 if name == "bf16" else None), reason


def _bf16_runs(device: torch.device) -> bool:
    """Whether a small matmul runs under bf16 autocast on this device."""
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = torch.ones(4, 4, device=device)
            return (x @ x).dtype == torch.bfloat16
    except (RuntimeError, TypeError, ValueError):  # autocast or bf16 not available on this backend
        return False


__all__ = [
    "PRECISIONS",
    "AccumulatingStep",
    "back_off",
    "choose_precision",
    "decide_precision",
    "is_out_of_memory",
]


def fit_to_machine(
    model, manifest, device: torch.device, batch_size: int, config
) -> tuple[AccumulatingStep, str]:
    """The peer's step, fitted to this machine before it joins the swarm: precision, the measured
    memory, the budget (`--max-memory-gb`) and the largest micro-batch; (step, what was decided).
    CannotFit (a CrowdtrainError) when not even one sequence fits, or RAM cannot hold hivemind's
    CPU copies of the model."""
    from crowdtrain.peer.machine.fit import available_bytes, measure_memory, plan_micro_batch

    dtype, precision = choose_precision(device, config.precision)
    swarm = manifest.swarm
    needs = measure_memory(
        model,
        manifest.data.seq_len,
        device,
        dtype=dtype,
        mode=swarm.mode,
        overlap=swarm.overlap_communication,
    )
    budget, where = available_bytes(device, config.max_memory_gb, held_bytes=needs.parameter_bytes)
    host = available_bytes("cpu", 0)[0] if device.type != "cpu" else None
    micro, why = plan_micro_batch(batch_size, needs, budget, where, host_available=host)
    return AccumulatingStep(model, micro, dtype=dtype), f"{why}; precision: {precision}"
