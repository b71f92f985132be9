"""Where a volunteer trains: the torch device from `--device`, and how it is shown to operators.

device = pick_device("auto")      # CUDA when torch sees a GPU, else Apple MPS, else cpu; says why
describe_device(device)           # "cuda:0 (NVIDIA H100)" or "cpu (8 threads)"
"""

from __future__ import annotations

import logging

from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)


class DeviceError(CrowdtrainError):
    """The requested device cannot be used; the message says what to use instead."""


def choose_device(requested: str, gpu: int, cuda_count: int, mps: bool) -> tuple[str, str]:
    """Pure: (torch device, why) for `--device` and `--gpu` (-1: not given), given how many CUDA GPUs
    torch sees and whether Apple's Metal (MPS) is available. `auto` picks CUDA, then MPS, then CPU."""
    if gpu >= 0:
        if requested not in ("auto", "cuda"):
            raise DeviceError(f"--gpu {gpu} goes with --device auto or cuda, not --device {requested}")
        requested = f"cuda:{gpu}"
    if requested == "auto":
        if cuda_count:
            return (
                "cuda:0",
                f"auto: torch sees {cuda_count} CUDA GPU(s), using the first (--gpu N picks another)",
            )
        if mps:
            return "mps", "auto: no CUDA GPU, Apple's Metal (MPS) is available"
        return "cpu", "auto: torch sees no CUDA GPU and no Apple MPS"
    if requested == "cuda" or requested.startswith("cuda:"):
        index = requested.partition(":")[2] or "0"
        if not cuda_count:
            raise DeviceError(
                f"--device {requested} was requested but torch sees no CUDA GPU; use --device cpu or "
                "install a CUDA build of torch"
            )
        if not index.isdigit() or int(index) >= cuda_count:
            raise DeviceError(
                f"{requested} does not exist: torch sees {cuda_count} CUDA GPU(s), cuda:0 to cuda:{cuda_count - 1}"
            )
        return f"cuda:{int(index)}", "as requested" if gpu < 0 else f"--gpu {gpu}"
    if requested == "mps":
        if not mps:
            raise DeviceError("--device mps was requested but Apple's Metal (MPS) is not available here")
        return "mps", "as requested"
    if requested == "cpu":
        return "cpu", "as requested"
    raise DeviceError(f"--device {requested!r} is not one of auto, cpu, cuda, cuda:N, mps")


def pick_device(requested: str, gpu: int = -1):
    """`choose_device` with what this machine's torch sees, as a torch.device; logs the choice."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    name, why = choose_device(
        requested, gpu, torch.cuda.device_count(), bool(mps and mps.is_available() and mps.is_built())
    )
    logger.info("training on %s (%s)", name, why)
    return torch.device(name)


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"
