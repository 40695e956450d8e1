"""Stage 6: does routing find the right experts? pass@k on the holdout, and the choice of
embedding.

A holdout document belongs to a cluster; its expert is the one trained nearest to it. Routing
sees only the document's prefix (the first `query_tokens` tokens), embeds it, and ranks the
centroids by cosine similarity. pass@k is the share of documents whose own cluster is among
the top k (the paper's Figure 6, right). If pass@10 is low, no temperature can help: the
experts that would help are not among the candidates.

Two embeddings are on offer (`ttmm_vllm.routing.embed`): a sentence-transformers model, and the base
model's own mean-pooled last hidden states (the paper's pointer to Lu et al., 2024). Which
routes better depends on the corpus (prose vs code), so a build measures both on its tuning
documents and keeps the better (`choose_embedding`). `choose_routing` is that stage of the
build: its result, a `RoutingEmbedding`, is what the library routes with (not to be confused
with one request's routing decision, `ttmm_vllm.routing.router.Routing`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.centroids import centroids
from training.clusters import Clustering, Split
from training.context import BuildContext
from training.documents import Corpus
from training.embeddings import Embeddings, holdout_queries, member_embeddings
from ttmm_vllm.library import EmbedderRef

log = logging.getLogger(__name__)

PASS_AT = (1, 3, 10)


@dataclass(frozen=True)
class RoutingEmbedding:
    """The routing embedding a build keeps: the embedder (as the manifest names it), the
    centroids in its space, every holdout document's prefix embedded as a query, and what
    was measured to choose it (`report`, the report's routing section)."""

    ref: EmbedderRef
    centroids: np.ndarray  # (K, d) unit rows
    queries: np.ndarray  # (n_holdout, d): each holdout document's prefix, holdout order
    holdout: np.ndarray  # document indices of the holdout, in that order
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sims(self, doc_ids: Sequence[int]) -> np.ndarray:
        """(n, K) cosine similarity of the documents' prefixes to the centroids."""
        pos = {int(d): j for j, d in enumerate(self.holdout)}
        rows = [pos[int(i)] for i in doc_ids]
        return self.queries[rows] @ self.centroids.T if rows else \
            np.zeros((0, len(self.centroids)))

    def top_similarity(self) -> np.ndarray:
        """(n_holdout,) each holdout prefix's similarity to its nearest centroid (the
        out-of-reach threshold is a percentile of these)."""
        if not len(self.queries):
            return np.zeros(0)
        return (self.queries @ self.centroids.T).max(1)


def own_rank(sims: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) 0-based position of each row's own cluster when its centroids are sorted by
    similarity, most similar first (ties in the router's order: stable, lower id first)."""
    sims = np.asarray(sims)
    labels = np.asarray(labels, dtype=np.int64)
    if sims.ndim != 2 or len(sims) != len(labels):
        raise ValueError(f"sims {sims.shape} and labels {labels.shape} do not match")
    order = np.argsort(-sims, axis=1, kind="stable")  # (n, K) cluster ids, best first
    return np.argmax(order == labels[:, None], axis=1)


def pass_at_k(sims: np.ndarray, labels: np.ndarray, ks: Sequence[int] = PASS_AT
              ) -> dict[int, float]:
    """{k: share of rows whose own cluster is among their k most similar centroids}."""
    rank = own_rank(sims, labels)
    if rank.size == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(np.mean(rank < k)) for k in ks}


def pass_curve(sims: np.ndarray, labels: np.ndarray) -> list[float]:
    """pass@k for k = 1..K (for the plot)."""
    rank = own_rank(sims, labels)
    k = np.asarray(sims).shape[1]
    return [float(np.mean(rank < i)) for i in range(1, k + 1)] if rank.size else []


def choose_embedding(pass1: Mapping[str, float], order: Sequence[str]) -> str:
    """The kind with the highest pass@1; a tie keeps the earlier kind in `order`."""
    if not pass1:
        raise ValueError("no routing embedding was measured")
    ranked = [k for k in order if k in pass1]
    return max(ranked, key=lambda k: (pass1[k], -ranked.index(k)))


# --------------------------------------------------------------------------- the stage


def embedder_ref(ctx: BuildContext, kind: str, dim: int) -> EmbedderRef:
    """How the manifest names the `kind` embedder (serving loads it from `path`)."""
    path = ctx.embedder_path(kind)
    name = f"base-hidden:{path.name}" if kind == "base-hidden" else path.name
    return EmbedderRef(name=name, dim=int(dim), kind=kind, path=str(path))


def choose_routing(ctx: BuildContext, corpus: Corpus, embeddings: Embeddings,
                   clustering: Clustering, split: Split) -> RoutingEmbedding:
    """Stage 6: centroids and holdout queries for each candidate embedding; pass@k on the
    tuning and test documents; the candidate with the best pass@1 on the tuning documents is
    kept. The clustering embedding is reused; another kind embeds the experts' training
    documents and the holdout prefixes in cached stages (training/embeddings.py)."""
    cfg = ctx.cfg
    holdout = np.flatnonzero(clustering.holdout)
    candidates: dict[str, RoutingEmbedding] = {}
    measured: dict[str, Any] = {}
    for kind in cfg.routing_candidates:
        if kind == embeddings.kind:
            doc_emb = embeddings.vectors
        else:
            doc_emb = member_embeddings(ctx, kind, corpus, split.members)
        cents = centroids(doc_emb, split.members)
        r = RoutingEmbedding(embedder_ref(ctx, kind, cents.shape[1]), cents,
                             holdout_queries(ctx, kind, corpus, holdout), holdout)
        candidates[kind] = r
        m: dict[str, Any] = {"name": r.ref.name, "dim": r.ref.dim}
        for name, ids in (("tune", split.tune), ("test", split.test)):
            if len(ids):
                labels = clustering.labels[ids]
                acc = pass_at_k(r.sims(ids), labels, PASS_AT)
                m[f"pass_{name}"] = {str(k): v for k, v in acc.items()}
                m[f"curve_{name}"] = pass_curve(r.sims(ids), labels)
        measured[kind] = m
        log.info("routing by %s: pass@1/3/10 on the tuning documents %s", kind,
                 m.get("pass_tune"))
    kinds = list(cfg.routing_candidates)
    if len(split.tune):
        chosen = choose_embedding({k: measured[k]["pass_tune"]["1"] for k in kinds}, kinds)
    else:
        chosen = kinds[0]
    report = {"requested": cfg.embedder_kind, "chosen": chosen,
              "rule": "highest pass@1 on the tuning documents (a tie keeps the first of "
                      + ", ".join(kinds) + ")",
              "by_kind": measured,
              "documents": {"tune": corpus.ids(split.tune), "test": corpus.ids(split.test)}}
    return dataclasses.replace(candidates[chosen], report=report)
