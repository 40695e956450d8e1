"""Stage 3: bisecting k-means into K clusters, and a per-cluster holdout split.

The paper splits the cluster with the largest diameter (Jain, 2010). scikit-learn's
`BisectingKMeans` offers "biggest_inertia" (largest within-cluster sum of squares) and
"largest_cluster" (most points); inertia measures spread, so it is the default stand-in for
diameter, and the other is an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
