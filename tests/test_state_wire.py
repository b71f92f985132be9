"""A state donor cannot choose how its tensors are decoded.

hivemind decodes a state part with the codec and dtype its sender declares: UNIFORM_8BIT through a
complex128 codebook turns 1 wire byte into 16. Both users of the state stream's one reader
(peer/swarm/statewire.py), the publisher (coordinator/publishing/statefetch.py) and a joiner
(peer/swarm/stateload.py), must refuse such a part before anything is decoded, and refuse any state
the reader refuses alike. Every codec's decoder is replaced by a spy, so "refused before decoding"
is checked directly: on the old code the spies saw the hostile part decoded.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from crowdtrain.coordinator.publishing.agreement import FetchedState
from crowdtrain.coordinator.publishing.statefetch import fetched_state, publisher_limits
from crowdtrain.peer.run.tensors import ExpectedTensor, expected_state
from crowdtrain.peer.swarm import stateload
from crowdtrain.peer.swarm.statewire import StateAssembler, StateRefused, StateStreamReader
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


W = ExpectedTensor("w", SHAPE, "torch.float32", 4)


def _publisher_reads(messages: list, expected=(W,)) -> FetchedState:
    """What the publisher's fetcher makes of a donor's stream (statefetch.StateFetcher._fetch)."""
    reader = StateStreamReader(publisher_limits(expected))
    for message in messages:
        if reader.add(message):
            break
    return fetched_state("donor", *reader.finish())


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


def _joiner_reads(messages: list, own_state: list) -> list:
    """What a joiner whose own state is `own_state` loads from a donor streaming `messages`."""
    limits = stateload.joiner_limits(MSGPackSerializer.dumps({"epoch": 0}), own_state)
    return asyncio.run(stateload._download(_Donor(messages), None, None, limits))[1]


@pytest.mark.parametrize("attack", HOSTILE)
def test_the_publisher_refuses_a_hostile_part_before_decoding_it(attack, decoded):
    with pytest.raises(StateRefused):
        _publisher_reads(_messages(HOSTILE[attack]()))
    assert decoded == [], f"{attack}: decoded with {decoded} before refusing"


@pytest.mark.parametrize("attack", HOSTILE)
def test_a_joiner_refuses_a_hostile_part_before_decoding_it(attack, decoded):
    with pytest.raises(StateRefused):
        _joiner_reads(_messages(HOSTILE[attack]()), [torch.zeros(SHAPE)])
    assert decoded == [], f"{attack}: decoded with {decoded} before refusing"


def test_the_amplifying_part_is_refused_at_its_first_message_naming_the_codec(decoded):
    reader = StateStreamReader(publisher_limits((W,)))
    messages = _messages(HOSTILE["uint8 indices, complex128 codebook"]())
    assert sum(m.ByteSize() for m in messages) < reader.limits.max_bytes  # the wire cap alone let it in
    with pytest.raises(StateRefused, match="encoded UNIFORM_8BIT; this run sends state as NONE"):
        reader.add(messages[0])
    assert reader.messages == 1 and reader.assembler.decoded_bytes == 0 and decoded == []


def test_honest_state_still_loads_in_both_readers_bfloat16_included(decoded):
    weights = torch.randn(SHAPE)
    fetched = _publisher_reads(
        _messages(_parts(weights) + _parts(torch.zeros(3)))
    )  # + an optimizer statistic
    assert torch.equal(fetched.tensors[0], weights) and fetched.epoch == 3

    state = [torch.randn(SHAPE), torch.randn(7, 5).to(torch.bfloat16), torch.tensor([4.0])]
    loaded = _joiner_reads(_messages([part for t in state for part in _parts(t)]), state)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, state, strict=True))
    assert set(decoded) == {"NONE"}


def test_decoded_bytes_never_pass_the_expected_total():
    """The assembler's own accounting, on a decoder that would allocate more than declared."""
    want = expected_state([torch.zeros(4, 4), torch.zeros(2)])
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
    assembler = StateAssembler([W])
    with pytest.raises(StateRefused, match="before any tensor's header"):
        assembler.add(_parts(torch.randn(SHAPE))[1])
    empty = StateAssembler(expected_state([torch.zeros(2)]))
    with pytest.raises(StateRefused, match="tensor parts"):
        for _ in range(100):
            empty.add(averaging_pb2.DownloadData().tensor_part)


def test_the_wire_cap_still_cuts_a_donor_padding_its_messages():
    reader = StateStreamReader(publisher_limits((W,)))
    messages = _messages(_parts(torch.randn(SHAPE)))
    messages[0].metadata = b"\x80" * reader.limits.max_bytes  # a MSGPack map padded far past the state
    with pytest.raises(StateRefused, match="sent more bytes than the tensors we expect allow"):
        reader.add(messages[0])


REFUSED = HOSTILE | {
    "NaN in a tensor of the right shape": lambda: _parts(torch.full(SHAPE, float("nan"))),
    "Inf in a tensor of the right shape": lambda: _parts(torch.full(SHAPE, float("-inf"))),
    "a bfloat16 tensor for a float32 one": lambda: _parts(torch.randn(SHAPE).to(torch.bfloat16)),
    "half a tensor": lambda: _parts(torch.randn(SHAPE))[:8],
}


@pytest.mark.parametrize("attack", REFUSED)
def test_a_state_the_reader_refuses_is_refused_alike_by_a_joiner_and_the_publisher(attack):
    """One reader, one check: the same stream, held to the same tensors, is refused by a joiner and
    by the publisher with the same StateRefused and the same reason (a joiner names its unnamed
    state's tensors "tensor <index>", so the publisher is given that name here)."""
    own_state = [torch.zeros(SHAPE)]
    with pytest.raises(StateRefused) as joiner:
        _joiner_reads(_messages(REFUSED[attack]()), own_state)
    with pytest.raises(StateRefused) as publisher:
        _publisher_reads(_messages(REFUSED[attack]()), expected_state(own_state))
    assert str(joiner.value) == str(publisher.value), (joiner.value, publisher.value)
    assert "tensor 0" in str(joiner.value) or "tensor parts" in str(joiner.value), joiner.value


def test_only_what_each_reads_differs_a_joiner_refuses_a_tensor_more_the_publisher_stops_before_it():
    """A joiner loads a whole state (exactly ours); the publisher reads the parameters and leaves
    the optimizer statistics after them unread."""
    weights = torch.randn(SHAPE)
    messages = _messages(_parts(weights) + _parts(torch.zeros(3)))
    assert torch.equal(_publisher_reads(messages).tensors[0], weights)
    with pytest.raises(StateRefused, match="more tensors than the 1 of our state"):
        _joiner_reads(messages, [torch.zeros(SHAPE)])
