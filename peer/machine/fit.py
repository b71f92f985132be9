"""Fitting training to the volunteer's machine: what training the model takes in memory (measured),
what the machine offers, and the largest micro-batch that fits, refused before joining the swarm
when not even one sequence does. peer/machine/accumulate.py then runs each step in those micro-batches.

The swarm's math never changes: hivemind's Optimizer is told `batch_size` samples per step and
still gets exactly that many; only how many go through one forward/backward (the micro-batch)
adapts. Before the model is built, peer/run/modelsize.py applies the static count below to its
parameter count taken on torch's meta device; the training path then measures the built model:

    dtype, why = choose_precision(device, config.precision)      # peer/machine/accumulate.py
    needs = measure_memory(model, seq_len, device, dtype=dtype, mode=swarm.mode,
                           overlap=swarm.overlap_communication)
    budget, where = available_bytes(device, config.max_memory_gb, held_bytes=needs.parameter_bytes)
    ram = available_bytes("cpu", 0)[0] if device.type != "cpu" else None  # for hivemind's copies
    micro, why = plan_micro_batch(batch_size, needs, budget, where, host_available=ram)  # or CannotFit
    step = AccumulatingStep(model, micro, dtype=dtype)             # peer/machine/accumulate.py

Memory counted (hivemind 1.1.12 as peer/swarm/wiring.py configures it: offload_optimizer=True, so
TrainingStateAverager reuses the offloaded optimizer's tensors for averaging, reuse_tensors=True),
P = the model's parameter bytes, P32 = the same count of elements in fp32:
- sync: on the training device the parameters, their .grad and GradientAverager's accumulators
  (zeros_like each grad, reuse_grad_buffers=False): 3 P. In host RAM the offloaded fp32 copy of the
  parameters (state_averager), the averaged gradients the offloaded optimizer reads as .grad
  (grad_averager), and AdamW's two moments on that copy: 4 P32.
- diloco (peer/swarm/diloco.py): on the device the parameters, .grad and the inner AdamW's two moments
  (the gradient averager reuses .grad, so no accumulators): 4 P. In RAM the outer fp32 copy, the
  averaged pseudo-gradients and the outer SGD's momentum: 3 P32, plus the local-progress
  snapshot with overlap_communication: 4 P32.
On the CPU device and RAM are one pool, so the host copies join the static bytes; elsewhere they
are `host_bytes`, checked against RAM when `plan_micro_batch` is given `host_available`.
Activations are measured (see `measure_memory`). Budgets keep a 10% margin (`SAFETY_MARGIN`) for
what no count sees: allocator fragmentation and caching, temporaries of the optimizer step and of
averaging, other programs starting. GB here is 10^9 bytes.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

SAFETY_MARGIN = 0.10  # share of the memory budget left unplanned (see the module docstring)
MODES = ("sync", "diloco")
OOM_PHRASES = (
    "out of memory",  # CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory")
    "can't allocate memory",  # torch's CPU allocator (Linux, macOS)
    "cannot allocate memory",
    "not enough memory",  # torch's CPU allocator on Windows
    "could not allocate",
    "failed to allocate",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Pure: whether `error` is an allocator running out of memory (CUDA, CPU or MPS)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(phrase in message for phrase in OOM_PHRASES)


class FitError(CrowdtrainError):
    """Training cannot be fitted to this machine as asked; the message says what to do."""


class CannotFit(FitError):
    """Even one sequence per forward/backward does not fit in the memory available."""


@dataclass(frozen=True)
class MemoryNeeds:
    """What training this model takes, in bytes (see the module docstring for what is counted)."""

    parameter_bytes: int  # the model's weights, already resident on the training device
    static_bytes: int  # weights, gradients, optimizer state and hivemind's copies on the device
    host_bytes: int  # hivemind's CPU copies when the device is not the CPU (else in static_bytes)
    activation_base_bytes: int  # activations that do not grow with the batch (masks, rotary tables)
    per_sequence_bytes: int  # activations (and logits) per sequence of seq_len tokens
    seq_len: int
    method: str  # how the activations were measured
    breakdown: str  # the static count, in words

    def total_bytes(self, micro_batch: int) -> int:
        """Device bytes of training at this micro-batch."""
        return self.static_bytes + self.activation_base_bytes + micro_batch * self.per_sequence_bytes


def format_bytes(n: float) -> str:
    """'2.1 GB', '35.2 MB', '812.0 kB' (powers of 10)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------ static memory (pure)


def count_static_bytes(
    num_parameters: int, parameter_bytes: int, *, mode: str, overlap: bool, on_cpu: bool
) -> tuple[int, int, str]:
    """Pure: (device bytes, host bytes, breakdown) of the weights, gradients, optimizer state and
    hivemind's copies, as counted in the module docstring. On the CPU the host bytes are folded
    into the device bytes (one pool) and returned as 0."""
    if mode not in MODES:
        raise FitError(f"swarm mode {mode!r} is not one of {', '.join(MODES)}; upgrade crowdtrain")
    p32 = 4 * num_parameters
    if mode == "sync":
        device_copies, host_copies = 3, 4
        words = "weights, gradients, hivemind's gradient accumulators | fp32 copy, averaged gradients, 2 AdamW moments"
    else:
        device_copies, host_copies = 4, 4 if overlap else 3
        words = "weights, gradients, 2 inner AdamW moments | outer fp32 copy, pseudo-gradients, momentum"
        words += ", local-progress snapshot" if overlap else ""
    device, host = device_copies * parameter_bytes, host_copies * p32
    breakdown = f"device {device_copies} x {format_bytes(parameter_bytes)} ({words.split(' | ')[0]}); "
    breakdown += f"RAM {host_copies} x {format_bytes(p32)} ({words.split(' | ')[1]})"
    if on_cpu:
        return device + host, 0, breakdown
    return device, host, breakdown


# ------------------------------------------------------------------ activations (measured)


def measure_memory(
    model: torch.nn.Module,
    seq_len: int,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype | None = None,
    mode: str = "sync",
    overlap: bool = False,
    vocab_size: int | None = None,
) -> MemoryNeeds:
    """Measure what training `model` on sequences of `seq_len` tokens takes on `device` (default:
    where its parameters are), under autocast to `dtype` (None: fp32), for the swarm `mode`.

    Activations are measured at micro-batch 1 and 2; their difference is the per-sequence cost and
    the rest the fixed cost. On CUDA: torch.cuda.max_memory_allocated over a forward and backward
    (torch.autograd.grad, so no .grad is written). Elsewhere: the storages autograd saves during a
    forward (torch.autograd.graph.saved_tensors_hooks, each storage once, the weights excluded),
    plus the logits and their gradient, the backward's largest transient. The model is left as it
    was: parameters, .grad, buffers, train/eval mode and the random number generators."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not isinstance(seq_len, int) or seq_len < 2:
        raise FitError(f"seq_len must be an integer of at least 2 tokens, not {seq_len!r}")
    vocab = vocab_size or _vocab_size(model)
    params = list(model.parameters())
    num = sum(p.numel() for p in params)
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    static, host, breakdown = count_static_bytes(
        num, parameter_bytes, mode=mode, overlap=overlap, on_cpu=device.type == "cpu"
    )
    with _left_as_it_was(model, device):
        one, two = _measure_twice(model, seq_len, vocab, device, dtype)
    per_sequence = two - one if two > one else -(-two // 2)  # a flat reading: assume it all scales
    base = one - per_sequence
    if device.type == "cuda":  # the peak includes the gradients autograd.grad returned: static
        base -= sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    method = "CUDA peak allocation" if device.type == "cuda" else "autograd saved tensors + logits"
    needs = MemoryNeeds(parameter_bytes, static, host, max(0, base), per_sequence, seq_len, method, breakdown)
    logger.info(
        "memory: %s static (%s), %s fixed + %s per sequence of %d tokens (%s)",
        format_bytes(static),
        breakdown,
        format_bytes(needs.activation_base_bytes),
        format_bytes(per_sequence),
        seq_len,
        method,
    )
    return needs


def _measure_twice(model, seq_len: int, vocab: int, device: torch.device, dtype) -> tuple[int, int]:
    """Activation bytes at micro-batch 1 and 2. Out of memory at 2: twice 1 (all of it scales);
    out of memory at 1: CannotFit, before the peer joins the swarm."""
    measure = _peak_cuda_bytes if device.type == "cuda" else _saved_tensor_bytes
    readings: list[int] = []
    for m in (1, 2):
        failure = ""
        try:
            readings.append(measure(model, _tokens(m, seq_len, vocab, device), dtype))
            continue
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            failure = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if m == 1:
            raise CannotFit(
                f"{device} ran out of memory training on one sequence of {seq_len} tokens ({failure}); "
                "close other programs using its memory or use a machine with more memory"
            )
        logger.warning("out of memory measuring 2 sequences on %s (%s); assuming 1 per pass", device, failure)
        readings.append(2 * readings[0])
    return readings[0], readings[1]


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    return int(model.get_input_embeddings().num_embeddings)


def _tokens(m: int, seq_len: int, vocab: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m)  # the global generators stay untouched
    return torch.randint(0, vocab, (m, seq_len), generator=generator).to(device)


@contextmanager
def _left_as_it_was(model: torch.nn.Module, device: torch.device):
    """Train mode for the measurement; afterwards the mode, the buffers and the RNGs are restored."""
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        try:
            model.train()
            yield
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; None: nothing (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _saved_tensor_bytes(model, tokens: torch.Tensor, dtype) -> int:
    """Bytes of the storages autograd saves for backward in one forward, the logits and their gradient."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage: nothing to count
            return t
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_to(tokens.device, dtype):
        out = model(input_ids=tokens, labels=tokens)
    logits = out.logits
    # the loss upcasts the logits: the backward holds an fp32 gradient (and one in bf16 under autocast)
    size = logits.element_size()
    logit_bytes = logits.numel() * (4 if size >= 4 else 4 + size)
    if logits.untyped_storage().data_ptr() not in seen:
        seen[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    del out, logits  # frees the graph
    return sum(seen.values()) + logit_bytes


def _peak_cuda_bytes(model, tokens: torch.Tensor, dtype) -> int:
    """Peak bytes allocated on the CUDA device by one forward and backward, above what was there."""
    device = tokens.device
    params = [p for p in model.parameters() if p.requires_grad]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with autocast_to(device, dtype):
        loss = model(input_ids=tokens, labels=tokens).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del loss, grads
    return max(0, peak)


# ------------------------------------------------------------------ the budget


def available_bytes(
    device: torch.device | str, max_memory_gb: float, *, held_bytes: int = 0
) -> tuple[int, str]:
    """(bytes training may plan on, where that figure comes from). CUDA: the device's free memory
    (torch.cuda.mem_get_info) plus what torch already reserved in this process (the model's weights
    among it); elsewhere: psutil's available RAM plus `held_bytes`, what training already holds
    that the free figure excludes (pass MemoryNeeds.parameter_bytes). Capped by `max_memory_gb`
    when > 0; SAFETY_MARGIN of the result is left unplanned."""
    if not isinstance(max_memory_gb, (int, float)) or not math.isfinite(max_memory_gb) or max_memory_gb < 0:
        raise FitError(
            f"--max-memory-gb must be a number >= 0 (0: what the device has free), not {max_memory_gb!r}"
        )
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device)
        source = f"{device}: {format_bytes(free)} free of {format_bytes(total)}"
    else:
        import psutil

        free = psutil.virtual_memory().available + max(0, int(held_bytes))
        source = f"{device.type}: {format_bytes(free)} of RAM available"
    budget = free
    if max_memory_gb > 0 and max_memory_gb * 1e9 < free:
        budget = int(max_memory_gb * 1e9)
        source = f"--max-memory-gb {max_memory_gb:g}; {source}"
    usable = int(budget * (1 - SAFETY_MARGIN))
    return usable, f"{source}; {SAFETY_MARGIN:.0%} kept as a safety margin"


def plan_micro_batch(
    batch_size: int, needs: MemoryNeeds, available: int, where: str = "", *, host_available: int | None = None
) -> tuple[int, str]:
    """Pure: (the largest micro-batch <= batch_size that fits in `available` device bytes, why).
    Raises CannotFit when one sequence does not fit, or when hivemind's CPU copies
    (`needs.host_bytes`) exceed `host_available` RAM (when given). `where`: where `available`
    came from (`available_bytes`' reason), quoted in messages.

    The micro-batch need not divide batch_size: the last chunk may be smaller, and
    AccumulatingStep scales each chunk's loss by its size, so the gradient is exact either way. A
    divisor would often mean more, smaller chunks (16 with room for 7: 4 x 4 instead of 7+7+2)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FitError(f"the batch size must be a positive integer, not {batch_size!r}")
    where = f" ({where})" if where else ""
    if host_available is not None and needs.host_bytes > host_available:
        raise CannotFit(
            f"hivemind keeps {format_bytes(needs.host_bytes)} of CPU copies of the model (parameters, "
            f"gradients, optimizer state), but only {format_bytes(host_available)} of RAM is available; "
            "close other programs or use a machine with more RAM"
        )
    fixed = needs.static_bytes + needs.activation_base_bytes
    room = available - fixed
    if room < needs.per_sequence_bytes:
        raise CannotFit(
            f"the model needs {format_bytes(fixed)} for its weights, gradients and optimizer state and "
            f"{format_bytes(needs.per_sequence_bytes)} per sequence of {needs.seq_len} tokens, but only "
            f"{format_bytes(available)} is available{where}; use a machine with more memory, close other "
            "programs using it, or raise --max-memory-gb if you set it"
        )
    fits = room // needs.per_sequence_bytes if needs.per_sequence_bytes > 0 else batch_size
    micro = min(batch_size, fits)
    chunks = -(-batch_size // micro)
    last = batch_size - (chunks - 1) * micro
    reason = (
        f"micro-batch {micro} of {batch_size}: {format_bytes(needs.total_bytes(micro))} of "
        f"{format_bytes(available)}{where}"
    )
    if chunks > 1:
        reason += f"; {batch_size} sequences per step in {chunks} chunks" + (
            f" (the last of {last})" if last != micro else ""
        )
    return micro, reason


__all__ = [
    "SAFETY_MARGIN",
    "CannotFit",
    "FitError",
    "MemoryNeeds",
    "autocast_to",
    "available_bytes",
    "count_static_bytes",
    "format_bytes",
    "is_out_of_memory",
    "measure_memory",
    "plan_micro_batch",
]
