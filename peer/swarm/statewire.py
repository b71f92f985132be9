"""A state download's tensor parts, each held to the tensor it must become before it is decoded.

hivemind 1.1.12's `rpc_download_state` streams every tensor as `runtime_pb2.Tensor` parts: the
first carries the codec (`compression`), the `dtype` and the shape (`size`), the rest only bytes.
hivemind decodes with the codec and casts to the dtype the *sender* names
(compression/serialization.py, quantization.py): UNIFORM_8BIT indices through a complex128
codebook turn 1 wire byte into 16, so a cap on wire bytes alone bounds nothing.

`StateAssembler` is the one rule both readers follow, the joiner (peer/swarm/stateload.py) and the
publisher (coordinator/publishing/statefetch.py): a tensor's first part must name `STATE_CODEC`, the dtype and
the shape of the local tensor it will be loaded into, and its parts together may hold no more
bytes than that tensor does; only then are they decoded. So a decoded state is exactly the size of
our own, whatever a donor declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# what our averagers send: peer/swarm/wiring.py leaves hivemind.Optimizer's load_state_compression at its
# default, NoCompression (hivemind 1.1.12 codec name "NONE"); change both together
STATE_CODEC = "NONE"
STREAM_PART_BYTES = 2**16  # hivemind 1.1.12: utils/streaming.py, the parts a tensor is sent in


class StateRefused(ValueError):
    """A donor's state stream is not one we can load; the message says why."""


@dataclass(frozen=True)
class WireTensor:
    """A tensor a state stream must carry: the local tensor it is loaded into."""

    shape: tuple[int, ...]
    dtype: str  # hivemind's wire name: str(torch.dtype) without "torch.", e.g. "float32"
    element_size_bytes: int

    @classmethod
    def like(cls, shape, dtype) -> WireTensor:
        """The wire form of a local tensor of `shape` and torch `dtype`."""
        return cls(tuple(int(n) for n in shape), str(dtype).removeprefix("torch."), dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.element_size_bytes

    @property
    def wire_sizes_bytes(self) -> tuple[int, ...]:
        """The buffer sizes a `STATE_CODEC` encoding of this tensor may have: its own bytes, and for
        bfloat16 also float32's (hivemind's default USE_LEGACY_BFLOAT16 sends bfloat16 as float32)."""
        if self.dtype == "bfloat16":
            return (self.nbytes, 4 * math.prod(self.shape))
        return (self.nbytes,)


def codec_name(code: int) -> str:
    """hivemind's name of a `runtime_pb2.CompressionType` value (proto3 enums may carry any number)."""
    from hivemind.proto import runtime_pb2

    try:
        return runtime_pb2.CompressionType.Name(code)
    except ValueError:
        return f"unknown codec {code}"


def check_header(part, want: WireTensor, index: int) -> tuple[bool, str]:
    """Pure: may the first part of tensor `index` (codec, dtype, shape, bytes) stand for `want`?"""
    codec = codec_name(part.compression)
    if codec != STATE_CODEC:
        return False, f"tensor {index} is encoded {codec}; this run sends state as {STATE_CODEC}"
    if part.dtype != want.dtype:
        return False, f"tensor {index} declares dtype {part.dtype[:40]!r}, ours is {want.dtype}"
    if tuple(part.size) != want.shape:
        return False, f"tensor {index} declares shape {tuple(part.size)[:8]}, ours is {want.shape}"
    if len(part.buffer) > max(want.wire_sizes_bytes):
        return False, f"tensor {index} starts with {len(part.buffer)} bytes, ours has {want.nbytes}"
    return True, "ok"


def decode_parts(parts) -> object:
    """hivemind's own decoding of one tensor's parts (only ever given checked parts)."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.utils.streaming import combine_from_streaming

    return deserialize_torch_tensor(combine_from_streaming(parts))


class StateAssembler:
    """Reassembles the tensors of a state stream part by part, each part checked (`check_header`,
    then a running count of its bytes) before it is kept, each tensor decoded only once all its
    parts fit it. `decoded_bytes` never exceeds `max_decoded_bytes`, the bytes of `expected`."""

    def __init__(self, expected: Sequence[WireTensor], decode: Callable = decode_parts):
        self.expected, self.decode = tuple(expected), decode
        self.tensors: list = []
        self.decoded_bytes = self.parts_taken = 0
        self._parts: list = []
        self._bytes = 0
        self.max_decoded_bytes = sum(t.nbytes for t in self.expected)
        # hivemind's parts of each tensor, twice over, and a few empty ones
        self.max_parts = 2 * sum(-(-max(t.wire_sizes_bytes) // STREAM_PART_BYTES) for t in self.expected) + 16

    def add(self, part) -> bool:
        """Take one part; True when it opens a tensor beyond the expected ones (not kept: the
        caller stops reading or refuses). StateRefused when it cannot belong to our state."""
        self.parts_taken += 1
        if self.parts_taken > self.max_parts:
            raise StateRefused(
                f"sent more than {self.max_parts} tensor parts for {len(self.expected)} tensors"
            )
        if part.dtype:  # a tensor's first part: the one before it is complete
            self._complete()
            index = len(self.tensors)
            if index >= len(self.expected):
                return True
            ok, reason = check_header(part, self.expected[index], index)
            if not ok:
                raise StateRefused(reason)
        elif not part.buffer:
            return False  # an empty part carries nothing (and is not kept)
        elif not self._parts:
            raise StateRefused("sent tensor bytes before any tensor's header (codec, dtype, shape)")
        want = self.expected[len(self.tensors)]
        self._bytes += len(part.buffer)
        if self._bytes > max(want.wire_sizes_bytes):
            raise StateRefused(
                f"tensor {len(self.tensors)} holds more than {max(want.wire_sizes_bytes)} bytes, "
                f"the size of our {want.dtype} tensor of shape {want.shape}"
            )
        self._parts.append(part)
        return False

    def finish(self) -> list:
        """The tensors once the stream ended (the last one completed)."""
        self._complete()
        return self.tensors

    def _complete(self) -> None:
        if not self._parts:
            return
        index, want = len(self.tensors), self.expected[len(self.tensors)]
        if self._bytes not in want.wire_sizes_bytes:
            raise StateRefused(f"tensor {index} holds {self._bytes} bytes, ours has {want.nbytes}")
        tensor = self.decode(self._parts)
        self._parts, self._bytes = [], 0
        if tuple(tensor.shape) != want.shape or str(tensor.dtype).removeprefix("torch.") != want.dtype:
            raise StateRefused(
                f"tensor {index} decoded to {tuple(tensor.shape)} {tensor.dtype}, ours is {want}"
            )
        self.decoded_bytes += tensor.numel() * tensor.element_size()
        self.tensors.append(tensor)


__all__ = ["STATE_CODEC", "StateAssembler", "StateRefused", "WireTensor", "check_header", "codec_name"]
