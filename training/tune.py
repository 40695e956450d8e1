"""Stage 7: beta, tau and the sparse-softmax variant, tuned on the holdout (Algorithm 2's
"tuned on holdout data").

Each holdout document is split as at test time: its first `query_tokens` tokens are the
prompt (embedded, routed), the rest is scored under the model merged for that prompt. Every
grid point (variant, beta, tau) gives a routing per document; documents whose rounded weights
repeat across grid points are scored once, so sharp temperatures, where most points collapse
to the same top expert, cost little. The grid point with the lowest holdout perplexity wins;
ties go to the earlier point (the paper's variant is listed first).

The out-of-reach threshold is calibrated on the same prefixes: a low percentile of their top
centroid similarity, so about that share of in-distribution prompts would be flagged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from training.evaluate import AdapterMixer, perplexity, suffix_nll
from ttmm_vllm.router import RoutingParams, Variant, decide


@dataclass
class GridPoint:
    variant: str
    beta: float
    tau: float
    perplexity: float
    mean_active: float  # experts with non-zero weight, averaged over documents


@dataclass
class TuneResult:
    variant: str
    beta: float
    tau: float
    perplexity: float
    grid: list[GridPoint] = field(default_factory=list)
    # per variant, its best grid point: {"perplexity", "beta", "tau"}
    best_by_variant: dict[str, dict[str, float]] = field(default_factory=dict)
    # per-document (nll, tokens) under the chosen routing, for the report
    nll: np.ndarray | None = None
    count: np.ndarray | None = None


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


def tune(model, tokenizer, mixer: AdapterMixer, texts: Sequence[str], sims: np.ndarray, *,
         betas: Sequence[float], taus: Sequence[float], variants: Sequence[str],
         max_active: int, query_tokens: int, max_tokens: int, batch_size: int = 8,
         decimals: int = 4) -> TuneResult:
    """Grid search; `sims` are (n, K) similarities of each text's prefix to the centroids.

    The mixer's adapters must be the K experts in id order (extra adapters after them are
    given weight 0).
    """
    n, k = sims.shape
    if n != len(texts):
        raise ValueError(f"{n} similarity rows for {len(texts)} texts")
    if n == 0:
        raise ValueError("tuning needs at least one holdout document")
    cache: dict[tuple[int, tuple], tuple[float, int]] = {}
    points = list(itertools.product(variants, betas, taus))
    grid: list[GridPoint] = []
    per_doc: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for variant, beta, tau in tqdm(points, desc="tune beta/tau", unit="point"):
        params = RoutingParams(beta=beta, tau=tau, variant=Variant(variant),
                               max_active=max_active)
        w = routing_weights(sims, params)
        keys = [tuple(np.round(row, decimals).tolist()) for row in w]
        todo = [i for i in range(n) if (i, keys[i]) not in cache]
        if todo:
            full = np.zeros((len(todo), mixer.n))
            full[:, :k] = w[todo]
            nll, cnt = suffix_nll(model, tokenizer, [texts[i] for i in todo], query_tokens,
                                  max_tokens=max_tokens, batch_size=batch_size, mixer=mixer,
                                  weights=full)
            for j, i in enumerate(todo):
                cache[(i, keys[i])] = (float(nll[j]), int(cnt[j]))
        nll = np.array([cache[(i, keys[i])][0] for i in range(n)])
        cnt = np.array([cache[(i, keys[i])][1] for i in range(n)])
        per_doc[(variant, beta, tau)] = (nll, cnt)
        grid.append(GridPoint(variant, float(beta), float(tau), perplexity(nll, cnt),
                              float((w > 0).sum(1).mean())))
    best = min(range(len(grid)), key=lambda i: (grid[i].perplexity, i))
    g = grid[best]
    by_variant = {}
    for v in variants:
        p = min((p for p in grid if p.variant == v), key=lambda p: p.perplexity)
        by_variant[v] = {"perplexity": p.perplexity, "beta": p.beta, "tau": p.tau}
    nll, cnt = per_doc[(g.variant, g.beta, g.tau)]
    return TuneResult(g.variant, g.beta, g.tau, g.perplexity, grid, by_variant, nll, cnt)
