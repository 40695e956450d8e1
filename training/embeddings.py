"""Stage 2: one L2-normalised embedding per document (float32 .npy), with a progress bar.

The corpus is clustered with the sentence embedder when one is given, else with the base
model's hidden states (`embed_corpus`). Routing may use another embedding than clustering
(training/routing.py scores the candidates), so the routing stage also asks here for the
other kind's embeddings of the experts' training documents (`member_embeddings`: what its
centroids average) and for every holdout document's prefix embedded as a query
(`holdout_queries`). Each is a cached stage of the build. The same embedder embeds queries at
serve time, so the kind and path go into the manifest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from training.context import BuildContext, digest
from training.documents import Corpus
from ttmm_vllm.library import atomic_save_npy, atomic_write_bytes
from ttmm_vllm.routing.embed import Embedder
from ttmm_vllm.routing.weights import normalize_rows

EMBEDDINGS = "embeddings.npy"  # in the work dir


@dataclass(frozen=True)
class Embeddings:
    """The clustering embedding of every document, and the digest of what it was made from."""

    vectors: np.ndarray  # (n_docs, d) float32 unit rows, corpus order
    kind: str  # "sentence-transformers" or "base-hidden"
    key: str


def embed_corpus(ctx: BuildContext, corpus: Corpus) -> Embeddings:
    """Stage 2: every document embedded with the clustering embedder (cached)."""
    cfg = ctx.cfg
    kind = cfg.cluster_embedder_kind
    path = ctx.work / EMBEDDINGS
    embedder = ctx.embedder_path(kind) if kind == "base-hidden" else cfg.embedder
    key = ctx.stage("embeddings",
                    {"documents": corpus.key, "embedder": str(embedder), "kind": kind},
                    [path],
                    lambda: atomic_save_npy(path, ctx.embed(kind, corpus.texts,
                                                            "embed documents")))
    return Embeddings(np.load(path), kind, key)


def member_embeddings(ctx: BuildContext, kind: str, corpus: Corpus,
                      members: Sequence[np.ndarray]) -> np.ndarray:
    """(n_docs, d) `kind` embeddings of the experts' training documents (zero rows for the
    others): what that kind's centroids are the means of. Cached as routing-KIND.npz."""
    texts = corpus.texts
    ids = np.unique(np.concatenate(members))
    path = ctx.work / f"routing-{kind}.npz"

    def compute() -> None:
        vecs = ctx.embed(kind, [texts[i] for i in ids], f"embed documents ({kind})")
        buf = io.BytesIO()
        np.savez(buf, ids=ids, vectors=vecs)
        atomic_write_bytes(path, buf.getvalue())

    ctx.stage(f"routing-{kind}", {"documents": corpus.key, "members": digest(ids.tolist()),
                                  "model": ctx.base_fingerprint, "kind": kind}, [path], compute)
    with np.load(path) as z:
        full = np.zeros((len(texts), z["vectors"].shape[1]), np.float32)
        full[z["ids"]] = z["vectors"]
    return full


def holdout_queries(ctx: BuildContext, kind: str, corpus: Corpus,
                    holdout: np.ndarray) -> np.ndarray:
    """(n_holdout, d): each holdout document's first --query-tokens tokens, embedded as a
    prompt is at serve time (routing accuracy and tuning route these). Cached."""
    cfg = ctx.cfg
    docs = corpus.docs
    name = "holdout_queries" if kind == "sentence-transformers" else f"holdout_queries-{kind}"
    path = ctx.work / f"{name}.npy"
    embedder = cfg.embedder if kind == "sentence-transformers" else ctx.base
    key = {"holdout": digest(holdout.tolist()), "query_tokens": cfg.query_tokens,
           "embedder": str(embedder), "kind": kind,
           "docs": digest([docs[i]["id"] for i in holdout])}
    ctx.stage(name, key, [path], lambda: atomic_save_npy(path, ctx.embed(
        kind, prefix_texts(ctx.tokenizer, [docs[i]["text"] for i in holdout], cfg.query_tokens),
        f"embed holdout prefixes ({kind})")))
    return np.load(path)


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 64,
                desc: str = "embed") -> np.ndarray:
    """(n, dim) float32, unit rows. Batches here (not inside the embedder) to show progress."""
    out = [np.zeros((0, embedder.dim), np.float32)]
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch",
                      disable=len(texts) <= batch_size):
        out.append(np.asarray(embedder.embed(list(texts[start:start + batch_size])),
                              dtype=np.float32))
    vecs = np.concatenate(out)
    if not np.all(np.isfinite(vecs)):
        raise ValueError("the embedder returned NaN or infinite values")
    return normalize_rows(vecs)


def prefix_texts(tokenizer, texts: Sequence[str], query_tokens: int) -> list[str]:
    """The first `query_tokens` tokens of each text (base tokenizer): what a query looks like.

    Same cut as `ttmm_vllm.routing.embed.query_text`, batched.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(t[:query_tokens]) for t in ids]
