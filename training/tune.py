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

In the build: `tune_sets` runs the grid for each trained expert set (a cached stage per set,
`tune-plain.json`, `tune-branched.json`), and `choose_set` picks the set the library serves.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.clusters import Split
from training.config import BuildConfig
from training.context import BuildContext, digest
from training.documents import Corpus
from training.evaluate import ScoreCache, perplexity
from training.expert_sets import BRANCHED, PLAIN, ExpertSet, ExpertSets
from training.routing import RoutingEmbedding
from ttmm_vllm.library import atomic_write_json, read_adapter
from ttmm_vllm.routing.router import RoutingParams, Variant, decide

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the stage


def tune_sets(ctx: BuildContext, corpus: Corpus, experts: ExpertSets,
              routing: RoutingEmbedding, split: Split) -> dict[str, dict[str, Any]]:
    """Stage 7: per expert set, the grid over variant x max_active x beta x tau on the tuning
    documents, by set name (each a cached stage); {} when --no-tune."""
    cfg = ctx.cfg
    if not cfg.tune:
        return {}
    if len(split.tune) == 0:
        raise ValueError("tuning needs holdout documents: raise --holdout-fraction or "
                         "pass --no-tune")
    sims = routing.sims(split.tune)
    texts = [corpus.docs[i]["text"] for i in split.tune]
    out = {}
    for name, s in experts.sets.items():
        key = {"experts": [e.sha256 for e in s.experts], "model": s.fingerprint,
               "eval": digest(split.tune.tolist()), "queries": digest(sims.round(6).tolist()),
               "active_counts": list(cfg.tuned_active_counts),
               **cfg.subset("betas", "taus", "variants", "query_tokens", "max_tokens")}
        path = ctx.work / f"tune-{name}.json"
        ctx.stage(f"tune-{name}", key, [path],
                  lambda s=s, path=path: atomic_write_json(path, tune_set(ctx, s, texts, sims)))
        out[name] = json.loads(path.read_text())
    return out


def tune_set(ctx: BuildContext, s: ExpertSet, texts: Sequence[str], sims: np.ndarray
             ) -> dict[str, Any]:
    """One set's grid on the tuning texts, as JSON (the best point, per variant, the grid)."""
    from training.evaluate import AdapterMixer

    cfg = ctx.cfg
    model, tokenizer = ctx.model(s.model_dir)
    mixer = AdapterMixer(model, [read_adapter(e.out_dir, e.expert_id) for e in s.experts])
    try:
        cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer,
                           max_tokens=cfg.max_tokens, batch_size=cfg.eval_batch_size)
        t = tune(cache, sims, betas=cfg.betas, taus=cfg.taus, variants=cfg.variants,
                 max_active=cfg.tuned_active_counts)
    finally:
        mixer.remove()
    bests = {round(b["perplexity"], 6) for b in t.best_by_variant.values()}
    return {"variant": t.variant, "beta": t.beta, "tau": t.tau, "max_active": t.max_active,
            "perplexity": t.perplexity, "best_by_variant": t.best_by_variant,
            "variant_tie": len(t.best_by_variant) > 1 and len(bests) == 1,
            "grid": [vars(p) for p in t.grid]}


@dataclass(frozen=True)
class SetChoice:
    """Which expert set the library serves, and why (the report's `branch` section)."""

    name: str  # plain or branched
    info: dict[str, Any]  # requested, mode, sets, chosen, rule (and tuned_perplexity)


def choose_set(cfg: BuildConfig, experts: ExpertSets,
               tuning: dict[str, dict[str, Any]]) -> SetChoice:
    """The set with the lower tuned perplexity on the tuning documents when both were
    trained (a tie keeps plain: nothing beyond the base to ship and serve); else the one."""
    names = list(experts.sets)
    info: dict[str, Any] = {"requested": cfg.branch_from_multitask, "mode": cfg.branch_mode,
                            "sets": names}
    if len(names) == 1:
        info.update(chosen=names[0], rule=f"--branch-from-multitask "
                    f"{cfg.branch_from_multitask} resolved to {cfg.branch_mode!r}: one "
                    "expert set trained")
        return SetChoice(names[0], info)
    ppl = {n: tuning[n]["perplexity"] for n in names}
    chosen = BRANCHED if ppl[BRANCHED] < ppl[PLAIN] else PLAIN
    info.update(chosen=chosen, tuned_perplexity=ppl,
                rule="lower tuned TTMM perplexity on the tuning documents (a tie keeps plain)")
    log.info("expert sets on the tuning documents: %s; serving %s", ppl, chosen)
    return SetChoice(chosen, info)
