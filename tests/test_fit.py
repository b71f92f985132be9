"""Fitting training to the machine (peer/machine/fit.py, peer/machine/accumulate.py): measured memory needs, the
micro-batch a memory cap allows, gradient accumulation that keeps the full batch's gradient, the
out-of-memory back-off, and the precision choice. A tiny Llama built the way peers build it."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.machine.accumulate import (
    AccumulatingStep,
    back_off,
    choose_precision,
    decide_precision,
)
from crowdtrain.peer.machine.fit import (
    SAFETY_MARGIN,
    CannotFit,
    FitError,
    available_bytes,
    count_static_bytes,
    format_bytes,
    is_out_of_memory,
    measure_memory,
    plan_micro_batch,
)
from crowdtrain.peer.run.manifest import DataSpec, ShardSpec, TokenizerSpec, build_manifest, get_preset
from crowdtrain.peer.run.model import build_model

VOCAB, SEQ_LEN, BATCH = 96, 16, 8
CUDA_OOM = torch.cuda.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.8 GiB total)"
)
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
)
MPS_OOM = RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)")


def tiny_model() -> torch.nn.Module:
    """The run's model (peer/run/model.py) from a manifest of a shrunken `tiny` preset."""
    preset = dataclasses.replace(
        get_preset("tiny"),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,
    )
    shard = ShardSpec("shard-0.bin", "0" * 64, 1, 1)
    manifest = build_manifest(
        preset,
        run_id="ct_fit",
        created_unix_s=1.0,
        tokenizer=TokenizerSpec("byte-level-bpe", VOCAB, "0" * 64),
        data=DataSpec("test", SEQ_LEN, 0.1, shard, (shard,), 4),
    )
    return build_model(manifest, "cpu")


def tokens(batch: int = BATCH, seq_len: int = SEQ_LEN, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def full_batch_gradient(model, batch) -> tuple[float, list[torch.Tensor]]:
    """The reference: one forward and backward over the whole batch."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    assert sum(g.norm() for g in grads) > 0
    return loss.item(), grads


def assert_same_gradient(model, reference: list[torch.Tensor]) -> None:
    for p, ref in zip(model.parameters(), reference, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


class RefusesOver(torch.nn.Module):
    """Test double: the real model, but out of memory when given more than `limit` sequences
    (or, with `fail_call`, once at that call), as the allocator would say it. `sizes` records
    every micro-batch it was called with."""

    def __init__(self, model, limit: int, error: BaseException, fail_call: int = 0):
        super().__init__()
        self.inner, self.limit, self.error, self.fail_call = model, limit, error, fail_call
        self.sizes: list[int] = []

    def forward(self, input_ids, labels):
        self.sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > self.limit or len(self.sizes) == self.fail_call:
            raise self.error
        return self.inner(input_ids=input_ids, labels=labels)


# ------------------------------------------------------------------ accumulation


def test_the_gradient_accumulated_at_micro_batch_3_is_the_full_batch_gradient():
    model, batch = tiny_model(), tokens()
    full_loss, reference = full_batch_gradient(model, batch)
    step = AccumulatingStep(model, 3)  # chunks of 3, 3 and 2
    loss = step(batch)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert_same_gradient(model, reference)
    assert step.micro_batch == 3 and step.back_offs == 0


def test_a_malformed_batch_is_refused_clearly():
    step = AccumulatingStep(tiny_model(), 2)
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long)):
        with pytest.raises(FitError, match="sequences, tokens"):
            step(bad)
    with pytest.raises(FitError, match="positive integer"):
        AccumulatingStep(tiny_model(), 0)


# ------------------------------------------------------------------ measuring


def test_measured_activations_grow_with_seq_len_and_measuring_leaves_the_model_as_it_was():
    model = tiny_model()
    batch = tokens(2)
    model(input_ids=batch, labels=batch).loss.backward()  # some real gradients to keep
    first = next(model.parameters())
    first.grad = None  # and one parameter without a .grad
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    short, long = measure_memory(model, SEQ_LEN // 2, "cpu"), measure_memory(model, SEQ_LEN, "cpu")

    assert 0 < short.per_sequence_bytes < long.per_sequence_bytes
    assert short.static_bytes == long.static_bytes > 0
    assert long.per_sequence_bytes >= 2 * SEQ_LEN * VOCAB * 4  # at least the logits and their gradient
    assert long.activation_base_bytes < long.parameter_bytes  # the weights are not activations
    for p, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, before)
    for p, before in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    assert first.grad is None and not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_running_out_of_memory_while_measuring():
    """Out of memory at 2 sequences: everything measured at 1 is taken to scale; at 1: CannotFit."""
    model = tiny_model()
    reference = measure_memory(model, SEQ_LEN, "cpu")
    one = reference.activation_base_bytes + reference.per_sequence_bytes
    needs = measure_memory(RefusesOver(model, limit=1, error=CPU_OOM), SEQ_LEN, "cpu", vocab_size=VOCAB)
    assert needs.per_sequence_bytes == one and needs.activation_base_bytes == 0
    with pytest.raises(CannotFit, match=f"one sequence of {SEQ_LEN} tokens"):
        measure_memory(RefusesOver(model, limit=0, error=CUDA_OOM), SEQ_LEN, "cpu", vocab_size=VOCAB)


def test_the_static_count_follows_hiveminds_copies():
    """fp32 model: sync keeps weights, .grad and accumulators on the device and 4 fp32 copies in
    RAM; diloco 4 on the device and 3 (4 with overlap) in RAM; on the CPU it is one pool."""
    n = 1000
    assert count_static_bytes(n, 4 * n, mode="sync", overlap=False, on_cpu=False)[:2] == (
        3 * 4 * n,
        4 * 4 * n,
    )
    assert count_static_bytes(n, 4 * n, mode="sync", overlap=True, on_cpu=True)[:2] == (7 * 4 * n, 0)
    assert count_static_bytes(n, 2 * n, mode="diloco", overlap=False, on_cpu=False)[:2] == (
        4 * 2 * n,
        3 * 4 * n,
    )
    assert count_static_bytes(n, 4 * n, mode="diloco", overlap=True, on_cpu=False)[:2] == (
        4 * 4 * n,
        4 * 4 * n,
    )
    with pytest.raises(FitError, match="swarm mode"):
        count_static_bytes(n, 4 * n, mode="async", overlap=False, on_cpu=True)
    model = tiny_model()
    needs = measure_memory(model, SEQ_LEN)
    assert needs.static_bytes == 7 * needs.parameter_bytes and needs.host_bytes == 0


# ------------------------------------------------------------------ planning under a cap


def test_a_memory_cap_for_k_sequences_gives_micro_batch_k_and_the_full_batch_gradient():
    model, batch = tiny_model(), tokens()
    needs = measure_memory(model, SEQ_LEN, "cpu")
    k = 3
    cap_gb = (needs.total_bytes(k) + needs.per_sequence_bytes // 2) / (1 - SAFETY_MARGIN) / 1e9
    available, where = available_bytes("cpu", cap_gb, held_bytes=needs.parameter_bytes)
    micro, why = plan_micro_batch(BATCH, needs, available, where)
    assert micro == k < BATCH
    assert "--max-memory-gb" in why and "the last of 2" in why
    full_loss, reference = full_batch_gradient(model, batch)
    loss = AccumulatingStep(model, micro)(batch)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert_same_gradient(model, reference)


def test_plenty_of_memory_gives_the_whole_batch_at_once():
    needs = measure_memory(tiny_model(), SEQ_LEN, "cpu")
    micro, why = plan_micro_batch(BATCH, needs, needs.total_bytes(BATCH) * 10)
    assert micro == BATCH and "chunks" not in why


def test_a_cap_below_the_static_need_cannot_fit_and_says_the_numbers():
    needs = measure_memory(tiny_model(), SEQ_LEN, "cpu")
    cap_gb = needs.static_bytes / 2 / 1e9
    available, where = available_bytes("cpu", cap_gb)
    with pytest.raises(CannotFit) as caught:
        plan_micro_batch(BATCH, needs, available, where)
    message = str(caught.value)
    assert isinstance(caught.value, CrowdtrainError)
    for number in (needs.static_bytes + needs.activation_base_bytes, needs.per_sequence_bytes, available):
        assert format_bytes(number) in message
    assert f"--max-memory-gb {cap_gb:g}" in message and "raise --max-memory-gb" in message


def test_too_little_ram_for_hiveminds_copies_cannot_fit():
    needs = dataclasses.replace(measure_memory(tiny_model(), SEQ_LEN, "cpu"), host_bytes=10**9)
    with pytest.raises(CannotFit, match="CPU copies"):
        plan_micro_batch(BATCH, needs, needs.total_bytes(BATCH), host_available=10**8)


def test_the_budget_is_the_cap_less_the_margin_and_bad_caps_are_refused():
    uncapped, why = available_bytes("cpu", 0)
    assert uncapped > 0 and "RAM" in why
    capped, why = available_bytes("cpu", 0.001)
    assert capped == int(int(0.001 * 1e9) * (1 - SAFETY_MARGIN)) and "--max-memory-gb 0.001" in why
    for bad in (-1.0, math.nan, math.inf, "2"):
        with pytest.raises(FitError, match="--max-memory-gb"):
            available_bytes("cpu", bad)
    with pytest.raises(FitError, match="batch size"):
        plan_micro_batch(0, measure_memory(tiny_model(), SEQ_LEN), capped)


# ------------------------------------------------------------------ out-of-memory back-off


@pytest.mark.parametrize("error", [CUDA_OOM, CPU_OOM, MPS_OOM], ids=["cuda", "cpu", "mps"])
def test_out_of_memory_backs_off_8_4_2_and_keeps_the_full_batch_gradient(error, caplog):
    model, batch = tiny_model(), tokens()
    full_loss, reference = full_batch_gradient(model, batch)
    double = RefusesOver(model, limit=2, error=error)
    step = AccumulatingStep(double, BATCH)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.peer.machine.accumulate"):
        loss = step(batch)
    assert double.sizes == [8, 4, 2, 2, 2, 2]
    assert step.micro_batch == 2 and step.back_offs == 2
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert_same_gradient(model, reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "micro-batch 4" in warnings[0] and "micro-batch 2" in warnings[1]


def test_a_failure_mid_batch_zeroes_the_partial_gradient_before_redoing_the_batch():
    model, batch = tiny_model(), tokens()
    _, reference = full_batch_gradient(model, batch)
    double = RefusesOver(model, limit=BATCH, error=CPU_OOM, fail_call=2)  # after one chunk's backward
    step = AccumulatingStep(double, 4)
    step(batch)
    assert double.sizes == [4, 4, 2, 2, 2, 2] and step.micro_batch == 2
    assert_same_gradient(model, reference)


def test_out_of_memory_even_at_one_sequence_is_a_clear_error():
    model = tiny_model()
    step = AccumulatingStep(RefusesOver(model, limit=0, error=CUDA_OOM), BATCH)
    with pytest.raises(FitError, match="even at micro-batch 1") as caught:
        step(tokens())
    assert "CUDA out of memory" in str(caught.value) and "machine with more memory" in str(caught.value)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_other_errors_are_not_taken_for_out_of_memory():
    step = AccumulatingStep(RefusesOver(tiny_model(), limit=0, error=RuntimeError("shape mismatch")), 4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        step(tokens())
    assert step.micro_batch == 4
    assert all(is_out_of_memory(e) for e in (CUDA_OOM, CPU_OOM, MPS_OOM, MemoryError()))
    assert not any(
        is_out_of_memory(e) for e in (RuntimeError("expected scalar type"), ValueError("out of memory"))
    )
    assert [back_off(m) for m in (8, 5, 2)] == [4, 2, 1]


# ------------------------------------------------------------------ precision


def test_precision_on_the_cpu():
    dtype, why = choose_precision("cpu", "auto")
    assert dtype is None and "fp32" in why and "slower" in why
    assert choose_precision("cpu", "fp32")[0] is None
    dtype, why = choose_precision(torch.device("cpu"), "bf16")  # accepted: it runs, if slowly
    assert dtype is torch.bfloat16 and "slower" in why
    for bad in ("fp16", "", "bfloat16", None):
        with pytest.raises(FitError, match="--precision"):
            choose_precision("cpu", bad)


def test_precision_decisions_for_gpus():
    assert decide_precision("cuda", "auto", True)[0] == "bf16"
    assert decide_precision("cuda", "auto", False)[0] is None
    assert decide_precision("mps", "auto", True)[0] is None
    for device in ("cuda", "mps"):
        with pytest.raises(FitError, match="use --precision fp32"):
            decide_precision(device, "bf16", False)


def test_a_bf16_step_on_the_cpu_trains_like_fp32():
    model, batch = tiny_model(), tokens()
    full_loss, reference = full_batch_gradient(model, batch)
    loss = AccumulatingStep(model, 3, dtype=torch.bfloat16)(batch)
    assert loss == pytest.approx(full_loss, abs=0.05)
    cosines = [
        torch.nn.functional.cosine_similarity(p.grad.flatten(), r.flatten(), dim=0)
        for p, r in zip(model.parameters(), reference, strict=True)
    ]
    assert min(cosines) > 0.95
    needs_bf16 = measure_memory(model, SEQ_LEN, dtype=torch.bfloat16)
    assert needs_bf16.per_sequence_bytes > 0
