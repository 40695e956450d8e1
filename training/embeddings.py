"""Stage 2: one L2-normalised embedding per document (float32 .npy), with a progress bar.

The same embedder embeds queries at serve time, so the kind and path go into the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from ttmm_vllm.routing.embed import Embedder
from ttmm_vllm.routing.weights import normalize_rows


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
