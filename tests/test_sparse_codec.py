"""The sparse pseudo-gradient codec (peer/robust/sparsecodec.py, `grad_compression = "topk2bit"`):
exact on what it produced, error feedback that loses nothing over rounds, its size against fp32,
hostile parts refused, and averaging inside hivemind's all-reduce (peer/swarm/averaging.py)."""

from __future__ import annotations

import struct
import time

import hivemind
import pytest
import torch
from crowdtrain.peer.robust.sparsecodec import HEADER, MAX_PART_VALUES, ErrorFeedback, TopKCodec, encoded_size
from crowdtrain.peer.run.manifest import ManifestError, SwarmSpec, check_swarm, get_preset, override_swarm
from crowdtrain.peer.swarm.averaging import GuardedAverager, grad_compression
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

LOCAL = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])


def encode(codec: TopKCodec, tensor: torch.Tensor):
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 41, 4096, 4096 * 3 + 1000, 100_003])
def test_already_sparse_input_round_trips_exactly(numel: int, bits: int):
    codec = TopKCodec(fraction=0.01, chunk=4096, bits=bits)
    sparse = codec.sparsify(torch.randn(numel, generator=torch.Generator().manual_seed(numel)))
    assert torch.equal(codec.sparsify(sparse), sparse)  # idempotent
    message = encode(codec, sparse)
    assert len(message.buffer) == encoded_size(numel, 4096, codec.k, bits)
    received = deserialize_torch_tensor(message)  # through hivemind's own table
    assert received.dtype == torch.float32 and torch.equal(received, sparse)
    kept = int((sparse.view(-1)[: numel - numel % 4096] != 0).sum())
    assert kept <= (numel // 4096) * codec.k  # at most k per full chunk


def test_error_feedback_makes_the_sum_of_applied_averages_track_the_sum_of_true_ones():
    """3 peers, each round a shared direction plus each peer's noise, averaged as the all-reduce
    does: parts sparsified with error feedback, the mean re-sparsified on the way back (4-bit,
    rounded at random). Without error feedback top-k keeps dropping the same small coordinates and
    the sums stay far apart; with it the gap shrinks relative to the sum, and what the peers'
    residuals do not hold (the return's rounding) stays a few percent of it."""
    codec = TopKCodec(fraction=0.01, chunk=512, bits=2, return_bits=4)
    back_codec, rounding = codec.for_returns(), torch.Generator().manual_seed(1)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(4096, generator=g)
    peers = [ErrorFeedback(codec) for _ in range(3)]
    true_sum, applied_sum, plain_sum = torch.zeros(4096), torch.zeros(4096), torch.zeros(4096)
    relative = {}
    for round_index in range(400):
        outer = [torch.full((1,), float(round_index))]  # the outer model moves every round
        updates = [direction + torch.randn(4096, generator=g) for _ in peers]
        sent = []
        for feedback, update in zip(peers, updates, strict=True):
            sent.append(update.clone())
            feedback.sparsify_(sent[-1:], outer)
        again = [updates[0].clone()]  # hivemind may load a round again before it is used
        peers[0].sparsify_(again, outer)
        returned = back_codec.sparsify(torch.stack(sent).mean(0), rounding=rounding)
        for feedback, update in zip(peers, updates, strict=True):
            feedback.commit(lambda update=update: iter([update]), outer, [returned])
        after = [updates[0].clone()]  # ... or after (a lone peer's pre-scheduled round): sent as it was
        peers[0].sparsify_(after, outer)
        peers[0].commit(
            lambda first=updates[0]: iter([first]), outer, [returned]
        )  # and never committed twice
        assert torch.equal(again[0], sent[0]) and torch.equal(after[0], sent[0])
        true_sum += torch.stack(updates).mean(0)
        applied_sum += returned
        plain_sum += back_codec.sparsify(torch.stack([codec.sparsify(u) for u in updates]).mean(0))
        if round_index in (99, 399):
            relative[round_index + 1] = float((true_sum - applied_sum).norm() / true_sum.norm())
    plain = float((true_sum - plain_sum).norm() / true_sum.norm())
    pending = torch.stack([feedback.residuals[0] for feedback in peers]).mean(0)
    lost = float((true_sum - applied_sum - pending).norm() / true_sum.norm())
    assert relative[400] < 0.4 and relative[400] < 0.6 * relative[100] and plain > 0.7, (relative, plain)
    assert lost < 0.03, lost


def test_base125m_rounds_are_at_least_250x_smaller_than_fp32():
    """Bytes per value from real encoded buffers of parts of 2^22 values, scaled to base125m's
    124.3M parameters: a round sends as many values in parts (2-bit) as it gets back in averages
    (4-bit), so the mean of both against fp32."""
    codec = grad_compression("topk2bit")
    numel = MAX_PART_VALUES // 4  # 4.2M values: the bytes per value of a full part to 0.01%
    sample = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 1e-3
    part = encode(codec, codec.sparsify(sample))
    average = encode(codec.for_returns(), codec.for_returns().sparsify(sample))
    assert len(part.buffer) == encoded_size(numel, codec.chunk, codec.k, codec.bits)
    assert len(average.buffer) == encoded_size(numel, codec.chunk, codec.k, codec.return_bits)
    bytes_per_value = (len(part.SerializeToString()) + len(average.SerializeToString())) / 2 / numel
    parameters = get_preset("base125m").num_parameters()
    ratio = (4 * parameters) / (bytes_per_value * parameters)
    assert ratio >= 250, ratio
    assert codec.estimate_compression_ratio(CompressionInfo.from_tensor(sample)) == 2**21 / (4 * 2**24)


def test_hivemind_cuts_parts_that_fit_its_messages_and_align_with_chunks():
    """Dense knobs get smaller parts (a stream message must stay small); every part size is a power
    of two of whole chunks, and hivemind's own split gives exactly that many values."""
    from hivemind.averaging.partition import TensorPartContainer

    for fraction, bits, chunk in ((0.01, 2, 4096), (0.5, 8, 64), (1.0, 8, 65536)):
        codec = TopKCodec(fraction=fraction, chunk=chunk, bits=bits, return_bits=bits)
        values = codec.part_values()
        assert values % chunk == 0 and values & (values - 1) == 0
        assert encoded_size(values, chunk, codec.k, bits) <= 2**21
        tensor = torch.zeros(values + 5)
        container = TensorPartContainer([tensor], (1.0,), compression=codec, part_size_bytes=2**21)
        assert [len(part) for part, _ in container._input_parts_by_peer[0]] == [values, 5]


def _message(buffer: bytes, numel: int, dtype: str = "float32"):
    return hivemind.proto.runtime_pb2.Tensor(
        compression=TopKCodec.compression_type, buffer=buffer, size=[numel], dtype=dtype
    )


def _hostile_parts():
    codec = TopKCodec(fraction=0.01, chunk=64, bits=2)  # k = 1 of 64: one position per chunk
    good = encode(codec, codec.sparsify(torch.randn(640)))
    buffer, numel = bytes(good.buffer), 640
    header = bytearray(buffer[: HEADER.size])
    body = bytearray(buffer[HEADER.size :])
    bitmap_bytes = 3  # Elias-Fano, k=1 of 64: 6 low bits, and 2 bits (k + 1 bucket) per chunk: 20 bits
    scales_at = len(body) - 20

    def patched(**fields):
        values = dict(
            zip(("magic", "version", "bits", "chunk", "k", "numel"), HEADER.unpack(header), strict=True)
        )
        values.update(fields)
        return HEADER.pack(*values.values()) + bytes(body)

    no_position = bytearray(body)
    no_position[:bitmap_bytes] = bytes(bitmap_bytes)  # a chunk with 0 positions instead of k
    beyond = bytearray(body)
    beyond[:bitmap_bytes] = bytes(bitmap_bytes)
    beyond[:bitmap_bytes] = bytes([0b01010101, 0b01010101, 0b01010000])  # every chunk in bucket 1: 64+
    nan_scale, inf_scale, negative = bytearray(body), bytearray(body), bytearray(body)
    nan_scale[scales_at : scales_at + 2] = struct.pack("<H", 0x7FC0)  # bfloat16 NaN
    inf_scale[scales_at : scales_at + 2] = struct.pack("<H", 0x7F80)
    negative[scales_at : scales_at + 2] = struct.pack("<H", 0xBF80)  # -1.0
    return {
        "truncated": _message(buffer[:-1], numel),
        "too long": _message(buffer + b"\0", numel),
        "empty": _message(b"", numel),
        "huge count": _message(patched(numel=2**31), 2**31),
        "count over the part limit": _message(patched(numel=MAX_PART_VALUES + 1), MAX_PART_VALUES + 1),
        "size disagrees with header": _message(buffer, 2**32 - 1),
        "not float32": _message(buffer, numel, "float64"),
        "bad magic": _message(patched(magic=b"XXXX"), numel),
        "chunk not a power of two": _message(patched(chunk=100), numel),
        "k over chunk": _message(patched(k=65), numel),
        "zero bits": _message(patched(bits=0), numel),
        "no position in a chunk": _message(bytes(header) + bytes(no_position), numel),
        "positions beyond the chunk": _message(bytes(header) + bytes(beyond), numel),
        "nan scale": _message(bytes(header) + bytes(nan_scale), numel),
        "inf scale": _message(bytes(header) + bytes(inf_scale), numel),
        "negative scale": _message(bytes(header) + bytes(negative), numel),
    }


@pytest.mark.parametrize("kind", list(_hostile_parts()))
def test_a_hostile_part_is_refused_without_a_crash_or_a_big_allocation(kind: str):
    message = _hostile_parts()[kind]
    started = time.perf_counter()
    with pytest.raises(ValueError):
        deserialize_torch_tensor(message)
    assert time.perf_counter() - started < 0.5, "refused only after allocating from the declared size"


def test_the_positions_of_a_one_position_chunk_must_stay_inside_it():
    """k=1 of 64 values: position 63 decodes, bucket 1 (positions 64 and up) is refused."""
    codec = TopKCodec(fraction=0.01, chunk=64, bits=2)
    message = encode(codec, torch.tensor([0.0] * 63 + [1.0]))  # one chunk, position 63
    assert deserialize_torch_tensor(message)[63] == 1.0
    body = bytearray(message.buffer)
    body[HEADER.size] = 0b01000000  # the chunk's 2-bit bitmap says bucket 1: position 64 + low bits
    with pytest.raises(ValueError, match="outside"):
        deserialize_torch_tensor(_message(bytes(body), 64))


def test_the_sparse_codec_needs_the_low_communication_mode_and_sane_knobs():
    spec = get_preset("tiny").swarm
    with pytest.raises(ManifestError, match="needs mode=diloco"):
        override_swarm(spec, ["grad_compression=topk2bit"])
    ok = override_swarm(spec, ["grad_compression=topk2bit", "mode=diloco", "sparse_fraction=0.02"])
    assert grad_compression(ok.grad_compression, ok).k == round(0.02 * 4096)
    for bad in (
        "sparse_chunk=1000",
        "sparse_chunk=32",
        "sparse_bits=9",
        "sparse_fraction=0",
        "sparse_fraction=2",
    ):
        with pytest.raises(ManifestError, match=bad.split("=")[0]):
            override_swarm(ok, [bad])
    assert check_swarm(SwarmSpec(1, 1, 1.0, 1.0, 1, 1.0)).sparse_bits == 2


@pytest.fixture(scope="module")
def dhts():
    # one torch thread while averagers fork from this process: a fork while torch's OpenMP pool is
    # busy can leave the child broken (an averager child crashed in a two-worker run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = hivemind.DHT(start=True, **LOCAL)
    nodes = [root] + [
        hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True, **LOCAL) for _ in range(3)
    ]
    yield nodes
    for dht in nodes:
        dht.shutdown()
    torch.set_num_threads(threads)


def honest_sparse_parts(codec: TopKCodec, peers: int = 3) -> list[list[torch.Tensor]]:
    """Each peer's sparse pseudo-gradients: a shared direction plus its own noise."""
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(30_000, generator=g), torch.randn(5_000, generator=g)]
    return [
        [codec.sparsify(d + 0.5 * torch.randn(d.shape, generator=g)) for d in direction] for _ in range(peers)
    ]


def average_once(dhts, prefix: str, tensors_per_peer, attacker=None) -> list[list[torch.Tensor]]:
    """One round of robust averagers with the sparse codec (+ a stock hivemind sender sending
    `attacker`'s tensors with the same codec): the honest averagers' tensors afterwards."""
    codec = grad_compression("topk2bit")
    size = len(tensors_per_peer) + (attacker is not None)
    common = dict(
        prefix=prefix,
        target_group_size=size,
        min_group_size=size,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        allreduce_timeout=30.0,
        next_chunk_timeout=10.0,
        compression=codec,
        part_size_bytes=2**21,
        start=True,
    )
    averagers = [
        GuardedAverager([t.clone() for t in tensors], dht=dht, **common)
        for tensors, dht in zip(tensors_per_peer, dhts, strict=False)
    ]
    if attacker is not None:
        averagers.append(
            DecentralizedAverager(attacker, dht=dhts[len(tensors_per_peer)], client_mode=True, **common)
        )
    try:
        controls = [a.step(wait=False, timeout=20) for a in averagers]
        for control in controls:
            assert len(control.result(timeout=25)) == size
        results = []
        for averager in averagers[: len(tensors_per_peer)]:
            with averager.get_tensors() as tensors:
                results.append([t.clone() for t in tensors])
        return results
    finally:
        for averager in averagers:
            averager.shutdown()


def test_three_averagers_agree_on_the_sparse_mean_within_the_codec_error(dhts):
    """Three robust averagers with the codec average sparse pseudo-gradients: every peer ends with
    the same update, the mean re-sparsified on the way back."""
    codec = grad_compression("topk2bit")
    peers = honest_sparse_parts(codec)
    mean = [torch.stack(parts).mean(0) for parts in zip(*peers, strict=True)]
    results = average_once(dhts, "sparse", peers)
    for result in results[1:]:
        for a, b in zip(result, results[0], strict=True):
            assert torch.allclose(a, b, atol=1e-6)  # the same update everywhere (to rounding)
    back_codec = codec.for_returns()
    for got, want in zip(results[0], mean, strict=True):
        nearest = back_codec.sparsify(want)  # the reducers round at random between the two nearest levels
        assert torch.equal(got != 0, nearest != 0)  # the same top-k positions
        step = 2 / (2**back_codec.bits - 1) * float(want.abs().max())
        assert float((got - want)[got != 0].abs().max()) <= step + 1e-6
        assert float((got - want).norm()) <= 1.2 * float((nearest - want).norm()) + 1e-4


def test_a_huge_sparse_part_is_dropped_by_robust_aggregation(dhts):
    """A stock hivemind sender's well-encoded sparse part x1e4 goes through robust reduction like
    any other: the honest peers end near their own mean, not pulled a thousand-fold."""
    codec = grad_compression("topk2bit")
    peers = honest_sparse_parts(codec)
    honest_mean = [torch.stack(parts).mean(0) for parts in zip(*peers, strict=True)]
    attack = [codec.sparsify(t * 1e4) for t in honest_sparse_parts(codec, peers=4)[3]]
    results = average_once(dhts, "sparse-attacked", peers, attacker=attack)
    for result in results:
        for got, want in zip(result, honest_mean, strict=True):
            assert float((got - want).norm()) < 2 * float(want.norm()), float(
                (got - want).norm() / want.norm()
            )
