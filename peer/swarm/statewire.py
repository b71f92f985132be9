"""The one reader of hivemind's state download stream, used by joiners and by the publisher.

hivemind 1.1.12's `rpc_download_state` streams `averaging_pb2.DownloadData` messages: the first
carries the MSGPack metadata (the epoch, the optimizer's settings), and every tensor follows as
`runtime_pb2.Tensor` parts: the first names the codec (`compression`), the `dtype` and the shape
(`size`), the rest carry only bytes. hivemind decodes with the codec and casts to the dtype the
*sender* names (compression/serialization.py, quantization.py): UNIFORM_8BIT indices through a
complex128 codebook turn 1 wire byte into 16, so a cap on wire bytes alone bounds nothing.

Both readers of that stream, a joiner (peer/swarm/stateload.py) and the publisher
(coordinator/publishing/statefetch.py), read it here, each within its `StateLimits`:
- `StateAssembler`: a tensor's first part must name `STATE_CODEC`, the dtype and the shape of the
  local tensor it will be loaded into, and its parts together may hold no more bytes than that
  tensor does; only then are they decoded. So a decoded state is exactly the size of our own.
- `StateStreamReader`: the stream is cut the moment it exceeds `StateLimits.max_bytes` (what the
  assembler does not see: metadata, framing, empty parts) or holds more tensors than we read, and
  the finished state must pass `peer.run.tensors.check_tensors` (count, shape, dtype, finite): the
  one check of a downloaded state, run once, here.
Every refusal is a `StateRefused`, whose message says what the donor sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from crowdtrain.peer.run.tensors import ExpectedTensor, check_tensors

# what our averagers send: peer/swarm/wiring.py leaves hivemind.Optimizer's load_state_compression at its
# default, NoCompression (hivemind 1.1.12 codec name "NONE"); change both together
STATE_CODEC = "NONE"
STREAM_PART_BYTES = 2**16  # hivemind 1.1.12: utils/streaming.py, the parts a tensor is sent in

# The bytes a donor may stream (`StateLimits.max_bytes`): a slack times the bytes we know it must
# send (the tensors we read, as sent, plus the metadata when we know it), plus a protobuf header's
# worth per tensor. The tensors' own bytes are held exactly by `StateAssembler`; this cap bounds
# what it does not see: the metadata, each part's framing (a few bytes per 64 KiB), empty parts.
HEADER_BYTES_PER_TENSOR = 4096  # a tensor's header (codec, dtype, shape) and a small state's metadata
# A joiner knows its whole state, its own metadata included: only the framing is unknown.
JOINER_BYTE_SLACK = 1.1
# The publisher reads the parameters only: it knows nothing of the metadata sent before them (the
# donor's optimizer settings), and reads the first part of the next tensor (up to 64 KiB) before it
# stops (for a small model that part alone is a good share of the state).
PUBLISHER_BYTE_SLACK = 1.25


class StateRefused(ValueError):
    """A donor's state stream is not one we can load; the message says why."""


def wire_dtype(want: ExpectedTensor) -> str:
    """hivemind's wire name of a tensor's dtype: str(torch.dtype) without "torch.", e.g. "float32"."""
    return want.dtype.removeprefix("torch.")


def wire_sizes_bytes(want: ExpectedTensor) -> tuple[int, ...]:
    """The buffer sizes a `STATE_CODEC` encoding of `want` may have: its own bytes, and for bfloat16
    also float32's (hivemind's default USE_LEGACY_BFLOAT16 sends bfloat16 as float32)."""
    if wire_dtype(want) == "bfloat16":
        return (want.nbytes, 4 * math.prod(want.shape))
    return (want.nbytes,)


@dataclass(frozen=True)
class StateLimits:
    """What a donor may send: the tensors we read (in order) and the bounds on the stream."""

    expected: tuple[ExpectedTensor, ...]
    byte_slack: float = JOINER_BYTE_SLACK  # see HEADER_BYTES_PER_TENSOR above
    metadata_bytes: int = 0  # the metadata's size when we know it (a joiner's own), else 0
    # True: the stream must hold exactly `expected` (a joiner loads all of it); False: only the first
    # len(expected) tensors are read, the rest left unsent (the publisher: the parameters, not the
    # optimizer statistics after them)
    read_all: bool = True

    @property
    def tensor_bytes(self) -> int:
        """The most bytes the tensors we read may take on the wire."""
        return sum(max(wire_sizes_bytes(t)) for t in self.expected)

    @property
    def max_bytes(self) -> int:
        """Serialized bytes a donor may send before we hang up."""
        known = self.tensor_bytes + self.metadata_bytes
        return int(known * self.byte_slack) + HEADER_BYTES_PER_TENSOR * len(self.expected)


def codec_name(code: int) -> str:
    """hivemind's name of a `runtime_pb2.CompressionType` value (proto3 enums may carry any number)."""
    from hivemind.proto import runtime_pb2

    try:
        return runtime_pb2.CompressionType.Name(code)
    except ValueError:
        return f"unknown codec {code}"


def check_header(part, want: ExpectedTensor) -> tuple[bool, str]:
    """Pure: may a tensor's first part (codec, dtype, shape, bytes) stand for `want`?"""
    codec = codec_name(part.compression)
    if codec != STATE_CODEC:
        return False, f"{want.name} is encoded {codec}; this run sends state as {STATE_CODEC}"
    if part.dtype != wire_dtype(want):
        return False, f"{want.name} declares dtype {part.dtype[:40]!r}, ours is {wire_dtype(want)}"
    if tuple(part.size) != want.shape:
        return False, f"{want.name} declares shape {tuple(part.size)[:8]}, ours is {want.shape}"
    if len(part.buffer) > max(wire_sizes_bytes(want)):
        return False, f"{want.name} starts with {len(part.buffer)} bytes, ours has {want.nbytes}"
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

    def __init__(self, expected: Sequence[ExpectedTensor], decode: Callable = decode_parts):
        self.expected, self.decode = tuple(expected), decode
        self.tensors: list = []
        self.decoded_bytes = self.parts_taken = 0
        self._parts: list = []
        self._bytes = 0
        self.max_decoded_bytes = sum(t.nbytes for t in self.expected)
        # hivemind's parts of each tensor, twice over, and a few empty ones
        self.max_parts = (
            2 * sum(-(-max(wire_sizes_bytes(t)) // STREAM_PART_BYTES) for t in self.expected) + 16
        )

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
            ok, reason = check_header(part, self.expected[index])
            if not ok:
                raise StateRefused(reason)
        elif not part.buffer:
            return False  # an empty part carries nothing (and is not kept)
        elif not self._parts:
            raise StateRefused("sent tensor bytes before any tensor's header (codec, dtype, shape)")
        want = self.expected[len(self.tensors)]
        self._bytes += len(part.buffer)
        if self._bytes > max(wire_sizes_bytes(want)):
            raise StateRefused(
                f"{want.name} holds more than {max(wire_sizes_bytes(want))} bytes, "
                f"the size of our {wire_dtype(want)} tensor of shape {want.shape}"
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
        want = self.expected[len(self.tensors)]
        if self._bytes not in wire_sizes_bytes(want):
            raise StateRefused(f"{want.name} holds {self._bytes} bytes, ours has {want.nbytes}")
        tensor = self.decode(self._parts)
        self._parts, self._bytes = [], 0
        if tuple(tensor.shape) != want.shape or str(tensor.dtype) != want.dtype:
            raise StateRefused(
                f"{want.name} decoded to {tuple(tensor.shape)} {tensor.dtype}, ours is {want.shape} {want.dtype}"
            )
        self.decoded_bytes += tensor.numel() * tensor.element_size()
        self.tensors.append(tensor)


class StateStreamReader:
    """Reads one `rpc_download_state` stream within `limits`, message by message (`add`), into the
    state's metadata and tensors (`finish`); a `StateRefused` the moment the donor oversteps."""

    def __init__(self, limits: StateLimits, loads: Callable | None = None):
        self.limits = limits
        self.loads = loads  # the averager's serializer's `loads`; hivemind's MSGPack when None
        self.assembler = StateAssembler(limits.expected)
        self.metadata = None
        self.received_bytes = self.messages = 0

    @property
    def tensors(self) -> list:
        return self.assembler.tensors

    def add(self, message) -> bool:
        """Take one message; True once the tensors we read are in and the rest is not ours to read
        (`limits.read_all` False). StateRefused past `max_bytes`, or past our tensors (`read_all`)."""
        self.messages += 1
        self.received_bytes += message.ByteSize()
        if self.received_bytes > self.limits.max_bytes:
            raise StateRefused(
                f"sent more bytes than the tensors we expect allow ({self.received_bytes} bytes in "
                f"{self.messages} messages; at most {self.limits.max_bytes} bytes for "
                f"{len(self.limits.expected)} tensors of {self.limits.tensor_bytes} bytes)"
            )
        if message.metadata and self.metadata is None:  # hivemind sends it once, in the first message
            self.metadata = self._loads(message.metadata)
        if not self.assembler.add(message.tensor_part):
            return False
        if self.limits.read_all:
            raise StateRefused(f"sent more tensors than the {len(self.limits.expected)} of our state")
        return True

    def _loads(self, data: bytes):
        if self.loads is not None:
            return self.loads(data)
        from hivemind.utils.serializer import MSGPackSerializer

        return MSGPackSerializer.loads(data)

    def finish(self) -> tuple[object, list]:
        """(metadata, tensors) once the stream ended or `add` said stop: (None, []) from a donor
        that sent nothing (it does not share its state right now), else a state that passed
        `check_tensors`; StateRefused if it did not."""
        tensors = self.assembler.finish()
        if self.metadata is None and not tensors:
            return None, []
        problem = check_tensors(tensors, self.limits.expected)
        if problem:
            raise StateRefused(problem)
        return self.metadata, tensors


async def read_state(stream, reader: StateStreamReader, chunk_timeout_s: float | None = None, progress=None):
    """(metadata, tensors) of an `rpc_download_state` stream, read with `reader` (see `finish`);
    each message must arrive within `chunk_timeout_s` (None: no limit). The stream is closed
    (the donor told to stop) however the reading ends. `progress` (peer/events.py `Progress`, or
    None) counts the metadata's and the tensors' bytes as they arrive."""
    from hivemind.utils.asyncio import aiter_with_timeout

    messages = aiter_with_timeout(stream, timeout=chunk_timeout_s)
    try:
        async for message in messages:
            done = reader.add(message)
            if progress is not None:
                progress.update(len(message.metadata) + len(message.tensor_part.buffer))
            if done:
                break
    finally:
        await messages.aclose()
        if hasattr(stream, "aclose"):
            await stream.aclose()
    return reader.finish()
