"""Session-wide tiny artefacts: built once per test session, shared by every test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> list[dict]:
    return tiny.synthetic_corpus()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus):
    return tiny.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"),
                                 [d["text"] for d in corpus])


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory, corpus):
    return tiny.build_tiny_embedder(tmp_path_factory.mktemp("tiny-embedder"),
                                    [d["text"] for d in corpus])


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory, tiny_model_dir, tiny_embedder_dir, corpus):
    """Four random rank-4 experts, one per topic of the synthetic corpus."""
    return tiny.build_random_library(tmp_path_factory.mktemp("tiny-library"), tiny_model_dir,
                                     tiny_embedder_dir, docs=corpus)
