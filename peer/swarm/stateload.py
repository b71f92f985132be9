"""Loading a peer's state only from admitted donors, and only a state shaped like ours.

hivemind 1.1.12's `DecentralizedAverager._load_state_from_peers` asks the donor with the highest
self-declared priority (an unsigned DHT dictionary) and accepts whatever it streams: any number of
tensors of any shape, NaN included, as many bytes as it likes. `load_state_checked` is that
method with two changes: donors the gate refuses are skipped, and each download is read by the
state stream's one reader (peer/swarm/statewire.py) within our own state's limits
(`joiner_limits`): cut as soon as it exceeds `JOINER_BYTE_SLACK` x the bytes of our own state or
holds more tensors than ours, each tensor's parts held to our codec, dtype and shape before they
are decoded, and the result held to our own state tensor for tensor (count, shape, dtype, finite:
`peer.run.tensors.check_tensors`); otherwise the next donor is asked, and the refused one is
reported as `bad_state` evidence. Runs inside the averager process (it is an averager method's body).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from crowdtrain.peer.events import Progress
from crowdtrain.peer.run.tensors import expected_state
from crowdtrain.peer.swarm.statewire import (
    JOINER_BYTE_SLACK,
    StateLimits,
    StateRefused,
    StateStreamReader,
    read_state,
)
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import ValueWithExpiration

logger = logging.getLogger(__name__)


def joiner_limits(own_metadata: bytes, own_tensors) -> StateLimits:
    """What a donor may send a joiner: exactly a state like its own (`own_tensors`, parameters then
    optimizer statistics), within `JOINER_BYTE_SLACK` x its bytes, metadata included."""
    return StateLimits(
        expected_state(own_tensors), byte_slack=JOINER_BYTE_SLACK, metadata_bytes=len(own_metadata or b"")
    )


async def _download(averager, peer: PeerID, timeout, limits: StateLimits):
    """(metadata, tensors) streamed by `peer`, read within `limits` (statewire.StateStreamReader):
    StateRefused the moment it oversteps them; (None, []) if the donor sent nothing. Its progress
    is shown as it arrives (peer/events.py `Progress`: a bar on a terminal, else a line every 10 s),
    out of the bytes of our own state."""
    stub = averager.get_stub(averager._p2p, peer, namespace=averager.prefix)
    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
    reader = StateStreamReader(limits, loads=averager.serializer.loads)
    with Progress(limits.tensor_bytes + limits.metadata_bytes, "swarm state", log=logger) as progress:
        return await read_state(stream, reader, timeout, progress)


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
        limits = joiner_limits(own_metadata, own_tensors)
        for peer in donors:
            started = time.monotonic()
            try:
                metadata, tensors = await _download(averager, peer, timeout, limits)
                if not metadata:
                    logger.debug("donor %s did not send its state", peer)
                    continue
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
