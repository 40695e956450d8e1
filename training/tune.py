"""Stage 7: beta, tau, the number of active experts and the sparse-softmax variant, tuned on
the holdout (Algorithm 2's "tuned on holdout data").

Each holdout document is split as at test time: its first `query_tokens` tokens are the
prompt (embedded, routed), the rest is scored under the model merged for that prompt. Every
grid point (variant, max_active, beta, tau) gives a routing per document; documents whose
rounded weights repeat across grid points are scored once, so sharp temperatures and
max_active 1, where most points collapse to the same top expert, cost little. The betas should
reach far enough for near-uniform weights over the active experts (beta 10 on cosine
similarities is uniform to within a few percent): on the wiki extracts uniform top-3 beat the
sharp softmax. The grid point with the lowest holdout perplexity wins; ties go to the earlier
point (the paper's variant first, then fewer active experts: cheaper to serve).

The out-of-reach threshold is calibrated on the same prefixes: a low percentile of their top
centroid similarity, so about that share of in-distribution prompts would be flagged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from training.evaluate import ScoreCache, perplexity
from ttmm_vllm.routing.router import RoutingParams, Variant, decide


@dataclass
class GridPoint:
    variant: str
    beta: float
    tau: float
    perplexity: float
    mean_active: float  # experts with non-zero weight, averaged over documents
    max_active: int = 10


@dataclass
class TuneResult:
    variant: str
    beta: float
    tau: float
    perplexity: float
    grid: list[GridPoint] = field(default_factory=list)
    # per variant, its best grid point: {"perplexity", "beta", "tau", "max_active"}
    best_by_variant: dict[str, dict[str, float]] = field(default_factory=dict)
    # per-document (nll, tokens) under the chosen routing, for the report
    nll: np.ndarray | None = None
    count: np.ndarray | None = None
    max_active: int = 10


def routing_weights(sims: np.ndarray, params: RoutingParams) -> np.ndarray:
    """(n, K) merge weights from (n, K) query-centroid similarities, exactly as served."""
    w = np.zeros_like(sims, dtype=np.float64)
    ids = np.arange(sims.shape[1])
    for i, row in enumerate(sims):
        r = decide(ids, row, params)
        w[i, list(r.expert_ids)] = r.weights
    return w


def ood_threshold(top_sims: np.ndarray, percentile: float) -> float | None:
    if top_sims.size == 0:
        return None
    return float(np.percentile(top_sims, percentile))


def best_point(grid: Sequence[GridPoint], **fixed) -> GridPoint:
    """The lowest-perplexity grid point among those matching `fixed` (e.g. max_active=3);
    the earliest on ties, as `tune` picks."""
    pts = [p for p in grid if all(getattr(p, k) == v for k, v in fixed.items())]
    if not pts:
        raise ValueError(f"no grid point has {fixed}")
    return min(pts, key=lambda p: p.perplexity)


def tune(cache: ScoreCache, sims: np.ndarray, *, betas: Sequence[float],
         taus: Sequence[float], variants: Sequence[str], max_active: int | Sequence[int]
         ) -> TuneResult:
    """Grid search; `sims` are (n, K) similarities of each text's prefix to the centroids;
    `max_active`: one value or the values to try. `cache` scores the texts (its mixer's first
    K adapters must be the experts in id order; any after them get weight 0).
    """
    n, k = sims.shape
    if n != len(cache.texts):
        raise ValueError(f"{n} similarity rows for {len(cache.texts)} texts")
    if n == 0:
        raise ValueError("tuning needs at least one holdout document")
    width = cache.mixer.n if cache.mixer is not None else k
    counts = sorted({int(max_active)} if np.isscalar(max_active) else set(max_active))
    points = list(itertools.product(variants, counts, betas, taus))
    grid: list[GridPoint] = []
    per_doc: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for variant, active, beta, tau in tqdm(points, desc="tune beta/tau/max_active",
                                           unit="point"):
        params = RoutingParams(beta=beta, tau=tau, variant=Variant(variant),
                               max_active=active)
        w = routing_weights(sims, params)
        full = np.zeros((n, width))
        full[:, :k] = w
        nll, cnt = cache.score(full)
        per_doc[(variant, active, beta, tau)] = (nll, cnt)
        grid.append(GridPoint(variant, float(beta), float(tau), perplexity(nll, cnt),
                              float((w > 0).sum(1).mean()), int(active)))
    g = best_point(grid)
    by_variant = {}
    for v in variants:
        p = best_point(grid, variant=v)
        by_variant[v] = {"perplexity": p.perplexity, "beta": p.beta, "tau": p.tau,
                         "max_active": p.max_active}
    nll, cnt = per_doc[(g.variant, g.max_active, g.beta, g.tau)]
    return TuneResult(g.variant, g.beta, g.tau, g.perplexity, grid, by_variant, nll, cnt,
                      g.max_active)
