"""The routing maths: w = sparse-softmax_tau(phi_k . phi* / beta) (the paper's section 3.1).

Pure functions on arrays; property tests beside them (tests/routing/test_weights.py).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np


class Variant(enum.StrEnum):
    # The paper's formula: ReLU(softmax(z) - tau), renormalised.
    PAPER = "paper"
    # The paper's public code: keep softmax(z) > tau, renormalise the unshifted weights.
    THRESHOLD = "threshold"


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def sparse_softmax(z: np.ndarray, tau: float, variant: str = Variant.PAPER) -> np.ndarray:
    """The paper's sparse-softmax over logits z.

    paper:     ReLU(softmax(z) - tau) / sum ReLU(softmax(z) - tau)
    threshold: softmax(z) * [softmax(z) > tau] / sum (same support, unshifted weights)

    At least one expert always survives: softmax's maximum is >= 1/K > tau when tau < 1/K;
    for a larger tau (allowed, but outside the paper's range) the arg-max is kept alone.
    """
    p = softmax(z)
    if tau <= 0:
        return p
    if variant == Variant.PAPER:
        w = np.maximum(p - tau, 0.0)
    elif variant == Variant.THRESHOLD:
        w = np.where(p > tau, p, 0.0)
    else:
        raise ValueError(f"unknown sparse-softmax variant {variant!r}")
    s = w.sum()
    if s <= 0:
        w = np.zeros_like(p)
        w[int(np.argmax(p))] = 1.0
        return w
    return w / s


def entropy(w: Sequence[float]) -> float:
    w = np.asarray(w, dtype=np.float64)
    w = w[w > 0]
    return float(-(w * np.log(w)).sum()) if w.size else 0.0


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows (float32): embeddings and centroids live on the unit sphere, where the
    inner product the index searches is the cosine similarity. A row too short to have a
    direction (norm <= 1e-12) becomes zeros, never a vector of some arbitrary small length."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 1e-12, n, np.inf)

