"""Which device a volunteer trains on (peer/machine/device.py): `--device auto` picks CUDA, then Apple
MPS, then the CPU and says why; what cannot be used is refused with what to use instead."""

from __future__ import annotations

import pytest
from crowdtrain.peer.machine.device import DeviceError, choose_device, pick_device


@pytest.mark.parametrize(
    "requested, gpu, cuda_count, mps, device, why",
    [
        ("auto", -1, 2, True, "cuda:0", "torch sees 2 CUDA GPU(s), using the first"),
        ("auto", -1, 0, True, "mps", "Apple's Metal (MPS)"),
        ("auto", -1, 0, False, "cpu", "no CUDA GPU and no Apple MPS"),
        ("auto", 1, 2, False, "cuda:1", "--gpu 1"),
        ("cuda", 1, 2, False, "cuda:1", "--gpu 1"),
        ("cuda", -1, 1, False, "cuda:0", "as requested"),
        ("cuda:1", -1, 2, False, "cuda:1", "as requested"),
        ("mps", -1, 0, True, "mps", "as requested"),
        ("cpu", -1, 4, True, "cpu", "as requested"),
    ],
)
def test_the_device_and_the_reason(requested, gpu, cuda_count, mps, device, why):
    chosen, reason = choose_device(requested, gpu, cuda_count, mps)
    assert chosen == device and why in reason


@pytest.mark.parametrize(
    "requested, gpu, cuda_count, mps, message",
    [
        ("cuda", -1, 0, False, "torch sees no CUDA GPU; use --device cpu"),
        ("auto", 2, 2, False, "torch sees 2 CUDA GPU\\(s\\), cuda:0 to cuda:1"),
        ("cuda:x", -1, 1, False, "does not exist"),
        ("cpu", 0, 1, False, "--gpu 0 goes with --device auto or cuda"),
        ("mps", -1, 0, False, "MPS\\) is not available"),
        ("tpu", -1, 0, False, "not one of auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_a_device_that_cannot_be_used_is_refused_with_what_to_use(requested, gpu, cuda_count, mps, message):
    with pytest.raises(DeviceError, match=message):
        choose_device(requested, gpu, cuda_count, mps)


def test_this_machine_trains_on_what_torch_sees(caplog):
    import logging

    import torch

    with caplog.at_level(logging.INFO, logger="crowdtrain.peer.machine.device"):
        device = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert device.type == expected
    assert any("training on" in r.getMessage() and "auto:" in r.getMessage() for r in caplog.records)
