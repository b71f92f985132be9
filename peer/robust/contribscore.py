"""Each sender's agreement with our own gradient, scored over many rounds (pure torch; no hivemind).

Robust reduction (peer/robust/reduce.py) bounds what one part does in one round, but a sender that pushes
against the swarm's direction by a little, within every per-round bound, does it again round
after round. A reducer sees every sender's part of its span; `RoundAgreement` measures, for each
sender, the cosine of its parts with OUR OWN part over the whole span, and `ContributionScores`
(kept on the averager object, which lives across rounds in hivemind's averager process) holds
the last `window_rounds` cosines of each sender. `judge` leaves a sender out of our reductions
while its mean cosine is significantly negative (`mean + z x stderr < 0` and `mean < -margin`,
over at least `min_rounds` rounds); its parts are still scored, so it is readmitted as soon as its
contributions stop pointing against ours. Evidence for the coordinator (`persistent_disagreement`)
needs a stricter test (Student's t at p = 0.001, `report_min_rounds`, `report_margin`).

Why the reference is our own part: it is the one gradient this peer knows to be honest, and no
one else can change it, so no coalition of senders can make an honest sender look bad. An honest
gradient, however noisy (few samples, a late joiner), slow or computed on another data shard, is
an unbiased estimate of its shard's gradient, and shards of one run share most of their
direction: its expected cosine with ours is positive, and a noisy sender's is near zero, never
significantly negative. A sender whose parts point against ours, on average, is what hurts.

Not caught (bounded by robust reduction instead): a shift that keeps the sender's gradient in it
(`g + d`, "a little is enough", a constant vector) keeps a positive cosine; and an identity gets
`min_rounds` rounds before its first verdict, so a new identity per few rounds stays bounded only.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
Evidence = tuple[int, str, str]  # (sender index, kind, detail)
KIND = "persistent_disagreement"


@dataclass(frozen=True)
class ScoreConfig:
    enabled: bool = True  # off: every sender counts with its declared weight (scripts/attacks.py compares)
    window_rounds: int = 16  # each sender's last this many scored rounds make its score
    min_rounds: int = 5  # no verdict before this many scored rounds
    z: float = 3.0  # left out while mean + z x standard error < 0 (one-sided test of "points against us")
    margin: float = 0.02  # ... and mean < -margin: a cosine near zero is noise, never a verdict
    min_std: float = 0.03  # floor of the per-round standard deviation used in the standard error
    # evidence for the coordinator needs a stricter test than leaving a sender out of our own span:
    # Student's t at p = 0.001 (not z: a few rounds underestimate the spread), more rounds, a larger mean
    report_min_rounds: int = 8
    report_margin: float = 0.1
    min_numel: int = 4096  # a span of fewer values gives no score for the round
    max_senders: int = 1024  # senders remembered (least recently scored forgotten first)


# one-sided Student's t quantiles at p = 0.001 by degrees of freedom; a df between two entries
# uses the smaller df's (larger) value
_T_999 = {7: 4.785, 8: 4.501, 9: 4.297, 10: 4.144, 11: 4.025, 12: 3.930, 13: 3.852, 14: 3.787, 15: 3.733,
          20: 3.552, 30: 3.385, 60: 3.232}  # fmt: skip


def t_999(df: int) -> float:
    """Student's t quantile at one-sided p = 0.001 (conservative between table entries)."""
    known = [d for d in _T_999 if d <= df]
    return _T_999[max(known)] if known else math.inf


def round_cosines(dot: torch.Tensor, sq_norm: torch.Tensor, own_index: int, usable: torch.Tensor) -> list:
    """Cosine of each sender's span with ours (None where undefined: not usable, a zero span, us)."""
    own_sq = float(sq_norm[own_index])
    out = []
    for index in range(len(dot)):
        denominator = math.sqrt(float(sq_norm[index]) * own_sq)
        ok = index != own_index and bool(usable[index]) and denominator > 0 and math.isfinite(denominator)
        out.append(float(dot[index]) / denominator if ok else None)
    return out


def judge(cosines, cfg: ScoreConfig) -> tuple[str, str]:
    """(decision, reason) for a sender whose recent per-round cosines with our gradient are
    `cosines`: "keep", "exclude" (left out of our reductions) or "report" (left out, and evidence
    for the coordinator)."""
    n = len(cosines)
    if not cfg.enabled:
        return "keep", "contribution scoring is off"
    if n < cfg.min_rounds:
        return "keep", f"{n} scored rounds, fewer than {cfg.min_rounds}"
    mean = sum(cosines) / n
    error = max(math.sqrt(sum((c - mean) ** 2 for c in cosines) / (n - 1)), cfg.min_std) / math.sqrt(n)
    bound = mean + cfg.z * error
    summary = f"mean cosine {mean:+.3f} with our gradient over {n} rounds (upper bound {bound:+.3f})"
    if not (bound < 0 and mean < -cfg.margin):
        return "keep", summary
    strict = mean + t_999(n - 1) * error
    if n >= cfg.report_min_rounds and strict < 0 and mean < -cfg.report_margin:
        return "report", f"{summary}: its contributions point against ours (p < 0.001)"
    return "exclude", f"{summary}: its contributions point against ours"


class ContributionScores:
    """Per-sender (DHT peer id, base58) windows of cosines; one per averager, across rounds."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self._cosines: OrderedDict[str, deque] = OrderedDict()

    def verdict(self, sender: str) -> tuple[str, str]:
        return judge(list(self._cosines.get(sender, ())), self.cfg)

    def observe(self, sender: str, cosine: float) -> None:
        window = self._cosines.pop(sender, None) or deque(maxlen=self.cfg.window_rounds)
        window.append(cosine)
        self._cosines[sender] = window
        while len(self._cosines) > self.cfg.max_senders:
            self._cosines.popitem(last=False)


class RoundAgreement:
    """One all-reduce round of one reducer: which senders we exclude (decided at the start of the
    round, from earlier rounds) and each sender's dot product with our part over the span's parts."""

    def __init__(self, scores: ContributionScores, senders: list[str], own_index: int | None):
        self.scores = scores
        self.senders = senders
        self.own_index = own_index
        self.excluded = [scores.verdict(s)[0] != "keep" for s in senders]
        for sender, excluded in zip(senders, self.excluded, strict=True):
            if excluded:
                logger.warning("left %s out of our reduction: %s", sender, scores.verdict(sender)[1])
        self.dot = torch.zeros(len(senders), dtype=torch.float64)
        self.sq_norm = torch.zeros(len(senders), dtype=torch.float64)
        self.seen = torch.zeros(len(senders), dtype=torch.bool)
        self.missed = torch.zeros(len(senders), dtype=torch.bool)  # a part absent or not finite
        self.numel = 0

    def add_part(self, parts: dict[int, torch.Tensor]) -> None:
        """Parts of one part index by sender index (senders that failed are absent)."""
        if not self.scores.cfg.enabled or self.own_index not in parts:
            return
        own = parts[self.own_index].detach().reshape(-1).float()
        self.numel += own.numel()
        for index in range(len(self.senders)):
            if index not in parts:
                self.missed[index] = True
                continue
            flat = parts[index].detach().reshape(-1).float()
            dot, sq = float(flat @ own), float(flat @ flat)
            if not (math.isfinite(dot) and math.isfinite(sq)):
                self.missed[index] = True
                continue
            self.dot[index] += dot
            self.sq_norm[index] += sq
            self.seen[index] = True

    def finish(self) -> list[Evidence]:
        """Score the round (spans of `min_numel`+ values only): evidence against the senders whose
        scores now pass the strict test."""
        if self.own_index is None or self.numel < self.scores.cfg.min_numel:
            return []
        usable = self.seen & ~self.missed
        cosines = round_cosines(self.dot, self.sq_norm, self.own_index, usable)
        out = []
        for index, cosine in enumerate(cosines):
            if cosine is None:
                continue
            self.scores.observe(self.senders[index], cosine)
            decision, reason = self.scores.verdict(self.senders[index])
            if decision == "report":
                out.append((index, KIND, reason))
        return out
