"""Whether the run's model may be built here, decided from its parameter count before any allocation.

peer/run/model.py builds the run's model in float32 on the CPU and then moves it to the device; the
memory plan (peer/machine/fit.py) is measured on the built model. A hostile manifest could otherwise make
a volunteer allocate any size first (one reviewed manifest asked for 15.6 B parameters: 58 GiB).
So peer/run/model.py counts the parameters on torch's meta device (no memory), and building is refused
here when the count passes `MAX_MODEL_PARAMETERS`, or when the float32 weights do not fit the
memory available. With `mode` (a training peer), what must fit is fit.py's static count instead:
weights, gradients, optimizer state and hivemind's copies, the same count `plan_micro_batch`
checks later, so nothing that could train is refused. GB here is 10^9 bytes.
"""

from __future__ import annotations

import torch
from crowdtrain.peer.machine.fit import CannotFit, available_bytes, count_static_bytes, format_bytes

# 8x base125m, the largest preset: what a volunteer's machine may be asked to build at all; a preset
# that needs more raises it
MAX_MODEL_PARAMETERS = 1_000_000_000


class ModelTooLarge(CannotFit):
    """The run's model is bigger than this crowdtrain builds, or than this machine holds."""


def build_needs(
    num_parameters: int, *, on_cpu: bool, mode: str | None, overlap: bool
) -> tuple[int, int, str]:
    """Pure: (RAM bytes, device bytes, what they hold) of building the model: its float32 weights
    are made in RAM, then moved to the device; with `mode`, fit.py's static count of training."""
    weights = 4 * num_parameters
    if mode is None:
        return weights, 0 if on_cpu else weights, "its float32 weights"
    static, host, breakdown = count_static_bytes(
        num_parameters, weights, mode=mode, overlap=overlap, on_cpu=on_cpu
    )
    if on_cpu:
        return static, 0, f"training it ({breakdown})"
    return max(weights, host), static, f"training it ({breakdown})"


def fits_before_building(
    num_parameters: int,
    ram: tuple[int, str],
    device: tuple[int, str] | None,
    *,
    mode: str | None = None,
    overlap: bool = False,
) -> tuple[bool, str]:
    """Pure: may a model of `num_parameters` be built, given (bytes, where from) of RAM and of the
    device (None: the CPU is the device)?"""
    if num_parameters > MAX_MODEL_PARAMETERS:
        return False, (
            f"the run's model has {num_parameters / 1e9:.2f} B parameters, more than the "
            f"{MAX_MODEL_PARAMETERS / 1e9:.2f} B this crowdtrain builds; it was not allocated. A genuine "
            "run this large needs a crowdtrain with a larger preset; otherwise the manifest is not "
            "the coordinator's (check its address and use --tls)"
        )
    need_ram, need_device, what = build_needs(
        num_parameters, on_cpu=device is None, mode=mode, overlap=overlap
    )
    for need, (available, where), pool in (
        (need_ram, ram, "RAM"),
        (need_device, device or (0, ""), "device"),
    ):
        if need > available:
            return False, (
                f"the run's model ({num_parameters / 1e6:.1f} M parameters) needs {format_bytes(need)} of "
                f"{pool} for {what}, but only {format_bytes(available)} is available ({where}); it was not "
                "allocated. Use a machine with more memory, close other programs, or raise --max-memory-gb "
                "if you set it"
            )
    return True, f"{num_parameters / 1e6:.1f} M parameters: {format_bytes(need_ram)} of RAM for {what}"


def check_before_building(
    num_parameters: int,
    device: torch.device | str,
    *,
    max_memory_gb: float = 0.0,
    mode: str | None = None,
    overlap: bool = False,
) -> str:
    """Raise ModelTooLarge unless `fits_before_building` here and now (the memory free on this
    machine, capped by `max_memory_gb` as fit.py caps it); returns its reason."""
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    ram = available_bytes("cpu", max_memory_gb if on_cpu else 0)
    on_device = None if on_cpu else available_bytes(device, max_memory_gb)
    ok, why = fits_before_building(num_parameters, ram, on_device, mode=mode, overlap=overlap)
    if not ok:
        raise ModelTooLarge(why)
    return why


__all__ = [
    "MAX_MODEL_PARAMETERS",
    "ModelTooLarge",
    "build_needs",
    "check_before_building",
    "fits_before_building",
]
