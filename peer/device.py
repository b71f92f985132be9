"""Where a volunteer trains: the torch device from `--device`, and how it is shown to operators.

device = pick_device("auto")      # cuda when torch sees a GPU, else cpu
describe_device(device)           # "cuda:0 (NVIDIA H100)" or "cpu (8 threads)"
"""

from __future__ import annotations

from crowdtrain.peer.errors import CrowdtrainError


class DeviceError(CrowdtrainError):
    """The requested device cannot be used; the message says what to use instead."""


def pick_device(requested: str):
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch.device; a GPU torch cannot see is an error."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but torch sees no CUDA GPU; use --device cpu or install a CUDA build"
        )
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
