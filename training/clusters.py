"""Stage 3: bisecting k-means into K clusters, and a per-cluster holdout split.

The paper splits the cluster with the largest diameter (Jain, 2010). scikit-learn's
`BisectingKMeans` offers "biggest_inertia" (largest within-cluster sum of squares) and
"largest_cluster" (most points); inertia measures spread, so it is the default stand-in for
diameter, and the other is an option.

The stage (`cluster_corpus`) caches labels and holdout as `clusters.npz` in the work dir, keyed
by the embeddings and the clustering settings. `split_documents` then says which documents
each later stage uses: every expert's training documents (in training order, capped), the
tuning documents and the test documents (both from the holdout, disjoint).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from training.config import BuildConfig
from training.context import BuildContext
from training.embeddings import Embeddings
from ttmm_vllm.library import atomic_write_bytes

log = logging.getLogger(__name__)

CLUSTERS = "clusters.npz"  # in the work dir


@dataclass
class Clustering:
    labels: np.ndarray  # (n,) cluster id per document
    holdout: np.ndarray  # (n,) bool: kept out of training, used for tuning and evaluation

    @property
    def k(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def train_ids(self, cluster: int) -> np.ndarray:
        return np.flatnonzero((self.labels == cluster) & ~self.holdout)

    def holdout_ids(self, cluster: int) -> np.ndarray:
        return np.flatnonzero((self.labels == cluster) & self.holdout)

    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()


@dataclass(frozen=True)
class Split:
    """Which documents (row indices into the corpus) each later stage uses."""

    members: list[np.ndarray]  # per expert: its training documents, in training order
    tune: np.ndarray  # holdout documents tuning chooses with (sorted)
    test: np.ndarray  # further holdout documents, never tuned on: the report's table (sorted)

    def codes(self, clustering: Clustering) -> np.ndarray:
        """(n,) int8 per document: 0 trained on, 1 holdout, 2 training split beyond the cap
        (the library's split.npy)."""
        codes = np.where(clustering.holdout, 1, 2).astype(np.int8)
        for ids in self.members:
            codes[ids] = 0
        return codes


def bisecting_kmeans(embeddings: np.ndarray, k: int, *, seed: int = 0,
                     strategy: str = "biggest_inertia") -> np.ndarray:
    """Cluster labels (n,), renumbered by decreasing size so expert 0 is the largest cluster."""
    from sklearn.cluster import BisectingKMeans

    n = len(embeddings)
    if k > n:
        raise ValueError(f"K={k} clusters need at least {k} documents; the corpus has {n}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    km = BisectingKMeans(n_clusters=k, random_state=seed, bisecting_strategy=strategy,
                         n_init=1)
    labels = km.fit_predict(np.asarray(embeddings, dtype=np.float32))
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise ValueError(f"clustering left {int((sizes == 0).sum())} of K={k} clusters empty; "
                         "lower K or add documents")
    order = np.argsort(-sizes, kind="stable")  # old id of the new id i
    rename = np.empty(k, dtype=np.int64)
    rename[order] = np.arange(k)
    return rename[labels]


def holdout_split(labels: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """A fixed fraction of each cluster, at least one document when the cluster has >= 2.

    A cluster of one keeps its document for training: an expert needs data more than the
    holdout needs that cluster.
    """
    rng = np.random.default_rng(seed)
    holdout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2 or fraction <= 0:
            continue
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        holdout[rng.choice(members, size=n, replace=False)] = True
    return holdout


def cluster(embeddings: np.ndarray, k: int, holdout_fraction: float, *, seed: int = 0,
            strategy: str = "biggest_inertia") -> Clustering:
    labels = bisecting_kmeans(embeddings, k, seed=seed, strategy=strategy)
    return Clustering(labels, holdout_split(labels, holdout_fraction, seed=seed))


# --------------------------------------------------------------------------- the stage


def cluster_corpus(ctx: BuildContext, embeddings: Embeddings) -> Clustering:
    """Stage 3: K clusters of the clustering embedding and the holdout split (cached)."""
    cfg = ctx.cfg
    path = ctx.work / CLUSTERS

    def compute() -> None:
        c = cluster(embeddings.vectors, cfg.k, cfg.holdout_fraction, seed=cfg.seed,
                    strategy=cfg.bisecting_strategy)
        buf = io.BytesIO()
        np.savez(buf, labels=c.labels, holdout=c.holdout)
        atomic_write_bytes(path, buf.getvalue())
        log.info("cluster sizes: %s", c.sizes())

    ctx.stage("clusters", {"embeddings": embeddings.key,
                           **cfg.subset("k", "bisecting_strategy", "holdout_fraction", "seed")},
              [path], compute)
    with np.load(path) as z:
        return Clustering(z["labels"], z["holdout"])


def split_documents(cfg: BuildConfig, clustering: Clustering) -> Split:
    """Each expert's training documents (a seeded shuffle of its cluster's training split, cut
    to --max-docs-per-expert), then the tuning and the test documents: disjoint, each taken
    round-robin over the clusters from a seeded order of each cluster's holdout, so every
    cluster is represented as evenly as the holdout allows. Tuning takes the first
    --tune-docs, the test set the next --test-docs."""
    cap = cfg.max_docs_per_expert
    members = []
    for k in range(cfg.k):
        ids = clustering.train_ids(k)
        if len(ids) == 0:  # a cluster of one document, kept out of the holdout
            raise ValueError(f"cluster {k} has no training documents")
        ids = np.random.default_rng([cfg.seed, k]).permutation(ids)
        members.append(ids[:cap] if cap else ids)

    rng = np.random.default_rng(cfg.seed)
    pools = [list(rng.permutation(clustering.holdout_ids(k))) for k in range(cfg.k)]

    def take(n: int) -> np.ndarray:
        picked: list[int] = []
        while len(picked) < n and any(pools):
            for pool in pools:
                if pool and len(picked) < n:
                    picked.append(int(pool.pop(0)))
        return np.asarray(sorted(picked), dtype=np.int64)

    tune = take(cfg.tune_docs)
    return Split(members, tune, take(cfg.test_docs))
