"""Robust reduction of one all-reduce part from several senders (pure torch; no hivemind here).

hivemind's butterfly all-reduce splits every averaged vector into spans; each group member reduces
its own span from the parts all senders stream to it, and sends each sender back `average - part`.
Stock hivemind sums the parts with the weight each *sender declares* and checks nothing, so one
NaN, one x1e4 part or one weight of 1e30 reaches every member's parameters. peer/swarm/averaging.py
replaces that sum with `robust_reduce` (reducer side) and checks what a reducer sends back with
`check_delta` (receiver side):

- a part that is not finite is dropped, a declared weight that is not finite or negative is
  refused, and a positive weight is capped at `weight_cap_factor` x the median positive weight;
- the rest is CenteredClip (Karimireddy et al. 2021, as in BTARD): start at the coordinate-wise
  median, then `clip_iterations` times move by the weighted mean of every sender's difference,
  each difference clipped to norm `tau` = `tau_factor` x the median distance to that median. An
  attacker moves the result by at most its weight share x tau per iteration, whatever it sends.
  When no honest part is clipped the result is exactly the weighted mean;
- with 3+ senders, one farther than `outlier_factor` x tau from that aggregate, or (in a part of
  `min_flip_numel`+ values) with a cosine to it below `flip_drop_cosine`, is dropped and the part
  reduced again (a sign flip is within tau of the others: clipping alone keeps its pull).

Evidence: every drop above names its sender (`non_finite`, `weight` refused or absurd, `outlier`,
`sign_flip`); `SpanEvidence` adds verdicts over the reducer's whole span, where a tiny part (a bias
of 8 values) says nothing but thousands of values do: `outlier` (distance > `outlier_factor` x the
span's tau) and `sign_flip` (cosine < `flip_cosine`).

The constants were chosen by measuring honest spreads (`python -m scripts.bench_robust --spread`,
scripts/robust_spread.py): the gradients of the tiny preset's model on different Zipf-token batches,
each peer averaging 1 to 10 batches (its weight), at initialisation and after 30 steps, and
synthetic `signal + noise / sqrt(weight)` with noise 0.1x to 10x the signal; 2 to 6 senders, parts
split as hivemind does (25 groups). Worst honest figures: distance to the aggregate 3.4x the median
one in a part (outlier at 2 tau = 12x), span distance 0.36 tau (span verdict at 2 tau), cosine to
the aggregate -0.45 in a part of 4,096+ values (dropped below -0.8; span verdict below -0.3), a
returned average 1.4x our reference norm away (refused above 20x), no verdict at all; real
gradients are heavy-tailed, so tau = 6x (not 3x: 44% error in one part) still moves the result of
the worst part 8% off the weighted mean (synthetic: 1e-7). Weights: honest peers of different
speed declare up to ~10x apart, capped at 8x the median. A x1e4, a shifted-by-20-spreads or a NaN
part is dropped, a sign flip of the honest mean has cosine ~ -1. The small-shift "a little is
enough" attack stays within the honest spread by design: it is not detected, only bounded (its
weight share x tau per iteration). A bounded push AGAINST the honest direction, round after round,
is caught over rounds instead: peer/robust/contribscore.py (`score`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from crowdtrain.peer.robust.contribscore import ScoreConfig

Evidence = tuple[int, str, str]  # (sender index, kind, detail)


@dataclass(frozen=True)
class RobustConfig:
    weight_cap_factor: float = 8.0  # a declared weight counts at most this x the median positive weight
    weight_absurd_factor: float = 1e3  # a weight this x the median is reported as evidence
    tau_factor: float = 6.0  # CenteredClip radius: this x the median distance to the coordinate median
    clip_iterations: int = 3  # CenteredClip iterations (honest parts converge in one)
    outlier_factor: float = 2.0  # distance to the aggregate over this x tau: outlier (dropped, reported)
    flip_drop_cosine: float = -0.8  # a part whose cosine to the aggregate is below this is dropped
    flip_cosine: float = -0.3  # cosine to the aggregate over the whole span below this: sign flip
    min_flip_numel: int = 4096  # parts smaller than this are never dropped for their cosine
    min_evidence_numel: int = 4096  # spans smaller than this give no statistical verdicts
    min_judged_weight: float = 0.5  # senders declaring less than this x the median weight get no
    # statistical verdict (outlier, sign flip): a peer that averaged 1 micro-batch while the others
    # averaged 6 sends a noisy gradient (an honest late joiner measured at cosine -0.54 over a span)
    delta_bound: float = 20.0  # a returned ||delta|| over this x our reference norm is refused
    min_reference_norm: float = 1e-12  # below this our own part is ~0: only finiteness is checked
    # each sender's agreement with our own gradient over many rounds (peer/robust/contribscore.py): a sender
    # whose parts persistently point against ours is left out of our reductions
    score: ScoreConfig = ScoreConfig()


DEFAULT = RobustConfig()
# parameters (the state averager): honest peers' copies agree to ~1e-7 right after an average and
# drift apart by percents when one misses a round, so a distance in units of tau says nothing about
# intent (honest peers were reported at 3,000 tau): robust reduction, but no statistical verdicts
STATE = RobustConfig(min_judged_weight=math.inf, score=ScoreConfig(enabled=False))


@dataclass
class PartResult:
    """What `robust_reduce` made of one part: the aggregate, who was dropped and why, and the
    per-sender statistics `SpanEvidence` accumulates (tensors of shape (num_senders,))."""

    aggregate: torch.Tensor
    refused: list[Evidence]
    sq_dist: torch.Tensor  # ||x_i - aggregate||^2
    dot: torch.Tensor  # <x_i, aggregate>
    sq_norm: torch.Tensor  # ||x_i||^2
    tau: float
    counted: (
        torch.Tensor
    )  # bool: whose statistics mean something (finite, weight >= min_judged_weight x median)


def clamp_weights(weights: list[float], cfg: RobustConfig = DEFAULT) -> tuple[torch.Tensor, list[Evidence]]:
    """Weights to use (refused ones are 0) and evidence against absurd or invalid declarations."""
    evidence: list[Evidence] = []
    out = []
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            evidence.append((index, "weight", f"declared weight {weight!r} refused"))
            out.append(0.0)
        else:
            out.append(float(weight))
    w = torch.tensor(out, dtype=torch.float64)
    positive = w[w > 0]
    if len(positive) > 0:
        median = float(positive.quantile(0.5))  # the mean of the middle two: [1, 10] has median 5.5
        cap = cfg.weight_cap_factor * median
        for index in torch.nonzero(w > cfg.weight_absurd_factor * median).flatten().tolist():
            evidence.append(
                (
                    index,
                    "weight",
                    f"declared weight {weights[index]:.3g} > {cfg.weight_absurd_factor:g}x the median {median:.3g}",
                )
            )
        w = w.clamp(max=cap)
    return w, evidence


def sq_norm(x: torch.Tensor) -> float:
    """||x||^2 in one pass, without a float64 copy of x: float32 accumulation (torch's reductions
    sum pairwise, so 1e8 values lose no meaningful precision); inf when x holds NaN/Inf or overflows."""
    norm = float(torch.linalg.vector_norm(x.float() if x.dtype != torch.float32 else x))
    return norm * norm if math.isfinite(norm) else math.inf


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows of x (n, d); the mean of the middle two when n is even.
    Up to 16 rows an odd-even transposition network of elementwise min/max (10x faster than
    torch's sort along a short dimension: 1.2 ms instead of 12 ms for 4 x 131,072 values)."""
    n = x.shape[0]
    if n <= 16:
        rows = list(x.unbind(0))
        for step in range(n):
            for i in range(step % 2, n - 1, 2):
                rows[i], rows[i + 1] = (
                    torch.minimum(rows[i], rows[i + 1]),
                    torch.maximum(rows[i], rows[i + 1]),
                )
    else:
        rows = x.sort(dim=0).values
    if n % 2:
        return rows[n // 2].clone()
    return (rows[n // 2 - 1] + rows[n // 2]) / 2


def centered_clip(
    x: torch.Tensor, w: torch.Tensor, cfg: RobustConfig = DEFAULT
) -> tuple[torch.Tensor, float]:
    """CenteredClip of the rows of x (n, d) with weights w (n,) > 0: (aggregate, tau)."""
    center = coordinate_median(x)
    tau = cfg.tau_factor * float((x - center).norm(dim=1).median())
    if tau == 0.0:  # most senders agree exactly (parameters right after an average): that is the answer
        return center, tau
    share = (w / w.sum()).to(x.dtype)
    v, unclipped = center, False
    for _ in range(cfg.clip_iterations):
        diff = x - v
        scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
        if unclipped and bool((scale == 1.0).all()):
            break  # v is the weighted mean and every sender lies within tau of it: the fixed point
        unclipped = bool((scale == 1.0).all())
        v = v + (share * scale) @ diff
    return v, tau


def robust_reduce(parts: list[torch.Tensor], weights: list[float], cfg: RobustConfig = DEFAULT) -> PartResult:
    """Robust weighted average of one part sent by len(parts) senders (see the module docstring)."""
    flat = torch.stack([p.detach().reshape(-1).float() for p in parts])  # (n, d)
    w, refused = clamp_weights(weights, cfg)
    finite = torch.isfinite(flat.sum(dim=1))  # one pass; a NaN or Inf anywhere makes the sum so
    for index in torch.nonzero(~finite).flatten().tolist():
        refused.append((index, "non_finite", f"part of {flat.shape[1]} values with NaN/Inf"))
    use = finite & (w > 0)
    if not use.any():  # all weights zero (everyone tags along): equal weights among finite parts
        use, w = finite, torch.ones_like(w)
    if not use.any():
        aggregate, tau = torch.zeros(flat.shape[1]), 0.0
    else:
        aggregate, tau = centered_clip(flat[use], w[use], cfg)
        dropped = _far_or_flipped(flat, aggregate, tau, use, cfg, refused, judged=_judged(w, cfg))
        if dropped.any() and (use & ~dropped).any():
            use = use & ~dropped
            aggregate, tau = centered_clip(flat[use], w[use], cfg)
    clean = flat if bool(finite.all()) else torch.where(finite[:, None], flat, torch.zeros(()))
    return PartResult(
        aggregate=aggregate.reshape(parts[0].shape).to(parts[0].dtype),
        refused=refused,
        sq_dist=torch.linalg.vector_norm(clean - aggregate, dim=1).double() ** 2,
        dot=(clean @ aggregate).double(),
        sq_norm=torch.linalg.vector_norm(clean, dim=1).double() ** 2,
        tau=tau,
        counted=finite & (w > 0) & _judged(w, cfg),
    )


def _judged(w: torch.Tensor, cfg: RobustConfig) -> torch.Tensor:
    """Senders whose declared weight is large enough for a statistical verdict against them."""
    positive = w[w > 0]
    if len(positive) == 0:
        return torch.zeros_like(w, dtype=torch.bool)
    return w >= cfg.min_judged_weight * float(positive.quantile(0.5))


def _far_or_flipped(
    x, aggregate, tau, use, cfg: RobustConfig, refused: list[Evidence], judged: torch.Tensor
) -> torch.Tensor:
    """Senders to drop from this part (needs 3+ senders to tell who is odd): farther than
    `outlier_factor` x tau from the aggregate, or, in a part of `min_flip_numel`+ values, with a
    cosine to it below `flip_drop_cosine`. Appends the evidence against `judged` senders to
    `refused` (a low-weight sender is dropped quietly: its noise is expected)."""
    dropped = torch.zeros_like(use)
    if int(use.sum()) < 3:
        return dropped
    dist = (x - aggregate).norm(dim=1)
    far = use & (dist > cfg.outlier_factor * tau) if tau > 0 else torch.zeros_like(use)  # tau 0: median won
    for index in torch.nonzero(far & judged).flatten().tolist():
        refused.append(
            (index, "outlier", f"distance {float(dist[index]):.3g} = {float(dist[index]) / tau:.1f} tau")
        )
    dropped |= far
    if x.shape[1] >= cfg.min_flip_numel:
        cos = _cosines(x, aggregate)
        flipped = use & ~far & (cos < cfg.flip_drop_cosine)
        for index in torch.nonzero(flipped & judged).flatten().tolist():
            refused.append((index, "sign_flip", f"cosine {float(cos[index]):.2f} to the aggregate"))
        dropped |= flipped
    return dropped


def _cosines(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of x to v; 0 where either is zero."""
    denominator = x.norm(dim=1) * v.norm()
    return torch.where(denominator > 0, (x @ v) / denominator.clamp_min(1e-30), torch.zeros(()))


@dataclass
class SpanEvidence:
    """Per-sender statistics over a reducer's whole span, and the verdicts they support."""

    num_senders: int
    cfg: RobustConfig = DEFAULT
    numel: int = 0
    sq_tau: float = 0.0
    sq_agg: float = 0.0
    refused: dict[tuple[int, str], str] = field(default_factory=dict)
    sq_dist: torch.Tensor = None
    dot: torch.Tensor = None
    sq_norm: torch.Tensor = None
    counted: torch.Tensor = None

    def __post_init__(self):
        self.sq_dist, self.dot, self.sq_norm = (
            torch.zeros(self.num_senders, dtype=torch.float64) for _ in "abc"
        )
        self.counted = torch.zeros(self.num_senders, dtype=torch.bool)

    def add(self, part: PartResult) -> None:
        for index, kind, detail in part.refused:
            self.refused.setdefault((index, kind), detail)  # the first detail of each kind is enough
        self.numel += part.aggregate.numel()
        self.sq_tau += part.tau**2
        self.sq_agg += sq_norm(part.aggregate)
        self.sq_dist += part.sq_dist
        self.dot += part.dot
        self.sq_norm += part.sq_norm
        self.counted |= part.counted

    def verdicts(self) -> list[Evidence]:
        """Refusals seen in any part, then the span-level verdicts against the other senders."""
        return [
            (i, kind, detail) for (i, kind), detail in sorted(self.refused.items())
        ] + self.statistical_verdicts()

    def statistical_verdicts(self) -> list[Evidence]:
        """Outlier and sign-flip verdicts over the whole span, against senders not refused yet."""
        accused = {index for index, _ in self.refused}
        if self.numel < self.cfg.min_evidence_numel or self.sq_tau == 0.0:
            return []
        tau, out = math.sqrt(self.sq_tau), []
        for index in range(self.num_senders):
            if index in accused or not bool(self.counted[index]):
                continue
            dist = math.sqrt(float(self.sq_dist[index]))
            if dist > self.cfg.outlier_factor * tau:
                out.append((index, "outlier", f"distance {dist:.3g} to the aggregate = {dist / tau:.1f} tau"))
                continue
            norms = math.sqrt(float(self.sq_norm[index]) * self.sq_agg)
            cosine = float(self.dot[index]) / norms if norms > 0 else 0.0
            if cosine < self.cfg.flip_cosine:
                out.append((index, "sign_flip", f"cosine {cosine:.2f} to the aggregate over the span"))
        return out


def check_delta(
    delta: torch.Tensor, own_part: torch.Tensor, reference_norm: float, cfg: RobustConfig = DEFAULT
) -> tuple[bool, str]:
    """Receiver side: may we apply `delta` (= reducer's average - our part)? (ok, reason).

    `reference_norm` is max(||own part||, the part's share of our whole vector's norm); the runner
    computes it so that a part we happen to hold as zeros (rare embedding rows) is not a reason to
    refuse. Below `min_reference_norm` only finiteness is checked."""
    if delta.shape != own_part.shape:
        return False, f"returned a part of shape {tuple(delta.shape)}, ours is {tuple(own_part.shape)}"
    norm = float(torch.linalg.vector_norm(delta.float()))  # NaN or Inf when any value is, one pass
    if not math.isfinite(norm) and not bool(torch.isfinite(delta).all()):
        return False, "returned a non-finite average"
    if not math.isfinite(norm):  # finite values whose norm overflows float32: certainly too far
        return False, "returned an average too large to measure"
    if reference_norm >= cfg.min_reference_norm and norm > cfg.delta_bound * reference_norm:
        return (
            False,
            f"returned an average {norm / reference_norm:.3g}x our part's norm away (bound {cfg.delta_bound:g})",
        )
    return True, "ok"


def nonfinite_loss_message(loss: float, epoch: int, model: torch.nn.Module) -> str:
    """What a peer says when its training loss is not finite: parameters that went non-finite came
    from outside (a bad average), finite ones mean our own batch or numerics did it."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return (
            f"the model's parameters became non-finite at epoch {epoch} (loss {loss}): a bad update "
            "reached them; restart this peer, it reloads the swarm's state"
        )
    return (
        f"training loss became {loss} at epoch {epoch} with finite parameters: this peer's batch or "
        "its numerics produced it; check the data, or lower the learning rate"
    )
