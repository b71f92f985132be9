"""The tensors a state of the run's model must hold, and the one check that a state holds them.

A state downloaded from another peer (a joiner's from its donor, the publisher's from the voters it
asks) is a list of tensors in hivemind's order: the model's parameters in `model.parameters()`
order, then, for a joiner, the optimizer's statistics. `check_tensors` holds such a list to the
tensors it stands for, one for one: the same count, each the same shape and dtype, every value
finite. Run it once per downloaded state, where the stream ends (peer/swarm/statewire.py), before
anything is copied into a model: `Tensor.copy_` broadcasts, so a (1,) tensor copied first would fill
a whole matrix and pass any shape check made afterwards. Pure, and torch is imported only to check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpectedTensor:
    """One tensor a state must hold: the local tensor it will be loaded into."""

    name: str  # for messages: a parameter's name, or "tensor <index>" in a state without names
    shape: tuple[int, ...]
    dtype: str  # str(torch.dtype), e.g. "torch.float32"
    element_size: int  # bytes per element

    @classmethod
    def like(cls, name: str, tensor) -> ExpectedTensor:
        """The expectation a local torch tensor sets."""
        return cls(name, tuple(int(n) for n in tensor.shape), str(tensor.dtype), tensor.element_size())

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.element_size


def expected_tensors(model) -> tuple[ExpectedTensor, ...]:
    """The model's parameters in `model.parameters()` order (hivemind's state order)."""
    return tuple(ExpectedTensor.like(name, p) for name, p in model.named_parameters())


def expected_state(tensors: Iterable) -> tuple[ExpectedTensor, ...]:
    """What a state like `tensors` (our own, unnamed: parameters then optimizer statistics) holds."""
    return tuple(ExpectedTensor.like(f"tensor {index}", t) for index, t in enumerate(tensors))


def check_finite(tensor, name: str) -> str | None:
    """None if every value of `tensor` is finite (always so for integer tensors), else why not."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        return f"{name} contains NaN or infinite values"
    return None


def check_tensor(tensor, expected: ExpectedTensor) -> str | None:
    """None if `tensor` may stand for `expected` (a tensor, its shape and dtype, finite), else why not."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return f"{expected.name} is a {type(tensor).__name__}, not a tensor"
    if tuple(tensor.shape) != expected.shape:
        return f"{expected.name} has shape {tuple(tensor.shape)}, the model has {expected.shape}"
    if str(tensor.dtype) != expected.dtype:
        return f"{expected.name} has dtype {tensor.dtype}, the model has {expected.dtype}"
    return check_finite(tensor, expected.name)


def check_tensors(tensors: Sequence, expected: Sequence[ExpectedTensor]) -> str | None:
    """None if `tensors` can be loaded into `expected` one for one, else why not (the first problem)."""
    if len(tensors) != len(expected):
        missing = [t.name for t in expected[len(tensors) :]][:3]
        more = f"missing {missing}" if missing else f"{len(tensors) - len(expected)} extra"
        return f"{len(tensors)} tensors, the model has {len(expected)} ({more})"
    for tensor, want in zip(tensors, expected, strict=True):
        problem = check_tensor(tensor, want)
        if problem:
            return problem
    return None
