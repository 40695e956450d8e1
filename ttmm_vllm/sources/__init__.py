"""Offline sources: the base model, the embedder and the corpora, cached under $TTMM_HOME.

Train time and benchmarks read documents through `load_documents`; `ttmm fetch` makes each
artefact (ttmm_vllm/commands/fetch.py).
"""

from __future__ import annotations

from ttmm_vllm.sources.corpora import Document, load_documents

__all__ = ["Document", "load_documents"]
