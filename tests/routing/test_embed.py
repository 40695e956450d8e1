"""Query embeddings: the tiny sentence-transformers embedder, the micro-batcher in front of
it, and loading the embedder a library names."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from ttmm_vllm import testing as tiny
from ttmm_vllm.library import EmbedderRef, LibraryError
from ttmm_vllm.routing.embed import (
    BaseHiddenEmbedder,
    MicroBatcher,
    SentenceEmbedder,
    load_embedder,
    load_library_embedder,
    query_text,
)

# one prompt per topic plus mixtures: distinct texts, distinct vectors
TEXTS = [" ".join(words[:8]) for words in tiny.TOPICS.values()] + [
    "the guitar and the planet", "a recipe for the match", "orbit", "the the the"]


class CountingEmbedder(SentenceEmbedder):
    """The real embedder, recording the size of every batch it is given."""

    def __init__(self, path):
        super().__init__(path)
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def embed(self, texts, show_progress=False):
        self.batches.append(len(texts))
        self.threads.add(threading.current_thread().name)
        return super().embed(texts, show_progress)


@pytest.fixture(scope="module")
def embedder(tiny_embedder_dir):
    return CountingEmbedder(tiny_embedder_dir)


@pytest.fixture(scope="module")
def direct(embedder):
    """Each text embedded on its own."""
    return {t: embedder.embed([t])[0] for t in TEXTS}


def _gather(batcher: MicroBatcher, texts):
    async def main():
        return await asyncio.gather(*(batcher.embed(t) for t in texts))

    return asyncio.run(main())


def test_the_tiny_embedder_gives_unit_rows_that_tell_texts_apart(embedder, direct):
    vecs = np.stack([direct[t] for t in TEXTS])
    assert vecs.shape == (len(TEXTS), 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    sims = vecs @ vecs.T
    assert np.all(sims[~np.eye(len(TEXTS), dtype=bool)] < 0.999)  # no two texts alike
    assert embedder.embed([]).shape == (0, 64)


def test_each_concurrent_caller_gets_its_own_vector(embedder, direct):
    embedder.batches.clear()
    batcher = MicroBatcher(embedder, max_batch=len(TEXTS), window_ms=2000)
    try:
        got = _gather(batcher, TEXTS)
    finally:
        batcher.close()
    for text, vec in zip(TEXTS, got, strict=True):
        np.testing.assert_allclose(vec, direct[text], atol=1e-5, err_msg=text)
    # the max_batch-th text closes the window at once: one call for all, off the loop's thread
    assert embedder.batches == [len(TEXTS)]
    assert embedder.threads >= {"ttmm-embed"}


def test_batches_never_exceed_max_batch(embedder, direct):
    embedder.batches.clear()
    batcher = MicroBatcher(embedder, max_batch=3, window_ms=100)
    try:
        texts = TEXTS + TEXTS[:2]
        got = _gather(batcher, texts)
    finally:
        batcher.close()
    for text, vec in zip(texts, got, strict=True):
        np.testing.assert_allclose(vec, direct[text], atol=1e-5, err_msg=text)
    assert sum(embedder.batches) == len(texts)
    assert max(embedder.batches) == 3 and len(embedder.batches) < len(texts)


def test_sequential_calls_each_get_a_batch_of_one(embedder, direct):
    embedder.batches.clear()
    batcher = MicroBatcher(embedder, window_ms=1)
    try:
        for t in TEXTS[:3]:
            np.testing.assert_allclose(asyncio.run(batcher.embed(t)), direct[t], atol=1e-5)
    finally:
        batcher.close()
    assert embedder.batches == [1, 1, 1]


def test_an_embedder_error_reaches_every_caller_of_the_batch(tiny_embedder_dir):
    class Broken(CountingEmbedder):
        def embed(self, texts, show_progress=False):
            super().embed(texts)
            raise RuntimeError("tokenizer exploded")

    broken = Broken(tiny_embedder_dir)
    batcher = MicroBatcher(broken, max_batch=4, window_ms=2000)

    async def main():
        return await asyncio.gather(*(batcher.embed(t) for t in TEXTS[:4]),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert [str(r) for r in results] == ["tokenizer exploded"] * 4
        assert broken.batches == [4]
    finally:
        batcher.close()


def test_close_is_idempotent_and_refuses_later_calls(embedder):
    before = set(threading.enumerate())
    batcher = MicroBatcher(embedder)
    (worker,) = [t for t in set(threading.enumerate()) - before if t.name == "ttmm-embed"]
    batcher.close()
    assert not worker.is_alive()
    batcher.close()
    with pytest.raises(RuntimeError, match="embedder is shut down"):
        asyncio.run(batcher.embed("the guitar"))


def test_load_library_embedder_loads_what_the_library_names(tiny_embedder_dir, direct):
    ref = EmbedderRef(name="tiny-embedder", dim=64, path=str(tiny_embedder_dir))
    emb = load_library_embedder(ref)
    assert isinstance(emb, SentenceEmbedder) and emb.name == "tiny-embedder" and emb.dim == 64
    np.testing.assert_allclose(emb.embed([TEXTS[0]])[0], direct[TEXTS[0]], atol=1e-6)


def test_load_library_embedder_refuses_another_dimension(tiny_embedder_dir):
    ref = EmbedderRef(name="all-MiniLM-L6-v2", dim=384, path="/nowhere")
    with pytest.raises(LibraryError) as e:
        load_library_embedder(ref, tiny_embedder_dir)  # an explicit path wins over ref.path
    msg = str(e.value)
    assert "dimension 64" in msg and "all-MiniLM-L6-v2 (384)" in msg
    assert str(tiny_embedder_dir) in msg


def test_load_embedder_refuses_an_unknown_kind(tiny_embedder_dir):
    with pytest.raises(ValueError, match="unknown embedder kind 'word2vec'"):
        load_embedder("word2vec", tiny_embedder_dir)


def test_base_hidden_embedder_is_the_base_models_pooled_states(tiny_model_dir):
    emb = load_embedder("base-hidden", tiny_model_dir)
    assert isinstance(emb, BaseHiddenEmbedder)
    vecs = emb.embed(TEXTS[:3] + TEXTS[:1])
    assert vecs.shape == (4, emb.dim) and emb.dim == emb.model.config.hidden_size
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    # padding does not change a text's vector: alone or in a batch, the same
    np.testing.assert_allclose(emb.embed(TEXTS[:1])[0], vecs[3], atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1], atol=1e-3)
    assert emb.embed([]).shape == (0, emb.dim)


def test_query_text_is_the_first_query_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = " ".join(tiny.TOPICS["music"])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5
    assert query_text(tok, prompt, 5) == tok.decode(ids[:5])
    assert query_text(tok, prompt, 10_000) == tok.decode(ids)
    assert len(query_text(tok, prompt, 5)) < len(query_text(tok, prompt, 10))
