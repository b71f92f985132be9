"""hivemind averaging that a bad groupmate cannot ruin, and that only admitted peers take part in.

hivemind 1.1.12 averages whatever a group member sends (weights declared by the sender, no NaN or
norm checks) and answers every caller of its averaging RPCs; its DHT authorizer covers DHT RPCs
only. The averagers here (`GuardedGradientAverager`, `GuardedStateAverager`, and
`GuardedAverager` for tests) change that, inside hivemind's own butterfly all-reduce:

- each member reduces its span with peer/robust/reduce.py (`RobustPartReducer`, peer/robust/partreducer.py:
  finite parts only, weights capped, CenteredClip, sign flips dropped) instead of a weighted sum,
  leaving out senders whose parts have pointed against its own gradient over many rounds
  (peer/robust/contribscore.py; the scores live on the averager, across rounds);
- each member checks the average a reducer sends back against its own part
  (`robust.check_delta`) and keeps its own part where the answer is not finite or too far away;
- `gate(peer_id_base58) -> (admitted, reason)`, an object created before hivemind forks its
  averager processes, decides who may join our group, aggregate parts with us and download our
  state; a round whose group holds a peer the gate refuses is aborted before we send anything,
  and we never ask such a peer to lead us. `None` admits everyone (tests, open runs). A gate that
  raises refuses (fail closed).
- every rejected contribution becomes evidence (offender's peer id, kind, detail) put on an
  `EvidenceSink` the parent process drains (peer/link/heartbeat.py sends it to the coordinator).

State downloads are validated by peer/swarm/stateload.py. The hivemind internals used are listed in
docs/hivemind.md ("Private hivemind APIs we rely on").
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import AsyncIterator  # noqa: UP035 (hivemind reads rpc_* annotations via typing)

import torch
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.machine.install import upgrade_hint
from crowdtrain.peer.robust import reduce as robust
from crowdtrain.peer.robust.contribscore import ContributionScores, RoundAgreement
from crowdtrain.peer.robust.evidence import EvidenceSink, Gate, admit
from crowdtrain.peer.robust.partreducer import RobustPartReducer
from crowdtrain.peer.robust.reduce import DEFAULT, STATE, RobustConfig, check_delta
from crowdtrain.peer.robust.sparsecodec import TopKCodec
from crowdtrain.peer.swarm.stateload import load_state_checked
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip
from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)

# gradients travel in parts of this many bytes (after compression); hivemind's default is 512 KiB.
# Measured (python -m scripts.bench --figures allreduce): 2 MiB parts move 100 MB ~10% faster, fewer
# messages and reductions; under hivemind's 4 MiB stream message limit
GRAD_PART_SIZE_BYTES = 2**21


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner with `RobustPartReducer` for our span and every average a reducer
    returns checked against our own part (`check_delta`); a refused average keeps our part, as
    hivemind does for a reducer that failed. Evidence goes to `evidence` with the offender's id.

    With the sparse codec (`TopKCodec`, mode=diloco's "topk2bit") a reducer snaps its average to the
    codec's return grid (`for_returns().sparsify`) and sends every sender that same average, not
    `average - part` (which the codec could not carry exactly): every peer applies the same update,
    and each converts it to `average - part` itself before the check."""

    def __init__(
        self,
        *,
        evidence: EvidenceSink | None = None,
        robust_cfg: RobustConfig = DEFAULT,
        scores: ContributionScores | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._evidence, self._cfg = evidence, robust_cfg
        self._accused: set[tuple[str, str]] = set()
        stock = self.tensor_part_reducer
        stock.finished.set()  # replaced before use: its finalize must not report "received 0%"
        senders = self.sender_peer_ids
        agreement = None
        if scores is not None and scores.cfg.enabled:
            own = senders.index(self.peer_id) if self.peer_id in senders else None
            agreement = RoundAgreement(scores, [p.to_base58() for p in senders], own)
        self.tensor_part_reducer = RobustPartReducer(
            stock.part_shapes,
            len(senders),
            report=lambda index, kind, detail: self._accuse(senders[index], kind, detail),
            cfg=robust_cfg,
            agreement=agreement,
        )
        container = self.tensor_part_container
        self._own_norm = math.sqrt(sum(robust.sq_norm(t.detach()) for t in container.local_tensors))
        self._register_unchecked = container.register_processed_part
        container.register_processed_part = self._register_checked  # register_failed_reducer uses it too
        codec = container.compression
        self._snap = codec.for_returns() if isinstance(codec, TopKCodec) else None
        self._registering_failure = False
        if self._snap is not None:
            self._snap_to_codec(container)

    def _snap_to_codec(self, container) -> None:
        """Sparse codec: our reducer's averages pass through the return codec's `sparsify`, rounded
        at random (unbiased: the peers' error feedback carries what is dropped, not the rounding),
        one per part, the same for every sender; a failed reducer's parts are registered as deltas
        (zeros), not averages."""
        reduce_part, register_failed = (
            self.tensor_part_reducer.accumulate_part,
            container.register_failed_reducer,
        )
        snapped: list = [-1, None]  # (part index, its snapped average): parts finish in order
        rounding = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

        async def accumulate_snapped(sender_index, part_index, tensor_part, weight=1.0):
            average = await reduce_part(sender_index, part_index, tensor_part, weight=weight)
            if snapped[0] != part_index:
                snapped[:] = [part_index, self._snap.sparsify(average, rounding=rounding)]
            return snapped[1]

        def register_failed_reducer(peer_index: int):
            self._registering_failure = True
            try:
                register_failed(peer_index)
            finally:
                self._registering_failure = False

        self.tensor_part_reducer.accumulate_part = accumulate_snapped
        container.register_failed_reducer = register_failed_reducer

    def _register_checked(self, peer_index: int, part_index: int, delta: torch.Tensor):
        container = self.tensor_part_container
        if self.ordered_peer_ids[peer_index] != self.peer_id:
            # hivemind 1.1.12: the container keeps our (part, info) for each reducer until finalize
            own_part = container._input_parts_by_peer[peer_index][part_index][0]
            if self._snap is not None and not self._registering_failure and delta.shape == own_part.shape:
                delta = delta - own_part  # a sparse reducer sends its average itself
            share = math.sqrt(own_part.numel() / max(1, container.total_size))
            reference = max(math.sqrt(robust.sq_norm(own_part)), self._own_norm * share)
            ok, reason = check_delta(delta, own_part, reference, self._cfg)
            if not ok:
                self._accuse(self.ordered_peer_ids[peer_index], "bad_average", reason)
                delta = torch.zeros_like(own_part)
                container.failed_size += delta.numel()
        self._register_unchecked(peer_index, part_index, delta)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind 1.1.12's reducer loop; with the sparse codec each sender gets the snapped
        average itself, encoded by our codec (exactly: it is already on the codec's grid)."""
        if self._snap is None:
            async for message in super()._accumulate_parts_streaming(stream, sender_index):
                yield message
            return
        part_index, loop, codec = 0, asyncio.get_event_loop(), self._snap
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    average = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break  # the sender was banned: we no longer aggregate its parts
                info = CompressionInfo.from_tensor(average)
                serialized = await loop.run_in_executor(None, codec.compress, average, info)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def _accuse(self, peer_id, kind: str, detail: str) -> None:
        offender = peer_id.to_base58()
        if peer_id == self.peer_id:
            logger.warning("our own contribution was refused by our reducer (%s: %s)", kind, detail)
            return
        if (offender, kind) in self._accused:
            return  # one record per offender and kind per round
        self._accused.add((offender, kind))
        logger.warning("refused a contribution of %s (%s: %s)", offender, kind, detail)
        if self._evidence is not None:
            self._evidence.report(offender, kind, detail, self.group_id)


class _Guarded:
    """What the guarded averagers add to a hivemind averager class (listed first in their bases).
    The attributes are set before hivemind's __init__ forks the averager process."""

    def __init__(
        self,
        *args,
        gate: Gate | None = None,
        evidence: EvidenceSink | None = None,
        robust_cfg: RobustConfig = DEFAULT,
        **kwargs,
    ):
        self.gate = gate
        self.evidence = evidence
        self.robust_cfg = robust_cfg
        self.contribution_scores = ContributionScores(robust_cfg.score)  # updated in the averager process
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        """hivemind 1.1.12 names an RPC protocol after the servicer's class (`prefix::Class.rpc_x`):
        we answer and call under the name of the hivemind class we extend, so that guarded and
        stock peers (the coordinator's state fetch among them) still understand each other."""
        wire_class = next(base for base in cls.__mro__ if base.__module__.startswith("hivemind."))
        return wire_class._get_handle_name(namespace, method_name)

    def _refused(self, peer_id, what: str) -> bool:
        admitted, reason = admit(self.gate, peer_id.to_base58())
        if not admitted:
            logger.info("refused %s from %s: %s", what, peer_id.to_base58(), reason)
        return not admitted

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self._refused(context.remote_id, "a request to join our averaging group"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if self._refused(context.remote_id, "a part to aggregate"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self._refused(context.remote_id, "a state download"):
            return  # as hivemind does when it does not share state: the caller tries the next donor
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _step(self, *, step, future_for_init):
        _never_follow_refused_leaders(self._matchmaking, self.gate)
        return await super()._step(step=step, future_for_init=future_for_init)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind 1.1.12's DecentralizedAverager._run_allreduce_inplace_ with our runner, after
        the gate admitted every groupmate."""
        group_id = group_info.group_id if group_id is None else group_id
        assert group_id in self._running_groups, f"group {group_id} was not registered before its all-reduce"
        for peer_id in group_info.peer_ids:
            if peer_id != self.peer_id and self._refused(peer_id, "an all-reduce round"):
                error = AllreduceException(
                    f"group {group_id.hex()[:8]} holds {peer_id.to_base58()}, not admitted"
                )
                self._running_groups[group_id].set_exception(error)  # its peers' RPCs end, nothing is sent
                raise error
        runner = RobustAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            evidence=self.evidence,
            robust_cfg=self.robust_cfg,
            scores=self.contribution_scores,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if self.evidence is not None:  # the coordinator cross-checks reports against groups
            self.evidence.group(group_id, [peer_id.to_base58() for peer_id in group_info.peer_ids])
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    async def _load_state_from_peers(self, future, timeout: float | None = None):
        await load_state_checked(
            self, future, timeout, admit=lambda peer_id: not self._refused(peer_id, "a state donor")
        )


def _never_follow_refused_leaders(matchmaking, gate: Gate | None) -> None:
    """Make hivemind 1.1.12's Matchmaking skip leaders the gate refuses (`_request_join_group` is
    the one place it asks a leader, also after a redirect). Idempotent."""
    if gate is None or getattr(matchmaking, "_gated", False):
        return
    request_join_group = matchmaking._request_join_group

    async def _request_join_admitted(leader):
        admitted, reason = admit(gate, leader.to_base58())
        if not admitted:
            logger.info("not asking %s to lead our averaging group: %s", leader.to_base58(), reason)
            return None
        return await request_join_group(leader)

    matchmaking._request_join_group = _request_join_admitted
    matchmaking._gated = True


class GuardedAverager(_Guarded, DecentralizedAverager):
    """DecentralizedAverager with robust aggregation and the admission gate (tests, benchmarks)."""


class GuardedGradientAverager(_Guarded, GradientAverager):
    """The gradient averager `make_optimizer` gives hivemind (through `grad_averager_factory`)."""


class GuardedStateAverager(_Guarded, TrainingStateAverager):
    """The state averager `make_optimizer` gives hivemind (through `_make_state_averager`)."""


def make_state_averager(
    opt, *, gate: Gate | None, evidence: EvidenceSink | None, averager_class=None, **kwargs
):
    """What hivemind 1.1.12's `Optimizer._make_state_averager(**kwargs)` builds, guarded: the same
    arguments as hivemind's own (`opt` is the optimizer being built); `averager_class` is a
    GuardedStateAverager or a subclass (peer/swarm/diloco.py).

    hivemind shares the optimizer's tensors with its averager process in place when it offloads the
    optimizer (`reuse_tensors`), and refuses ones off the CPU: mode=diloco's `extra_tensors` (the
    inner AdamW's state) live on the model's GPU, so there the averager keeps its own CPU copies,
    refreshed before each round and written back after it (hivemind's path without offloading)."""
    reuse_tensors = opt.offload_optimizer and all_on_host(kwargs.get("extra_tensors", ()))
    return (averager_class or GuardedStateAverager)(
        robust_cfg=STATE,
        dht=opt.dht,
        prefix=f"{opt.run_id}_state_averager",
        min_matchmaking_time=opt.matchmaking_time,
        allreduce_timeout=opt.allreduce_timeout,
        shutdown_timeout=opt.shutdown_timeout,
        offload_optimizer=opt.offload_optimizer,
        reuse_tensors=reuse_tensors,
        custom_gradients=opt.offload_optimizer,
        status_loglevel=opt.status_loglevel,
        next_chunk_timeout=opt.next_chunk_timeout,
        client_mode=opt.client_mode,
        auxiliary=opt.auxiliary,
        start=True,
        gate=gate,
        evidence=evidence,
        **kwargs,
    )


def all_on_host(tensors) -> bool:
    """Whether hivemind can share `tensors` with its averager in place (CPU memory only)."""
    return all(t.device.type == "cpu" for t in tensors)


def grad_compression(name: str, spec=None):
    """hivemind's codec for a manifest's `swarm.grad_compression` (peer.swarmspec.GRAD_COMPRESSIONS);
    `spec` (the run's SwarmSpec) gives the sparse codec's knobs, defaults otherwise.
    "uint8" is hivemind's uniform 8-bit quantization (each part centred, 6 sigma in 256 bins, each
    bin decoded to its mean); numpy >= 2.4 breaks its decoder in 1.1.12, hence numpy<2.4 in
    pyproject.toml (docs/hivemind.md). "topk2bit" (mode=diloco only) is peer/robust/sparsecodec.py's
    top-k per chunk with low-bit values, fed by the peer's error feedback (peer/swarm/diloco.py)."""
    from hivemind.compression import (
        Float16Compression,
        NoCompression,
        ScaledFloat16Compression,
        Uniform8BitQuantization,
    )

    def topk():
        if spec is None:
            return TopKCodec(part_size_bytes=GRAD_PART_SIZE_BYTES)
        return TopKCodec(
            fraction=spec.sparse_fraction,
            chunk=spec.sparse_chunk,
            bits=spec.sparse_bits,
            part_size_bytes=GRAD_PART_SIZE_BYTES,
            return_bits=spec.sparse_return_bits,
        )

    codecs = {
        "none": NoCompression,
        "float16": Float16Compression,
        "scaled_float16": ScaledFloat16Compression,
        "uint8": Uniform8BitQuantization,
        "topk2bit": topk,
    }
    if name not in codecs:
        raise CrowdtrainError(
            f"the run asks for gradient compression {name!r}, which this crowdtrain does not know "
            f"({', '.join(codecs)}); {upgrade_hint()}"
        )
    return codecs[name]()


__all__ = [
    "EvidenceSink",
    "Gate",
    "GuardedAverager",
    "GuardedGradientAverager",
    "GuardedStateAverager",
    "RobustAllReduceRunner",
    "admit",
    "grad_compression",
    "make_state_averager",
]


def round_group(control, own_peer_id) -> tuple[str, ...]:
    """Who averaged together in a finished hivemind round (`control`, hivemind's StepControl, whose
    result maps each member's peer id to what it gathered): their sorted peer ids; just this peer's
    when the round failed, was skipped (no partner) or has not finished."""
    try:
        if control is not None and control.done() and not control.cancelled():
            return tuple(sorted(str(peer_id) for peer_id in control.result(0)))
    except (Exception, asyncio.CancelledError):  # the round failed: this peer stepped alone
        pass
    return (str(own_peer_id),)
