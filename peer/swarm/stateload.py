"""Loading a peer's state only from admitted donors, and only a state shaped like ours.

hivemind 1.1.12's `DecentralizedAverager._load_state_from_peers` asks the donor with the highest
self-declared priority (an unsigned DHT dictionary) and accepts whatever it streams: any number of
tensors of any shape, NaN included, as many bytes as it likes. `load_state_checked` is that
method with four changes: donors the gate refuses are skipped, the stream is cut as soon as it
exceeds `BYTE_SLACK` x the bytes of our own state or holds more tensors than ours, each tensor's
parts must declare our codec, dtype and shape before they are decoded (peer/swarm/statewire.py: a donor
cannot make one wire byte decode into 16), and the result must match our own state tensor for
tensor (count, shape, dtype) and be finite; otherwise the next donor is asked. Runs inside the
averager process (it is an averager method's body).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import torch
from crowdtrain.peer.swarm.statewire import StateAssembler, StateRefused, WireTensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.timed_storage import ValueWithExpiration

logger = logging.getLogger(__name__)

BYTE_SLACK = 1.1  # a donor may stream at most this x the bytes of our own state (tensors + metadata)


def check_state(
    tensors: list[torch.Tensor], expected: list[tuple[torch.Size, torch.dtype]]
) -> tuple[bool, str]:
    """Pure: does a downloaded state line up with ours and hold finite values only?"""
    if len(tensors) != len(expected):
        return False, f"{len(tensors)} tensors, ours has {len(expected)}"
    for index, (tensor, (shape, dtype)) in enumerate(zip(tensors, expected, strict=False)):
        if tensor.shape != shape or tensor.dtype != dtype:
            return (
                False,
                f"tensor {index} is {tuple(tensor.shape)} {tensor.dtype}, ours is {tuple(shape)} {dtype}",
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return False, f"tensor {index} holds NaN/Inf"
    return True, "ok"


async def _download(averager, peer: PeerID, timeout, expected, byte_cap: int):
    """(metadata, tensors) streamed by `peer`, refused (StateRefused) the moment it is too big or a
    tensor's parts do not fit the tensor of ours they stand for (`expected`: (shape, dtype) each)."""
    stub = averager.get_stub(averager._p2p, peer, namespace=averager.prefix)
    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
    assembler = StateAssembler([WireTensor.like(shape, dtype) for shape, dtype in expected])
    metadata, received = None, 0
    async for message in aiter_with_timeout(stream, timeout=timeout):
        received += len(message.metadata) + len(message.tensor_part.buffer)
        if received > byte_cap:
            raise StateRefused(f"streamed more than {byte_cap} bytes ({BYTE_SLACK}x our state)")
        if message.metadata:
            metadata = averager.serializer.loads(message.metadata)
        if assembler.add(message.tensor_part):
            raise StateRefused(f"streamed more tensors than our {len(expected)}")
    return metadata, assembler.finish()


async def _donors(averager, admit) -> list[PeerID]:
    """Donors from `<prefix>.all_averagers`, highest declared priority first, admitted only."""
    key_manager = averager._matchmaking.group_key_manager
    found, _ = averager.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
    priority = {
        PeerID(peer_id): (float(info.value), random.random())
        for peer_id, info in (found.items() if isinstance(found, dict) else ())
        if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))
    }
    ordered = sorted(priority, key=priority.get, reverse=True)
    return [peer for peer in ordered if peer != averager.peer_id and admit(peer)]


async def load_state_checked(averager, future, timeout, *, admit) -> None:
    """hivemind 1.1.12's `_load_state_from_peers` with the checks above; `admit(peer_id)` -> bool."""
    if timeout is not None:  # as hivemind: a given timeout becomes the per-chunk timeout
        timeout = (
            averager.next_chunk_timeout
            if averager.next_chunk_timeout is not None
            else averager.request_timeout
        )
    # hivemind runs this as a task it does not keep, and an MPFuture is only weakly referenced: while
    # we await our own state from the host process nothing else holds this task, and the garbage
    # collector destroyed it ("Task was destroyed but it is pending!", seen in tests/test_swarm.py)
    averager._load_state_task = asyncio.current_task()
    try:
        donors = await _donors(averager, admit)
        if not donors:
            logger.info("could not load state from peers: no admitted donor")
            return
        own_metadata, own_tensors, _ = await averager._get_current_state_from_host_process()
        expected = [(t.shape, t.dtype) for t in own_tensors]
        own_bytes = len(own_metadata) + sum(t.numel() * t.element_size() for t in own_tensors)
        byte_cap = int(BYTE_SLACK * own_bytes)
        for peer in donors:
            started = time.monotonic()
            try:
                metadata, tensors = await _download(averager, peer, timeout, expected, byte_cap)
                if not metadata:
                    logger.debug("donor %s did not send its state", peer)
                    continue
                ok, reason = check_state(tensors, expected)
                if not ok:
                    raise StateRefused(reason)
            except StateRefused as e:
                logger.warning("refused the state of donor %s: %s; trying the next donor", peer, e)
                if getattr(averager, "evidence", None) is not None:
                    averager.evidence.report(peer.to_base58(), "bad_state", str(e))
                continue
            except Exception as e:  # hivemind's own loop logs and goes on to the next donor too
                logger.warning("could not download the state of %s (%r); trying the next donor", peer, e)
                continue
            logger.info("loaded state from %s in %.2fs", peer, time.monotonic() - started)
            future.set_result((metadata, tensors))
            return
    finally:
        averager._load_state_task = None
        if not future.done():
            future.set_result(None)
