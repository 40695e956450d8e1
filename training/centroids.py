"""Stage 6 (routing): one centroid per expert, the re-normalised mean embedding of its training
documents.

Re-normalising matters (the paper, section 3): the mean of many unit vectors is shorter the
more spread they are, so without it a large, diverse cluster would lose every inner-product
comparison to a small, tight one. The mean is over the documents the expert actually trained
on, since the centroid stands for what that expert knows. The hnswlib index over the centroids
is built by `ttmm_vllm.library.write_library`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ttmm_vllm.routing.weights import normalize_rows


def centroids(embeddings: np.ndarray, members: Sequence[np.ndarray]) -> np.ndarray:
    """(K, d) unit rows; members[k] are the row indices of expert k's training documents."""
    rows = []
    for k, ids in enumerate(members):
        if len(ids) == 0:
            raise ValueError(f"expert {k} has no training documents: no centroid")
        rows.append(np.asarray(embeddings, dtype=np.float64)[ids].mean(0))
    return normalize_rows(np.stack(rows))
