"""The build's quality table, measured on test documents: holdout documents never tuned on.

Rows, each a per-document (suffix NLL, token count) pair so any two rows can be compared on the
same documents:

- base: the base model alone;
- multitask: one adapter trained on every expert's documents (equal token budget);
- for each expert set (`plain`: experts trained from the base, the paper; `branched`: trained
  from the folded multitask model): TTMM with 1, 3, 10 active experts (each count with the
  beta/tau that tuned best for it on the tuning documents), uniform weights over the top 3,
  and each document's own cluster expert (routing that always finds the right expert);
- the expert x cluster matrix behind the heat map (the paper's Figure 6, left): every expert
  alone on every test document, perplexity per (expert, cluster).

Uncertainty: a 95% percentile bootstrap over documents (the same resampled documents for every
row), and paired intervals for differences (both rows recomputed on each resample, so document
difficulty, most of the spread, cancels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.evaluate import ScoreCache, perplexity
from training.tune import best_point, routing_weights
from ttmm_vllm.routing.router import Mode, RoutingParams, Variant

RESAMPLES = 2000
LEVEL = 0.95
UNIFORM_TOP = 3

Scores = tuple[np.ndarray, np.ndarray]  # per document: summed suffix NLL, scored tokens


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) document indices drawn with replacement, shared by every row."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _resampled(s: Scores, idx: np.ndarray) -> np.ndarray:
    nll, tokens = s
    return np.exp(nll[idx].sum(1) / np.maximum(tokens[idx].sum(1), 1))


def interval(s: Scores, idx: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the perplexity over resampled documents."""
    q = (1 - level) / 2
    lo, hi = np.quantile(_resampled(s, idx), [q, 1 - q])
    return float(lo), float(hi)


def paired(a: Scores, b: Scores, idx: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """perplexity(a) - perplexity(b) with its paired interval (negative: a is better)."""
    d = _resampled(a, idx) - _resampled(b, idx)
    q = (1 - level) / 2
    lo, hi = np.quantile(d, [q, 1 - q])
    return {"difference": perplexity(*a) - perplexity(*b), "lo": float(lo), "hi": float(hi),
            "p_a_better": float(np.mean(d < 0))}


def expert_by_cluster(single_nll: np.ndarray, tokens: np.ndarray, labels: np.ndarray,
                      k: int) -> np.ndarray:
    """(K experts, K clusters) perplexity of each expert alone on each cluster's documents
    (NaN for a cluster without test documents). single_nll: (n_docs, K)."""
    out = np.full((k, k), np.nan)
    for c in range(k):
        sel = labels == c
        if sel.any():
            for e in range(k):
                out[e, c] = perplexity(single_nll[sel, e], tokens[sel])
    return out


def _one_hot(cols: np.ndarray, width: int) -> np.ndarray:
    w = np.zeros((len(cols), width))
    w[np.arange(len(cols)), cols] = 1.0
    return w


def _padded(w: np.ndarray, width: int) -> np.ndarray:
    full = np.zeros((w.shape[0], width))
    full[:, :w.shape[1]] = w
    return full


def set_rows(name: str, cache: ScoreCache, grid: Sequence[Mapping[str, Any]], sims: np.ndarray,
             labels: np.ndarray, counts: Sequence[int], *, heatmap: bool
             ) -> tuple[dict[str, Scores], dict[str, Any]]:
    """One expert set's rows on the test documents, and its heat map / routing details.

    `cache` scores the test documents on the set's model, its mixer holding the K experts in
    id order first; `grid` is the set's tuning grid (dicts of GridPoint fields).
    """
    from training.tune import GridPoint

    n, k = sims.shape
    width = cache.mixer.n
    points = [GridPoint(**p) for p in grid]
    rows: dict[str, Scores] = {}
    extra: dict[str, Any] = {}
    if heatmap:
        singles = np.zeros((n, k))
        tokens = np.zeros(n, dtype=np.int64)
        for e in tqdm(range(k), desc=f"{name}: each expert alone", unit="expert"):
            singles[:, e], tokens = cache.score(_one_hot(np.full(n, e), width))
        extra["heatmap"] = expert_by_cluster(singles, tokens, labels, k).tolist()
    rows[f"{name} own expert"] = cache.score(_one_hot(labels, width))
    extra["ttmm"] = {}
    for c in counts:
        p = best_point(points, max_active=c)
        params = RoutingParams(beta=p.beta, tau=p.tau, variant=Variant(p.variant),
                               max_active=c)
        rows[f"{name} TTMM {c}"] = cache.score(_padded(routing_weights(sims, params), width))
        extra["ttmm"][str(c)] = {"variant": p.variant, "beta": p.beta, "tau": p.tau}
    uniform = RoutingParams(mode=Mode.UNIFORM, max_active=min(UNIFORM_TOP, k))
    rows[f"{name} uniform top-{min(UNIFORM_TOP, k)}"] = cache.score(
        _padded(routing_weights(sims, uniform), width))
    return rows, extra


def summarise(rows: Mapping[str, Scores], labels: np.ndarray, k: int,
              pairs: Sequence[tuple[str, str]], seed: int = 0) -> dict[str, Any]:
    """Perplexity and 95% interval per row, the paired differences, and a per-cluster table."""
    n = len(labels)
    idx = bootstrap_indices(n, seed=seed)
    table = {}
    for name, s in rows.items():
        lo, hi = interval(s, idx)
        table[name] = {"perplexity": perplexity(*s), "lo": lo, "hi": hi}
    diffs = [{"a": a, "b": b, **paired(rows[a], rows[b], idx)} for a, b in pairs
             if a in rows and b in rows]
    per_cluster = []
    for c in range(k):
        sel = labels == c
        per_cluster.append({"cluster": c, "documents": int(sel.sum()),
                            **{name: perplexity(nll[sel], cnt[sel]) if sel.any() else None
                               for name, (nll, cnt) in rows.items()}})
    return {"documents": n, "resamples": RESAMPLES, "level": LEVEL, "rows": table,
            "pairs": diffs, "per_cluster": per_cluster,
            "per_document": {name: {"nll": nll.tolist(), "tokens": cnt.tolist()}
                             for name, (nll, cnt) in rows.items()}}
