"""Stage 5: a short title per cluster, so a routing can be explained ("why these experts?").

The paper asked an LLM to summarise ten documents per cluster; here, without one, a title is
what a reader recognises first, the titles of the documents nearest the centroid (when the
documents have titles), then the cluster's most distinctive words (class-based TF-IDF: each
cluster's training text is one document, so a word common to every cluster scores low):
"Crane (machine), Forklift, Hoist: lifting, load, carry".

Titles come from the clustering embedding whatever embedding ends up routing: they describe
the clusters, which that embedding made. Cheap, so not cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.centroids import centroids
from training.context import BuildContext
from training.documents import Corpus

log = logging.getLogger(__name__)

# Titles travel in every routing of every response (the library's limit is 256 characters)
MAX_TITLE_CHARS = 120


@dataclass(frozen=True)
class Titles:
    """Per expert: its title, and the titles of the documents nearest its centroid."""

    titles: list[str]
    examples: list[list[str]]


def title_experts(ctx: BuildContext, corpus: Corpus, embeddings: np.ndarray,
                  members: Sequence[np.ndarray]) -> Titles:
    """Stage 5: a title per expert from its training documents and the clustering
    embedding (`embeddings`, (n_docs, d))."""
    t0 = time.perf_counter()
    docs = corpus.docs
    cents = centroids(embeddings, members)
    doc_titles = [d.get("title", "") for d in docs]
    examples = [central_titles(embeddings[ids], [doc_titles[i] for i in ids], cents[k])
                for k, ids in enumerate(members)]
    texts = [" ".join(docs[i]["text"] for i in ids) for ids in members]
    titles = cluster_titles(texts, examples)
    ctx.timings["titles"] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False}
    for k, t in enumerate(titles):
        log.info("expert %d: %s", k, t)
    return Titles(titles, examples)


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
                   n_terms: int = 3, max_chars: int = MAX_TITLE_CHARS) -> list[str]:
    """'Central Title, Next Title, Third Title: term, term, term' per cluster: the titles of
    the documents nearest its centroid (`examples`, nearest first; as many as fit in
    `max_chars`, the first cut short if it alone does not) and its most distinctive words.
    Either part alone when the other is empty; 'cluster k' when nothing describes it."""
    terms = top_terms(cluster_texts, n_terms)
    out = []
    for k, (words, ex) in enumerate(zip(terms, examples, strict=True)):
        tail = ", ".join(words)
        room = max_chars - (len(tail) + 2 if tail else 0)  # ": " before the words
        names: list[str] = []
        for name in ex:
            if len(", ".join([*names, name])) > room:
                break
            names.append(name)
        if ex and not names and room > 1:
            names = [ex[0][:room - 1] + "\u2026"]
        head = ", ".join(names)
        out.append(f"{head}: {tail}" if head and tail else head or tail or f"cluster {k}")
    return out
