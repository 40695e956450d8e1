"""The build's quality table, measured on test documents: holdout documents never tuned on.

Rows, each a per-document (suffix NLL, token count) pair so any two rows can be compared on the
same documents:

- base: the base model alone;
- multitask: one adapter trained on every expert's documents (equal token budget);
- multitask, compute-matched (2 epochs): the same adapter trained for as many tokens as a
  branched library used in all (multitask pass + experts' pass; training/multitask.py), when
  the build trained it;
- for each expert set (`plain`: experts trained from the base, the paper; `branched`: trained
  from the folded multitask model): TTMM with 1, 3, 10 active experts (each count with the
  beta/tau that tuned best for it on the tuning documents), uniform weights over the top 3,
  and each document's own cluster expert (routing that always finds the right expert);
- the expert x cluster matrix behind the heat map (the paper's Figure 6, left): every expert
  alone on every test document, perplexity per (expert, cluster).

Uncertainty: a 95% percentile bootstrap over documents (the same resampled documents for every
row), and paired intervals for differences (both rows recomputed on each resample, so document
difficulty, most of the spread, cancels).

The claims the report states plainly (`claims`), each a paired interval: does the served TTMM
beat compute-matched fine-tuning (the compute-matched adapter for a branched set, the
equal-data multitask adapter for a plain one: its experts make one pass over the same
documents), and does merging (TTMM with the most experts) beat the single best expert (TTMM 1)
and the document's own cluster expert, on the served set.

In the build this is stage 8 (`evaluate_test_documents`, cached as `evaluate.json`): it runs
after tuning, on the test documents only, so the table says how the tuned library does on
documents nothing was chosen with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.clusters import Clustering, Split
from training.context import BuildContext, digest
from training.documents import Corpus
from training.evaluate import ScoreCache, perplexity
from training.expert_sets import BRANCHED, PLAIN, ExpertSets
from training.multitask import matched_epochs
from training.routing import RoutingEmbedding
from training.tune import SetChoice, best_point, routing_weights
from ttmm_vllm.library import atomic_write_json, read_adapter
from ttmm_vllm.routing.router import Mode, RoutingParams, Variant

RESAMPLES = 2000
LEVEL = 0.95
UNIFORM_TOP = 3

Scores = tuple[np.ndarray, np.ndarray]  # per document: summed suffix NLL, scored tokens
MULTITASK = "multitask"


def matched_row(epochs: int) -> str:
    """The compute-matched adapter's row, for experts trained for `epochs`."""
    return f"multitask, compute-matched ({matched_epochs(epochs)} epochs)"


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


# --------------------------------------------------------------------------- the stage


def evaluate_test_documents(ctx: BuildContext, corpus: Corpus, clustering: Clustering,
                            split: Split, experts: ExpertSets, routing: RoutingEmbedding,
                            tuning: dict[str, dict[str, Any]], choice: SetChoice
                            ) -> dict[str, Any] | None:
    """Stage 8: the quality table on the test documents (cached); None without tuning (the
    rows use each set's tuned grid) or without test documents."""
    cfg = ctx.cfg
    if not tuning or not len(split.test):
        return None
    sims = routing.sims(split.test)
    key = {"sets": {n: [e.sha256 for e in s.experts] + [s.fingerprint]
                    for n, s in experts.sets.items()},
           "multitask": experts.multitask.sha256 if experts.multitask else None,
           "matched": experts.matched.sha256 if experts.matched else None,
           "tuning": {n: t["grid"] for n, t in tuning.items()}, "chosen": choice.name,
           "test": digest(split.test.tolist()), "queries": digest(sims.round(6).tolist()),
           "active_counts": list(cfg.tuned_active_counts),
           **cfg.subset("heatmap", "query_tokens", "max_tokens")}
    path = ctx.work / "evaluate.json"
    ctx.stage("evaluate", key, [path], lambda: atomic_write_json(
        path, score_test_documents(ctx, corpus, clustering, split.test, experts, tuning,
                                   sims, choice.name)))
    return json.loads(path.read_text())


def score_test_documents(ctx: BuildContext, corpus: Corpus, clustering: Clustering,
                         test_ids: np.ndarray, experts: ExpertSets,
                         tuning: dict[str, dict[str, Any]], sims: np.ndarray, chosen: str
                         ) -> dict[str, Any]:
    """Every row of the table scored on the test documents, summarised with the paired
    differences the report's verdicts are about."""
    from training.evaluate import AdapterMixer

    cfg = ctx.cfg
    docs = corpus.docs
    texts = [docs[i]["text"] for i in test_ids]
    labels = clustering.labels[test_ids]
    kw = dict(max_tokens=cfg.max_tokens, batch_size=cfg.eval_batch_size)
    model, tokenizer = ctx.model(ctx.base)
    rows = {}
    matched = matched_row(cfg.epochs)
    baselines = {n: r for n, r in ((MULTITASK, experts.multitask), (matched, experts.matched))
                 if r is not None}  # adapters of the base, each scored alone
    mixer = None
    if baselines:
        mixer = AdapterMixer(model, [read_adapter(r.out_dir) for r in baselines.values()])
    try:
        cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer, **kw)
        rows["base"] = cache.score(None)
        for j, name in enumerate(baselines):
            rows[name] = cache.score(_one_hot(np.full(len(texts), j), len(baselines)))
    finally:
        if mixer is not None:
            mixer.remove()
    details = {}
    for name, s in experts.sets.items():
        model, tokenizer = ctx.model(s.model_dir)
        mixer = AdapterMixer(model, [read_adapter(e.out_dir, e.expert_id)
                                     for e in s.experts])
        try:
            cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer, **kw)
            r, details[name] = set_rows(name, cache, tuning[name]["grid"], sims, labels,
                                        cfg.tuned_active_counts, heatmap=cfg.heatmap)
        finally:
            mixer.remove()
        rows.update(r)
    top = max(cfg.tuned_active_counts)
    tuned = tuning[chosen]["max_active"]
    served = f"{chosen} TTMM {tuned}"
    claims = served_claims(chosen, served, top, matched if chosen == BRANCHED else MULTITASK,
                           rows)
    pairs = []
    for name in experts.sets:
        pairs += [(f"{name} TTMM {top}", MULTITASK), (f"{name} TTMM {top}", "base")]
    if BRANCHED in experts.sets:
        pairs.append((f"{BRANCHED} TTMM {top}", matched))
    if len(experts.sets) == 2:
        pairs += [(f"{BRANCHED} TTMM {top}", f"{PLAIN} TTMM {top}"),
                  (f"{BRANCHED} own expert", f"{PLAIN} own expert")]
    pairs += [(served, MULTITASK), (served, matched)]
    pairs += [(c["a"], c["b"]) for c in claims.values() if c["b"]]
    out = summarise(rows, labels, cfg.k, list(dict.fromkeys(pairs)), seed=cfg.seed)
    out["test_documents"] = corpus.ids(test_ids)
    out["labels"] = labels.tolist()
    out["sets"] = details
    out["chosen"] = chosen
    out["served_row"] = served
    out["claims"] = claims
    return out


def served_claims(chosen: str, served: str, top: int, baseline: str,
                  rows: Mapping[str, Scores]) -> dict[str, dict[str, Any]]:
    """The three questions the report answers, as (a, b) rows of a paired difference (b None
    when the table lacks it): the served TTMM against compute-matched fine-tuning (`baseline`:
    the compute-matched adapter for a branched set, the multitask adapter for a plain one),
    and merging (TTMM `top`) against the single best expert (TTMM 1) and the own expert."""
    merge = f"{chosen} TTMM {top}"
    if chosen == BRANCHED:
        note = ("as many training tokens as the branched library: its multitask pass plus its "
                "experts' pass")
    else:
        note = ("the equal-data multitask adapter, compute-matched for a plain library (its "
                "experts make one pass over the same documents)")
    single = f"{chosen} TTMM 1"
    return {
        "finetuning": {"a": served, "b": baseline if baseline in rows else None,
                       "baseline": baseline, "note": note},
        "single": {"a": merge, "b": single if single in rows and top != 1 else None},
        "own": {"a": merge, "b": f"{chosen} own expert"},
    }
