"""Routing decisions: from a prompt embedding to merge weights over experts (the paper's
Algorithm 2, step 1): the library's defaults, a request's overrides, the modes (ttmm, base,
top1, uniform), and the Router that searches the index and applies them. Nothing here knows
gRPC, vLLM or files.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ttmm_vllm.routing.index import CentroidIndex
from ttmm_vllm.routing.weights import Variant, entropy, sparse_softmax


class Mode(enum.StrEnum):
    TTMM = "ttmm"  # sparse-softmax over centroid similarities (default)
    BASE = "base"  # no adapter
    TOP1 = "top1"  # nearest expert, weight 1
    UNIFORM = "uniform"  # the nearest max_active experts, equal weights (paper Figure 5)


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class RoutingParams:
    """Everything that decides a routing; the library gives defaults, a request overrides."""

    mode: Mode = Mode.TTMM
    beta: float = 0.05
    tau: float = 0.01
    max_active: int = 10
    variant: Variant = Variant.PAPER
    top_m: int = 0  # candidates searched in the index (0: every expert, exact)
    experts: tuple[int, ...] = ()  # explicit expert ids (skip the search)
    expert_weights: tuple[float, ...] = ()  # explicit weights for `experts`
    ood_threshold: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not (math.isfinite(self.tau) and 0 <= self.tau < 1):
            raise ValueError(f"tau must be in [0, 1), got {self.tau}")
        if self.max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {self.max_active}")
        if self.top_m < 0:
            raise ValueError(f"top_m must be >= 0, got {self.top_m}")
        if self.expert_weights:
            if len(self.expert_weights) != len(self.experts):
                raise ValueError(
                    f"expert_weights has {len(self.expert_weights)} values for "
                    f"{len(self.experts)} experts"
                )
            ws = np.asarray(self.expert_weights, dtype=np.float64)
            if not np.all(np.isfinite(ws)) or np.any(ws < 0) or ws.sum() <= 0:
                raise ValueError("expert_weights must be finite, >= 0 and not all zero")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("experts lists an expert twice")

    def with_overrides(self, **kw) -> RoutingParams:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass(frozen=True)
class Routing:
    """One request's routing: which experts, with what weights (sum 1), and why."""

    mode: Mode
    expert_ids: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    similarities: tuple[float, ...] = ()
    top_similarity: float = float("nan")
    out_of_reach: bool = False

    @property
    def is_base(self) -> bool:
        return not self.expert_ids

    @property
    def entropy(self) -> float:
        return entropy(self.weights)

    def key(self, decimals: int = 6) -> tuple[tuple[int, float], ...]:
        """Requests whose routing is equal after rounding share one merged adapter."""
        pairs = sorted(zip(self.expert_ids, self.weights, strict=True))
        return tuple((i, round(float(w), decimals)) for i, w in pairs)

    def canonical(self, decimals: int = 6) -> Routing:
        """The routing with weights rounded as in `key` and renormalised: what is served, so
        every request sharing an adapter gets exactly the same weights. An expert whose
        weight rounds to 0 is dropped (it would be merged, shown and keyed for nothing)."""
        if self.is_base:
            return self
        pairs = [(i, w) for i, w in self.key(decimals) if w > 0]  # 0 after rounding: dropped
        if not pairs:  # every weight rounded to 0 (decimals too few): keep the largest
            pairs = [max(zip(self.expert_ids, self.weights, strict=True), key=lambda p: p[1])]
        ws = np.asarray([w for _, w in pairs], dtype=np.float64)
        ws = ws / ws.sum()
        sims = dict(zip(self.expert_ids, self.similarities, strict=False))
        ids = tuple(i for i, _ in pairs)
        return replace(
            self,
            expert_ids=ids,
            weights=tuple(float(w) for w in ws),
            similarities=tuple(float(sims.get(i, float("nan"))) for i in ids),
        )


def decide(ids: np.ndarray, sims: np.ndarray, p: RoutingParams) -> Routing:
    """Weights from candidate experts and their cosine similarities to the query.

    `ids`/`sims` are the candidates (all experts, or the index's top M), any order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float64)
    order = np.argsort(-sims, kind="stable")
    ids, sims = ids[order], sims[order]
    top = float(sims[0]) if sims.size else float("nan")
    ood = p.ood_threshold is not None and sims.size > 0 and top < p.ood_threshold
    if p.mode == Mode.BASE or ids.size == 0:
        return Routing(Mode.BASE, top_similarity=top, out_of_reach=ood)
    if p.expert_weights:  # explicit ids with explicit weights: as given, normalised
        w = np.asarray(p.expert_weights, dtype=np.float64)
        by_id = dict(zip(ids.tolist(), sims.tolist(), strict=True))
        keep = w > 0
        sel = np.asarray(p.experts, dtype=np.int64)[keep]
        w = w[keep] / w[keep].sum()
        return Routing(Mode.TTMM, tuple(int(i) for i in sel), tuple(float(x) for x in w),
                       tuple(float(by_id.get(int(i), float("nan"))) for i in sel), top, ood)
    if p.mode == Mode.TOP1:
        w = np.array([1.0])
        ids, sims = ids[:1], sims[:1]
    elif p.mode == Mode.UNIFORM:
        ids, sims = ids[: p.max_active], sims[: p.max_active]
        w = np.full(ids.size, 1.0 / ids.size)
    else:
        # explicit experts without weights: softmax over them, no pruning (the caller chose)
        tau = 0.0 if p.experts else p.tau
        w = sparse_softmax(sims / p.beta, tau, p.variant)
        keep = np.flatnonzero(w > 0)[: p.max_active]  # sorted by similarity = by weight
        ids, sims, w = ids[keep], sims[keep], w[keep] / w[keep].sum()
    return Routing(Mode(p.mode), tuple(int(i) for i in ids), tuple(float(x) for x in w),
                   tuple(float(s) for s in sims), top, ood)


class Router:
    """Query embedding -> Routing, with the library's defaults and per-request overrides."""

    def __init__(self, index: CentroidIndex, defaults: RoutingParams):
        self.index = index
        self.defaults = defaults

    def route(self, query: np.ndarray, params: RoutingParams | None = None,
              allowed: Callable[[int], bool] | None = None) -> Routing:
        return self.route_batch(np.atleast_2d(query), [params or self.defaults], allowed)[0]

    def route_batch(self, queries: np.ndarray, params: Sequence[RoutingParams],
                    allowed: Callable[[int], bool] | None = None) -> list[Routing]:
        """One index search for a batch of queries (they share the largest M asked for)."""
        queries = np.atleast_2d(queries)
        searched = [p for p in params if not p.experts and p.mode != Mode.BASE]
        labels = sims = None
        if searched:
            m = 0 if any(p.top_m == 0 for p in searched) else max(p.top_m for p in searched)
            m = 0 if m == 0 else max(m, max(p.max_active for p in searched))
            labels, sims = self.index.search(queries, m, allowed)
        out = []
        for i, p in enumerate(params):
            if p.experts:
                unknown = [e for e in p.experts if e not in self.index]
                if unknown:
                    raise KeyError(f"unknown expert ids {unknown}")
                ids = np.asarray(p.experts, dtype=np.int64)
                cand_sims = self.index.centroids[ids] @ queries[i].astype(np.float32)
                out.append(decide(ids, cand_sims, p))
            elif p.mode == Mode.BASE:
                out.append(Routing(Mode.BASE))
            else:
                ids, s = labels[i], sims[i]
                if p.top_m and p.top_m < ids.size:
                    ids, s = ids[: p.top_m], s[: p.top_m]
                out.append(decide(ids, s, p))
        return out


def brute_force(query: np.ndarray, centroids: np.ndarray, p: RoutingParams) -> Routing:
    """The exact computation over all experts: the reference for the index path."""
    sims = np.asarray(centroids, np.float64) @ np.asarray(query, np.float64)
    return decide(np.arange(len(centroids)), sims, p)
