"""`RobustPartReducer`: hivemind's reducer of one span of an all-reduce, made robust.

Each group member reduces its own span from the parts every sender streams to it. hivemind 1.1.12
sums them as they come; this reducer keeps each sender's part until all are in, reduces it with
peer/robust/reduce.py's `robust_reduce` and collects the evidence: refusals as they happen, the span's
statistical verdicts when it finishes. With a `RoundAgreement` (peer/robust/contribscore.py) it also
leaves out the senders whose long-run agreement with our own gradient says they push against it,
and scores this round's parts for the next rounds.
"""

from __future__ import annotations

import asyncio

import torch
from crowdtrain.peer.robust import reduce as robust
from crowdtrain.peer.robust.contribscore import RoundAgreement
from crowdtrain.peer.robust.reduce import DEFAULT, RobustConfig, SpanEvidence, robust_reduce
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer


class RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer, reducing each part with `robust_reduce` once every current
    sender's part is in (hivemind 1.1.12 sums them as they come). `report(sender_index, kind,
    detail)` receives the evidence: refusals as they happen, span verdicts when it finishes."""

    def __init__(
        self,
        part_shapes,
        num_senders: int,
        *,
        report,
        cfg: RobustConfig = DEFAULT,
        agreement: RoundAgreement | None = None,
    ):
        self._parts: dict[int, tuple[torch.Tensor, float]] = {}
        self._report = report
        self._cfg = cfg
        self._agreement = agreement
        self._span = SpanEvidence(num_senders, cfg)
        self._reported = False
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._parts = {}
        super().reset_accumulators()
        self.accumulator = None  # unused: parts are kept whole until the last one arrives

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ):
        """hivemind 1.1.12's accumulate_part, keeping the part instead of adding it to a sum."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(
                    f"attempted to aggregate part in a finalized {self.__class__.__name__}"
                )
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            if tensor_part.shape != self.part_shapes[part_index]:
                self._report(sender_index, "bad_part", f"part of shape {tuple(tensor_part.shape)}")
                tensor_part = torch.full(self.part_shapes[part_index], float("nan"))  # dropped as non-finite
            self._parts[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        if self._agreement is not None:
            self._agreement.add_part({i: part for i, (part, _) in self._parts.items()})
        senders = sorted(self._parts)
        if self._agreement is not None:  # senders we exclude are left out (unless nobody else sent)
            senders = [i for i in senders if not self._agreement.excluded[i]] or senders
        if senders:
            result = robust_reduce(
                [self._parts[i][0] for i in senders], [self._parts[i][1] for i in senders], self._cfg
            )
            self._span.add(_reindexed(result, senders, self.num_senders))
            for index, kind, detail in result.refused:
                self._report(senders[index], kind, detail)
            aggregate = result.aggregate
        else:
            aggregate = torch.zeros(self.part_shapes[self.current_part_index])
        self.current_part_future.set_result(aggregate)
        self.reset_accumulators()

    def finalize(self):
        super().finalize()
        if not self._reported and hasattr(self, "_span"):
            self._reported = True
            verdicts = self._span.statistical_verdicts()  # refusals went out already
            if self._agreement is not None:
                verdicts += self._agreement.finish()
            for index, kind, detail in verdicts:
                self._report(index, kind, detail)


def _reindexed(result: robust.PartResult, senders: list[int], num_senders: int) -> robust.PartResult:
    """`result`'s per-sender statistics placed at the senders' indices among all `num_senders`."""

    def spread(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_senders, dtype=values.dtype)
        out[senders] = values
        return out

    return robust.PartResult(
        aggregate=result.aggregate,
        refused=[],
        sq_dist=spread(result.sq_dist),
        dot=spread(result.dot),
        sq_norm=spread(result.sq_norm),
        tau=result.tau,
        counted=spread(result.counted),
    )
