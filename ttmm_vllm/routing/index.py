"""The centroid index: hnswlib over the unit-norm centroids, inner-product space.

Built from the library's centroid table when a server starts, and changed in place by the
admin RPCs (an id-indexed table, so an expert's row is its id).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np


def build_index(centroids: np.ndarray, labels: Iterable[int] | None = None, *, ef: int = 200,
                m: int = 16):
    """An hnswlib inner-product index over unit-norm centroids (label = expert id)."""
    import hnswlib

    centroids = np.asarray(centroids, dtype=np.float32)
    n, d = centroids.shape
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=max(n, 1), ef_construction=ef, M=m, allow_replace_deleted=True)
    ids = np.arange(n) if labels is None else np.asarray(list(labels))
    index.add_items(centroids, ids)
    index.set_ef(max(ef, n))
    return index




class CentroidIndex:
    """hnswlib over the unit-norm centroids, inner-product space (label = expert id).

    Why a top-M search is sound: an expert outside the M most similar has similarity
    s_j <= s_M, so its softmax weight relative to the best is at most exp((s_M - s_1)/beta).
    The sparse-softmax prunes every expert below tau, and with a small beta (sharp routing,
    the regime where many experts exist) that bound falls below tau well before M; the experts
    the search leaves out are the ones the exact computation gives zero weight anyway. The
    only effect is on the normaliser, which the left-out mass (at most (K - M) times that
    bound) perturbs. With M >= K every expert is a candidate and the result is exact; small
    libraries use that.
    """

    def __init__(self, centroids: np.ndarray, ids: Sequence[int] | None = None, *,
                 hnsw_index=None, ef: int = 200):
        """centroids: the table indexed by expert id (row i is expert i's centroid);
        ids: the experts that are alive (default: every row)."""
        self.centroids = np.asarray(centroids, dtype=np.float32)
        all_ids = np.arange(len(self.centroids)) if ids is None else np.asarray(ids)
        self._alive = {int(i) for i in all_ids}
        self._lock = threading.Lock()
        if hnsw_index is None:
            hnsw_index = build_index(self.centroids[all_ids], labels=all_ids, ef=ef)
        self.index = hnsw_index
        self.index.set_ef(max(ef, len(self._alive)))

    @property
    def size(self) -> int:
        return len(self._alive)

    @property
    def ids(self) -> list[int]:
        return sorted(self._alive)

    def search(self, queries: np.ndarray, m: int = 0,
               allowed: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-m (0: all) expert ids and inner products for each query row; (n, m) arrays.

        `allowed` filters inside the search (hnswlib's filter), so a client limited to a few
        experts still gets its nearest ones among those.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        with self._lock:
            n_alive = len(self._alive) if allowed is None else sum(
                1 for i in self._alive if allowed(i))
            k = n_alive if m <= 0 else min(m, n_alive)
            if k == 0:
                return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0))
            labels, dist = self.index.knn_query(queries, k=k, filter=allowed)
        # hnswlib's ip distance is 1 - <q, c>
        return labels.astype(np.int64), (1.0 - dist).astype(np.float64)

    def add(self, expert_id: int, centroid: np.ndarray) -> None:
        with self._lock:
            if expert_id in self._alive:
                raise ValueError(f"expert {expert_id} is already in the index")
            if expert_id >= len(self.centroids):  # grow the id-indexed table (copy: readers
                table = np.zeros((expert_id + 1, self.centroids.shape[1]), np.float32)
                table[: len(self.centroids)] = self.centroids  # keep the old one intact)
                self.centroids = table
            else:
                self.centroids = self.centroids.copy()
            self.centroids[expert_id] = centroid
            if self.index.get_current_count() >= self.index.get_max_elements():
                self.index.resize_index(self.index.get_max_elements() * 2 + 1)
            try:
                self.index.unmark_deleted(expert_id)
                self.index.add_items(np.asarray(centroid, np.float32)[None], [expert_id],
                                     replace_deleted=False)
            except RuntimeError:
                self.index.add_items(np.asarray(centroid, np.float32)[None], [expert_id])
            self._alive.add(expert_id)
            self.index.set_ef(max(self.index.ef, len(self._alive)))

    def remove(self, expert_id: int) -> None:
        with self._lock:
            if expert_id not in self._alive:
                raise KeyError(f"expert {expert_id} is not in the index")
            self.index.mark_deleted(expert_id)
            self._alive.discard(expert_id)


    def __contains__(self, expert_id: int) -> bool:
        return expert_id in self._alive
