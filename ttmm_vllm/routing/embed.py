"""Sentence embeddings for routing, micro-batched for concurrent requests.

The router compares a prompt's embedding with the centroids. Train time embeds documents with
the same model; serve time embeds the first `query_tokens` tokens (of the base model's
tokenizer) of each prompt. Embedding one text costs about ten times its share of a batch, so
concurrent requests are gathered into one batch (`MicroBatcher`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import numpy as np

from ttmm_vllm.library import EmbedderRef, LibraryError


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, each row L2-normalised."""
        ...


class SentenceEmbedder:
    """Any sentence-transformers model folder (all-MiniLM-L6-v2 by default)."""

    kind = "sentence-transformers"

    def __init__(self, path: str | Path, *, name: str | None = None, batch_size: int = 64,
                 device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.path = str(path)
        self.model = SentenceTransformer(self.path, device=device)
        self.name = name or Path(self.path).name
        dim_of = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.batch_size = batch_size
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            e = self.model.encode(list(texts), batch_size=self.batch_size,
                                  normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=show_progress)
        return np.asarray(e, dtype=np.float32)


class BaseHiddenEmbedder:
    """The base language model's own mean-pooled last hidden states (the paper's pointer to
    Lu et al., 2024): a second query/centroid embedding, chosen per library by routing
    accuracy on the holdout."""

    kind = "base-hidden"

    def __init__(self, model_dir: str | Path, *, name: str | None = None, batch_size: int = 8,
                 max_tokens: int = 256, layer: int = -1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        self.model.eval()
        self.name = name or f"base-hidden:{Path(self.path).name}"
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.layer = layer
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.max_tokens)
                h = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32)


def load_embedder(kind: str, path: str | Path, name: str | None = None) -> Embedder:
    if kind == SentenceEmbedder.kind:
        return SentenceEmbedder(path, name=name)
    if kind == BaseHiddenEmbedder.kind:
        return BaseHiddenEmbedder(path, name=name)
    raise ValueError(f"unknown embedder kind {kind!r}")


def load_library_embedder(ref: EmbedderRef, path: str | Path | None = None) -> Embedder:
    """The embedder a library was built with (at `path`, else where the build found it),
    refused when its dimension is not the library's."""
    path = path or ref.path
    embedder = load_embedder(ref.kind, path, ref.name)
    if embedder.dim != ref.dim:
        raise LibraryError(f"embedder at {path} has dimension {embedder.dim}; the library "
                           f"was built with {ref.name} ({ref.dim})")
    return embedder


def query_text(tokenizer, prompt: str, query_tokens: int) -> str:
    """The first `query_tokens` tokens of the prompt (base-model tokenizer), as text."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:query_tokens]
    return tokenizer.decode(ids)


class MicroBatcher:
    """Gathers concurrent `embed` calls into one batch on a worker thread.

    The first caller opens a window of `window_ms`; every text that arrives before it closes
    (or until `max_batch`) is embedded in the same call. The event loop never blocks.
    """

    def __init__(self, embedder: Embedder, *, max_batch: int = 64, window_ms: float = 2.0):
        self.embedder = embedder
        self.max_batch = max_batch
        self.window = window_ms / 1000.0
        self._pending: list[tuple[str, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ttmm-embed", daemon=True)
        self._thread.start()

    async def embed(self, text: str) -> np.ndarray:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("embedder is shut down")
            self._pending.append((text, fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)

    def _run(self) -> None:
        import time

        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
                deadline = time.monotonic() + self.window
                while len(self._pending) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, self._pending = (self._pending[: self.max_batch],
                                        self._pending[self.max_batch:])
            batch = [(t, f) for t, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                vecs = self.embedder.embed([t for t, _ in batch])
                for (_, f), v in zip(batch, vecs, strict=True):
                    f.set_result(v)
            except Exception as e:  # noqa: BLE001 - every waiter gets the error
                for _, f in batch:
                    f.set_exception(e)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
