"""Offline sources: the base model, the embedder and the corpora, cached under $TTMM_HOME.

Train time and benchmarks read documents through `load_documents`; `ttmm fetch` makes each
artefact (ttmm_vllm/cli/fetch.py). Modules: `pypi` (wheels as a data channel), `cache`
(atomic, verified artefacts), `models`, `corpora` (named corpora + `load_documents`),
`readers` (the user's own formats).
"""

from __future__ import annotations

from training.sources.corpora import fetch_python, fetch_wiki, load_documents
from training.sources.models import fetch_base_model, fetch_embedder
from training.sources.readers import CorpusError, Document

__all__ = [
    "CorpusError",
    "Document",
    "fetch_base_model",
    "fetch_embedder",
    "fetch_python",
    "fetch_wiki",
    "load_documents",
]
