"""Stage 6: a short title per cluster, so a routing can be explained ("why these experts?").

The paper asked an LLM to summarise ten documents per cluster; here, without one, a title is
the cluster's most distinctive words (class-based TF-IDF: each cluster's training text is one
document, so a word common to every cluster scores low) and, when documents have titles, the
title of the document nearest the centroid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_terms(cluster_texts: Sequence[str], n_terms: int = 3) -> list[list[str]]:
    """The `n_terms` highest TF-IDF words of each cluster (clusters as documents)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b",
                          sublinear_tf=True, max_features=50_000)
    try:
        x = vec.fit_transform(cluster_texts)
    except ValueError:  # no word survives (e.g. only digits): no terms
        return [[] for _ in cluster_texts]
    vocab = np.asarray(vec.get_feature_names_out())
    out = []
    for row in x:
        dense = row.toarray().ravel()
        top = np.argsort(-dense, kind="stable")[:n_terms]
        out.append([str(vocab[i]) for i in top if dense[i] > 0])
    return out


def central_titles(embeddings: np.ndarray, titles: Sequence[str], centroid: np.ndarray,
                   n: int = 3) -> list[str]:
    """Titles of the documents nearest the centroid (empty titles skipped)."""
    order = np.argsort(-(embeddings @ centroid), kind="stable")
    out = []
    for i in order:
        if titles[i] and titles[i] not in out:
            out.append(titles[i])
        if len(out) == n:
            break
    return out


def cluster_titles(cluster_texts: Sequence[str], examples: Sequence[Sequence[str]],
                   n_terms: int = 3) -> list[str]:
    """'term, term, term (e.g. Central Title)'; 'cluster k' when nothing describes it."""
    terms = top_terms(cluster_texts, n_terms)
    out = []
    for k, (words, ex) in enumerate(zip(terms, examples, strict=True)):
        title = ", ".join(words) if words else f"cluster {k}"
        if ex:
            title += f" (e.g. {ex[0]})"
        out.append(title)
    return out
