"""A state donor cannot choose how its tensors are decoded (security review 2026-12-07, N6).

hivemind decodes a state part with the codec and dtype its sender declares: UNIFORM_8BIT through a
complex128 codebook turns 1 wire byte into 16. Both readers of the state stream, the publisher's
(coordinator/publishing/statefetch.py) and a joiner's (peer/swarm/stateload.py), must refuse such a part before
anything is decoded. Every codec's decoder is replaced by a spy, so "refused before decoding" is
checked directly: on the old code the spies saw the hostile part decoded.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from crowdtrain.coordinator.publishing.statefetch import StateLimits, StreamReader
from crowdtrain.coordinator.publishing.vetting import ExpectedTensor
from crowdtrain.peer.swarm import stateload
from crowdtrain.peer.swarm.statewire import StateAssembler, StateRefused, WireTensor
from hivemind.compression import NoCompression, Uniform8BitQuantization
from hivemind.compression.base import CompressionInfo
from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming

SHAPE = (1024, 1024)  # one 4 MiB float32 parameter


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The codecs hivemind decoded with during the test, in order (each decoder still works)."""
    calls: list[str] = []

    class Spy:
        def __init__(self, name, codec):
            self.name, self.codec = name, codec

        def extract(self, serialized):
            calls.append(self.name)
            return self.codec.extract(serialized)

    for name, codec in list(_BASE_COMPRESSION_TYPES.items()):
        monkeypatch.setitem(_BASE_COMPRESSION_TYPES, name, Spy(name, codec))
    return calls


def _parts(tensor: torch.Tensor, codec=None, **header) -> list:
    """`tensor` as hivemind streams it (NONE unless `codec`), its first part's fields overridden."""
    codec = codec or NoCompression()
    serialized = codec.compress(tensor, CompressionInfo.from_tensor(tensor), allow_inplace=False)
    for key, value in header.items():
        if key == "size":
            serialized.ClearField("size")
            serialized.size.extend(value)
        else:
            setattr(serialized, key, value)
    return list(split_for_streaming(serialized))


def _messages(parts: list, epoch: int = 3) -> list:
    metadata = MSGPackSerializer.dumps({"epoch": epoch})
    return [
        averaging_pb2.DownloadData(tensor_part=part, metadata=metadata if i == 0 else b"")
        for i, part in enumerate(parts)
    ]


HOSTILE = {
    # 1 MiB of 8-bit indices that decode into 16 MiB of complex128
    "uint8 indices, complex128 codebook": lambda: _parts(
        torch.randn(SHAPE), Uniform8BitQuantization(), dtype="complex128"
    ),
    "uint8 indices decoding to float64 for a float32 parameter": lambda: _parts(
        torch.randn(SHAPE), Uniform8BitQuantization(), dtype="float64"
    ),
    "uint8 indices for twice the parameter's shape": lambda: _parts(
        torch.randn(2048, 1024), Uniform8BitQuantization()
    ),
    "plain float64 for a float32 parameter": lambda: _parts(torch.randn(SHAPE, dtype=torch.float64)),
    "a plain tensor bigger than the parameter": lambda: _parts(torch.randn(1025, 1024)),
    "the right header, then more bytes": lambda: (
        _parts(torch.randn(SHAPE)) + [runtime_pb2.Tensor(buffer=b"\0" * 2**16)]
    ),
}


def _publisher_reads(messages: list) -> StreamReader:
    reader = StreamReader(StateLimits((ExpectedTensor("w", SHAPE, "torch.float32", 4),)))
    for message in messages:
        if reader.add(message):
            break
    reader.finish()
    return reader


class _Donor:
    """What `stateload._download` asks of an averager: a stub whose download streams `messages`."""

    prefix, _p2p, serializer = "run_state_averager", None, MSGPackSerializer

    def __init__(self, messages: list):
        self.messages = messages

    def get_stub(self, _p2p, _peer, namespace):
        return self

    async def rpc_download_state(self, _request):
        async def stream():
            for message in self.messages:
                yield message

        return stream()


def _joiner_reads(messages: list, expected) -> list:
    own_bytes = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in expected)
    download = stateload._download(
        _Donor(messages), None, None, expected, int(stateload.BYTE_SLACK * own_bytes)
    )
    return asyncio.run(download)[1]


@pytest.mark.parametrize("attack", HOSTILE)
def test_the_publisher_refuses_a_hostile_part_before_decoding_it(attack, decoded):
    with pytest.raises(StateRefused):
        _publisher_reads(_messages(HOSTILE[attack]()))
    assert decoded == [], f"{attack}: decoded with {decoded} before refusing"


@pytest.mark.parametrize("attack", HOSTILE)
def test_a_joiner_refuses_a_hostile_part_before_decoding_it(attack, decoded):
    with pytest.raises(StateRefused):
        _joiner_reads(_messages(HOSTILE[attack]()), [(torch.Size(SHAPE), torch.float32)])
    assert decoded == [], f"{attack}: decoded with {decoded} before refusing"


def test_the_amplifying_part_is_refused_at_its_first_message_naming_the_codec(decoded):
    reader = StreamReader(StateLimits((ExpectedTensor("w", SHAPE, "torch.float32", 4),)))
    messages = _messages(HOSTILE["uint8 indices, complex128 codebook"]())
    assert sum(m.ByteSize() for m in messages) < reader.limits.max_bytes  # the wire cap alone let it in
    with pytest.raises(StateRefused, match="encoded UNIFORM_8BIT; this run sends state as NONE"):
        reader.add(messages[0])
    assert reader.messages == 1 and reader.assembler.decoded_bytes == 0 and decoded == []


def test_honest_state_still_loads_in_both_readers_bfloat16_included(decoded):
    weights = torch.randn(SHAPE)
    reader = _publisher_reads(_messages(_parts(weights) + _parts(torch.zeros(3))))  # + an optimizer statistic
    assert torch.equal(reader.tensors[0], weights) and reader.finish() == 3

    state = [torch.randn(SHAPE), torch.randn(7, 5).to(torch.bfloat16), torch.tensor([4.0])]
    expected = [(t.shape, t.dtype) for t in state]
    loaded = _joiner_reads(_messages([part for t in state for part in _parts(t)]), expected)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, state, strict=True))
    assert set(decoded) == {"NONE"}


def test_decoded_bytes_never_pass_the_expected_total():
    """The assembler's own accounting, on a decoder that would allocate more than declared."""
    want = [WireTensor.like((4, 4), torch.float32), WireTensor.like((2,), torch.float32)]
    honest = StateAssembler(want)
    for tensor in (torch.ones(4, 4), torch.ones(2)):
        for part in _parts(tensor):
            assert not honest.add(part)
    honest.finish()
    assert honest.decoded_bytes == honest.max_decoded_bytes == 72

    lying = StateAssembler(want, decode=lambda parts: torch.zeros(4, 4, dtype=torch.complex128))
    lying.add(_parts(torch.ones(4, 4))[0])
    with pytest.raises(StateRefused, match="decoded to"):
        lying.finish()
    assert lying.decoded_bytes == 0


def test_bytes_before_any_header_and_endless_empty_parts_are_refused():
    assembler = StateAssembler([WireTensor.like(SHAPE, torch.float32)])
    with pytest.raises(StateRefused, match="before any tensor's header"):
        assembler.add(_parts(torch.randn(SHAPE))[1])
    empty = StateAssembler([WireTensor.like((2,), torch.float32)])
    with pytest.raises(StateRefused, match="tensor parts"):
        for _ in range(100):
            empty.add(averaging_pb2.DownloadData().tensor_part)


def test_the_wire_cap_still_cuts_a_donor_padding_its_messages():
    reader = StreamReader(StateLimits((ExpectedTensor("w", SHAPE, "torch.float32", 4),)))
    messages = _messages(_parts(torch.randn(SHAPE)))
    messages[0].metadata = b"\x80" * reader.limits.max_bytes  # a MSGPack map padded far past the state
    with pytest.raises(StateRefused, match="sent more than the model's parameters allow"):
        reader.add(messages[0])
