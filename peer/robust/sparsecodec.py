"""`TopKCodec`: pseudo-gradients as top-k per chunk with low-bit values (`grad_compression = "topk2bit"`).

What travels (SparseLoCo's scheme, Sarfi et al. 2025, in hivemind's all-reduce): every tensor is cut
into chunks of `chunk` values (a power of two; the tail of a tensor is a shorter chunk); of each
chunk only the `k = round(fraction x chunk)` values of largest magnitude are kept, each as a `bits`-bit
code of a symmetric uniform grid over [-scale, +scale], `scale` being the chunk's largest kept
magnitude (stored as bfloat16). The kept positions are Elias-Fano coded (about
2 + log2(chunk / k) bits each: 8.6 at 1% of 4,096), so 1% of a chunk at 2 bits costs ~0.11 bits per
value: ~290x fewer bytes than fp32.

The codec is lossy, and *idempotent*: `sparsify(sparsify(x)) == sparsify(x)` bit for bit, and
`decode(encode(x)) == sparsify(x)`. That is what makes it usable inside an all-reduce:
- each peer sends `sparsify(pseudo-gradient + residual)` and keeps what it did not send as its
  residual (error feedback, `ErrorFeedback`, held by peer/swarm/diloco.py), so the codec then
  encodes an already-sparse part exactly;
- a reducer returns its (robust) average of a span snapped by `sparsify`, the same message to every
  sender (peer/swarm/averaging.py), so every peer applies the same outer update.

A part from the network is checked before anything is allocated from it (`extract`): a one-
dimensional float32 part of at most `MAX_PART_VALUES` values, knobs within bounds, a buffer of exactly
the length those imply, exactly k positions per chunk, strictly increasing and inside the chunk,
finite non-negative scales. Anything else raises `ValueError`, which hivemind treats as a failed
sender or reducer.

hivemind 1.1.12 decodes a part with the codec its `CompressionType` names, from a fixed table: this
codec takes the slot of BLOCKWISE_8BIT (bitsandbytes' codec, which crowdtrain never uses), installed
by `install()` when this module is imported, before hivemind forks its averager processes.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import serialization as _hivemind_serialization
from hivemind.proto import runtime_pb2

MAGIC = b"CTK1"
HEADER = struct.Struct("<4sBBxxIII")  # magic, version, bits, (pad), chunk, k, numel
VERSION = 1
# hivemind cuts a tensor into parts of this many values (see `estimate_compression_ratio`): a
# multiple of every chunk size, so a part's chunks are its tensor's chunks; also the most values a
# part from the network may decode to (64 MiB of float32)
MAX_PART_VALUES = 2**24
MIN_CHUNK, MAX_CHUNK = 2**6, 2**16
MAX_BITS = 8


def _k_for(length: int, chunk: int, k: int) -> int:
    """How many values a chunk of `length` values keeps (k for full chunks, in proportion for a tail)."""
    return length if length <= k else min(length, max(1, math.ceil(length * k / chunk)))


def _levels(bits: int) -> torch.Tensor:
    """The grid of a `bits`-bit code in units of the chunk's scale: 2^bits values over [-1, 1]."""
    top = 2**bits - 1
    return torch.tensor([(2 * j - top) / top for j in range(top + 1)], dtype=torch.float32)


def _low_bits(chunk: int, k: int) -> int:
    """Elias-Fano's low-bit width for k positions among `chunk`."""
    return max(0, int(math.floor(math.log2(chunk / k)))) if k < chunk else 0


def _block_sizes(n: int, chunk: int, k: int, bits: int) -> tuple[int, int, int, int]:
    """Bytes of a block of n chunks: (high bitmap, low bits, codes, scales)."""
    low = _low_bits(chunk, k)
    buckets = ((chunk - 1) >> low) + 1
    return (
        (n * (k + buckets) + 7) // 8,
        (n * k * low + 7) // 8,
        (n * k * bits + 7) // 8,
        2 * n,
    )


def _blocks(numel: int, chunk: int, k: int) -> list[tuple[int, int, int]]:
    """(chunks, chunk length, kept per chunk) of the full chunks and of the tail, if any."""
    full, tail = divmod(numel, chunk)
    out = [(full, chunk, k)] if full else []
    if tail:
        out.append((1, tail, _k_for(tail, chunk, k)))
    return out


def encoded_size(numel: int, chunk: int, k: int, bits: int) -> int:
    """The exact length in bytes of an encoded part of `numel` values."""
    return HEADER.size + sum(
        sum(_block_sizes(n, length, kk, bits)) for n, length, kk in _blocks(numel, chunk, k)
    )


def _pack(values: np.ndarray, width: int) -> bytes:
    """The low `width` bits of each value, concatenated (most significant first)."""
    if width == 0 or values.size == 0:
        return b""
    as_bytes = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    return np.packbits(np.unpackbits(as_bytes, axis=1)[:, 32 - width :].reshape(-1)).tobytes()


def _unpack(buffer: bytes, count: int, width: int) -> np.ndarray:
    """`count` values of `width` bits each from `buffer` (as `_pack` wrote them)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=count * width).reshape(count, width)
    padded = np.zeros((count, 32), dtype=np.uint8)
    padded[:, 32 - width :] = bits
    return np.packbits(padded, axis=1).view(">u4").reshape(-1).astype(np.int64)


def _select(
    x: torch.Tensor, k: int, bits: int, rounding: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each row of x (n, length): the k kept positions (ascending), their codes, the row's scale.
    Codes round to the nearest level, or up or down at random in proportion (unbiased) with a
    `rounding` generator; a value on the grid keeps its code either way."""
    idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
    kept = torch.gather(x, 1, idx)
    scale = kept.abs().amax(dim=1).to(torch.bfloat16).float()
    top = 2**bits - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    position = (kept / safe[:, None] * top + top) / 2  # in [0, top], levels at the integers
    if rounding is None:
        codes = torch.round(position)
    else:
        on_grid = position == torch.round(position)
        randomly = torch.floor(position + torch.rand(position.shape, generator=rounding))
        codes = torch.where(on_grid, position, randomly)
    return idx, codes.clamp_(0, top).long(), scale


def _dense(
    idx: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, length: int, bits: int
) -> torch.Tensor:
    """The (n x length) values a block's positions, codes and scales stand for."""
    out = torch.zeros(idx.shape[0], length, dtype=torch.float32)
    out.scatter_(1, idx, _levels(bits)[codes] * scale[:, None])
    return out


class TopKCodec(CompressionBase):
    """hivemind codec of top-k per chunk with `bits`-bit values (see the module docstring)."""

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def __init__(
        self,
        fraction: float = 0.01,
        chunk: int = 4096,
        bits: int = 2,
        part_size_bytes: int = 2**21,
        return_bits: int = 4,
    ):
        if not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk & (chunk - 1) == 0):
            raise ValueError(f"chunk {chunk} is not a power of two in [{MIN_CHUNK}, {MAX_CHUNK}]")
        if not (1 <= bits <= MAX_BITS and 1 <= return_bits <= MAX_BITS and 0 < fraction <= 1):
            raise ValueError(
                f"bits {bits} and return_bits {return_bits} must be in [1, {MAX_BITS}], fraction {fraction} in (0, 1]"
            )
        if part_size_bytes & (part_size_bytes - 1):
            raise ValueError(f"part_size_bytes {part_size_bytes} is not a power of two")
        self.fraction, self.chunk, self.bits, self.return_bits = fraction, chunk, bits, return_bits
        self.k = max(1, min(chunk, round(fraction * chunk)))
        self.part_size_bytes = part_size_bytes

    def for_returns(self) -> TopKCodec:
        """The codec a reducer's averages travel in: the same positions per chunk, `return_bits`
        per value (a 2-bit grid rounding a mean of several peers' values loses too much of it)."""
        return TopKCodec(self.fraction, self.chunk, self.return_bits, self.part_size_bytes, self.return_bits)

    def sparsify(self, tensor: torch.Tensor, rounding: torch.Generator | None = None) -> torch.Tensor:
        """What `tensor` (any shape, chunked along its flattened values) becomes through the codec;
        with a `rounding` generator its values round at random, unbiased (`_select`)."""
        flat = tensor.detach().reshape(-1).float()
        pieces, start = [], 0
        for n, length, k in _blocks(flat.numel(), self.chunk, self.k):
            x = flat[start : start + n * length].view(n, length)
            pieces.append(_dense(*_select(x, k, self.bits, rounding), length, self.bits).view(-1))
            start += n * length
        out = torch.cat(pieces) if pieces else torch.zeros(0)
        return out.view(tensor.shape).to(tensor.dtype)

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).float().cpu()
        if flat.numel() > MAX_PART_VALUES:
            raise ValueError(f"a part of {flat.numel()} values is over {MAX_PART_VALUES}: cut it first")
        sections, start = [HEADER.pack(MAGIC, VERSION, self.bits, self.chunk, self.k, flat.numel())], 0
        for n, length, k in _blocks(flat.numel(), self.chunk, self.k):
            idx, codes, scale = _select(flat[start : start + n * length].view(n, length), k, self.bits)
            start += n * length
            low = _low_bits(length, k)
            buckets = ((length - 1) >> low) + 1
            high = (idx >> low) + torch.arange(k)
            bitmap = torch.zeros(n, k + buckets, dtype=torch.bool)
            bitmap.scatter_(1, high, True)
            sections.append(np.packbits(bitmap.numpy().reshape(-1)).tobytes())
            sections.append(_pack((idx & ((1 << low) - 1)).numpy().reshape(-1), low))
            sections.append(_pack(codes.numpy().reshape(-1), self.bits))
            sections.append(scale.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes())
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=b"".join(sections),
            size=[flat.numel()],
            dtype="float32",
            requires_grad=False,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        numel, chunk, k, bits = _checked_header(serialized_tensor)
        values, offset = [], HEADER.size
        for n, length, kk in _blocks(numel, chunk, k):
            block, offset = _decode_block(buffer, offset, n, length, kk, bits)
            values.append(block.view(-1))
        return torch.cat(values) if values else torch.zeros(0)

    def part_values(self) -> int:
        """Values per part: MAX_PART_VALUES (~230 KB encoded at 1% and 2 bits), halved while a part
        or its average would encode to more than `part_size_bytes` (dense knobs); a power of two of
        at least one chunk, so a part's chunks are its tensor's."""
        values, bits = MAX_PART_VALUES, max(self.bits, self.return_bits)
        while values > self.chunk and encoded_size(values, self.chunk, self.k, bits) > self.part_size_bytes:
            values //= 2
        return values

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        """Chosen so that hivemind cuts tensors into parts of exactly `part_values()` values: hivemind
        1.1.12 takes int(part_size_bytes / (element size x ratio)) values per part (powers of two:
        exact)."""
        element_size = torch.empty((), dtype=info.descriptor.dtype or torch.float32).element_size()
        return self.part_size_bytes / (element_size * self.part_values())

    def __repr__(self):
        return (
            f"TopKCodec(fraction={self.fraction}, chunk={self.chunk}, bits={self.bits}, "
            f"return_bits={self.return_bits})"
        )


def _checked_header(message: runtime_pb2.Tensor) -> tuple[int, int, int, int]:
    """(numel, chunk, k, bits) of an encoded part, once its header and length are consistent."""
    buffer = message.buffer
    if len(buffer) < HEADER.size:
        raise ValueError(f"a topk part of {len(buffer)} bytes is shorter than its header")
    magic, version, bits, chunk, k, numel = HEADER.unpack_from(buffer)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a topk part of version {VERSION} (magic {magic!r}, version {version})")
    if message.dtype != "float32" or list(message.size) != [numel]:
        raise ValueError(
            f"a topk part declares dtype {message.dtype!r}, shape {list(message.size)}, {numel} values"
        )
    if not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk & (chunk - 1) == 0 and 1 <= k <= chunk):
        raise ValueError(f"a topk part declares chunk {chunk} and k {k}")
    if not 1 <= bits <= MAX_BITS or numel > MAX_PART_VALUES:
        raise ValueError(f"a topk part declares {bits} bits and {numel} values (at most {MAX_PART_VALUES})")
    expected = encoded_size(numel, chunk, k, bits)
    if len(buffer) != expected:
        raise ValueError(f"a topk part of {numel} values must be {expected} bytes, not {len(buffer)}")
    return numel, chunk, k, bits


def _decode_block(
    buffer: bytes, offset: int, n: int, length: int, k: int, bits: int
) -> tuple[torch.Tensor, int]:
    """The (n x length) values of one block at `offset` (lengths already checked), and where it ends."""
    low = _low_bits(length, k)
    buckets = ((length - 1) >> low) + 1
    sizes = _block_sizes(n, length, k, bits)
    view = memoryview(buffer)
    sections = []
    for size in sizes:
        sections.append(view[offset : offset + size])
        offset += size
    bitmap = np.unpackbits(np.frombuffer(sections[0], dtype=np.uint8), count=n * (k + buckets))
    bitmap = bitmap.reshape(n, k + buckets)
    if not (bitmap.sum(axis=1) == k).all():
        raise ValueError(f"a topk part has a chunk without exactly {k} positions")
    rows, cols = np.nonzero(bitmap)  # row-major: each row's k positions in ascending order
    high = cols.reshape(n, k) - np.arange(k)
    idx = (high << low) | _unpack(sections[1], n * k, low).reshape(n, k)
    if (idx >= length).any() or (k > 1 and (np.diff(idx, axis=1) <= 0).any()):
        raise ValueError("a topk part has positions outside their chunk or not strictly increasing")
    codes = _unpack(sections[2], n * k, bits).reshape(n, k)
    scale = (
        torch.from_numpy(np.frombuffer(sections[3], dtype="<i2").astype(np.int16))
        .view(torch.bfloat16)
        .float()
    )
    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError("a topk part has a scale that is not finite or is negative")
    return _dense(torch.from_numpy(idx), torch.from_numpy(codes), scale, length, bits), offset


class ErrorFeedback:
    """A peer's residual: what `codec.sparsify` left out of its pseudo-gradients so far, added to the
    next one. Lives with the peer's DiLoCo averager, in memory only: a peer that restarts or joins
    starts with a zero residual.

    Two steps per round: `sparsify_` makes what is sent and leaves the residual alone; `commit`
    updates it once the round's result is used (before the outer step, from the same pseudo-gradient
    recomputed: no copy of the model is kept). hivemind 1.1.12 may load a round's pseudo-gradient
    again after that (a lone peer with a pre-scheduled round: local gradients used, then loaded once
    more): a round is recognised by a digest of the outer model and the pseudo-gradient, and a round
    already committed is sent again as it was (its positions and values are kept: ~1% of the model)
    and never committed twice."""

    def __init__(self, codec: TopKCodec):
        self.codec = codec
        self.residuals: list[torch.Tensor] | None = None
        self._committed: tuple[bytes, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @torch.no_grad()
    def sparsify_(self, tensors, outer) -> None:
        """Replace each pseudo-gradient in `tensors` by what it sends: `sparsify(it + residual)`.
        `outer`: the outer model the pseudo-gradients were measured from."""
        if self.residuals is None:
            self.residuals = [torch.zeros_like(t) for t in tensors]
        if self._committed is not None and self._committed[0] == _digest(outer, tensors):
            for tensor, (positions, values) in zip(tensors, self._committed[1], strict=True):
                tensor.zero_().view(-1)[positions] = values
            return
        for tensor, residual in zip(tensors, self.residuals, strict=True):
            tensor.copy_(self.codec.sparsify(tensor.add_(residual)))

    @torch.no_grad()
    def commit(self, pseudo_gradients, outer, returned=None) -> None:
        """The round's pseudo-gradients were sent: keep what was left out. `pseudo_gradients()`
        yields them (as `sparsify_` got them) one tensor at a time; it is called twice.

        `returned`: the round's average as the reducers sent it back (re-sparsified by the codec).
        Where it is zero, what we sent was dropped on the way back: that stays in the residual too,
        so it is sent again next round. Each peer keeping its own dropped values makes the next
        round's mean carry what this round's mean lost outside its returned support (exactly, for
        equal weights in both rounds; the 2-bit rounding of the returned values is not carried)."""
        if self.residuals is None:
            return
        digest = _digest(outer, pseudo_gradients())
        if self._committed is not None and self._committed[0] == digest:
            return
        sent = []
        back = returned if returned is not None else [None] * len(self.residuals)
        for pseudo_gradient, residual, got in zip(pseudo_gradients(), self.residuals, back, strict=True):
            residual.add_(pseudo_gradient)
            flat = self.codec.sparsify(residual).view(-1)
            positions = flat.nonzero().squeeze(1)
            values = flat[positions]
            sent.append((positions, values))
            if got is not None:  # only what the swarm applied leaves the residual
                applied = got.reshape(-1)[positions] != 0
                positions, values = positions[applied], values[applied]
            residual.view(-1)[positions] -= values
        self._committed = (digest, sent)


def _digest(*tensor_lists) -> bytes:
    """A digest of every value of the tensors given (CPU copies of ones elsewhere)."""
    h = hashlib.blake2b(digest_size=16)
    for tensors in tensor_lists:
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.digest()


def install() -> None:
    """Make hivemind decode BLOCKWISE_8BIT parts with `TopKCodec` (idempotent)."""
    table = _hivemind_serialization._BASE_COMPRESSION_TYPES
    if not isinstance(table.get("BLOCKWISE_8BIT"), TopKCodec):
        table["BLOCKWISE_8BIT"] = TopKCodec()


install()

__all__ = ["ErrorFeedback", "MAX_PART_VALUES", "TopKCodec", "encoded_size", "install"]
