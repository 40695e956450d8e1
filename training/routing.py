"""Does routing find the right experts? pass@k on the holdout, and the choice of embedding.

A holdout document belongs to a cluster; its expert is the one trained nearest to it. Routing
sees only the document's prefix (the first `query_tokens` tokens), embeds it, and ranks the
centroids by cosine similarity. pass@k is the share of documents whose own cluster is among
the top k (the paper's Figure 6, right). If pass@10 is low, no temperature can help: the
experts that would help are not among the candidates.

Two embeddings are on offer (`ttmm_vllm.routing.embed`): a sentence-transformers model, and the base
model's own mean-pooled last hidden states (the paper's pointer to Lu et al., 2024). Which
routes better depends on the corpus (prose vs code), so a build measures both on its tuning
documents and keeps the better (`choose_embedding`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PASS_AT = (1, 3, 10)


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
