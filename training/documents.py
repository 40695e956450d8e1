"""Stage 1: documents from a corpus, each cut to its first `max_tokens` tokens.

The paper trains on the first 1024 tokens of each document; cutting once, here, means the
embedding, the clustering and the training all see the same text. Documents are kept as text
(decoded from the kept tokens) so every later stage tokenizes the same way.

The stage (`prepare_documents`) caches them as `documents.jsonl` in the work dir, keyed by the
corpus spec, the cut and the base tokenizer; its key's digest is part of every later key, so a
changed corpus redoes everything after it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from training.context import BuildContext
from training.sources import Document, load_documents
from ttmm_vllm.library import atomic_write_bytes

log = logging.getLogger(__name__)

DOCUMENTS = "documents.jsonl"  # in the work dir


@dataclass(frozen=True)
class Corpus:
    """The build's documents ({id, text, title, topic}) in corpus order, and the digest of
    what they were made from (later stages' cache keys include it)."""

    docs: list[dict[str, Any]]
    key: str

    @property
    def texts(self) -> list[str]:
        return [d["text"] for d in self.docs]

    def ids(self, rows: Sequence[int]) -> list[str]:
        """The document ids of the given row indices (what the report names documents by)."""
        return [self.docs[i]["id"] for i in rows]


def prepare_documents(ctx: BuildContext) -> Corpus:
    """Stage 1: read the corpus and cut each document to --max-tokens (cached)."""
    cfg = ctx.cfg
    path = ctx.work / DOCUMENTS
    key = ctx.stage(
        "documents",
        {"corpus": cfg.corpus, "limit": cfg.limit, "max_tokens": cfg.max_tokens,
         "min_tokens": cfg.min_tokens, "tokenizer": ctx.base_fingerprint},
        [path],
        lambda: save_jsonl(path, load_corpus(
            cfg.corpus, ctx.tokenizer, max_tokens=cfg.max_tokens, min_tokens=cfg.min_tokens,
            home=cfg.home, limit=cfg.limit)))
    corpus = Corpus(read_jsonl(path), key)
    log.info("%d documents", len(corpus.docs))
    return corpus


def truncate(docs: Sequence[Document], tokenizer, max_tokens: int, min_tokens: int = 1,
             batch: int = 256) -> list[Document]:
    """Each document cut to its first `max_tokens` tokens; those under `min_tokens` dropped.

    Ids must be unique (the holdout, the assignments and resuming all name documents by id).
    """
    seen: set[str] = set()
    for d in docs:
        if not isinstance(d.get("text"), str):
            raise ValueError(f"document {d.get('id')!r} has no text")
        if d["id"] in seen:
            raise ValueError(f"document id {d['id']!r} appears twice in the corpus")
        seen.add(d["id"])
    out: list[Document] = []
    for start in tqdm(range(0, len(docs), batch), desc="tokenize", unit="batch",
                      disable=len(docs) <= batch):
        chunk = docs[start:start + batch]
        ids = tokenizer([d["text"] for d in chunk], add_special_tokens=False)["input_ids"]
        for d, toks in zip(chunk, ids, strict=True):
            if len(toks) < min_tokens:
                continue
            text = d["text"] if len(toks) <= max_tokens else tokenizer.decode(toks[:max_tokens])
            out.append(Document(id=d["id"], text=text, title=d.get("title", ""),
                                topic=d.get("topic", "")))
    return out


def load_corpus(spec: str, tokenizer, *, max_tokens: int, min_tokens: int = 1,
                home: Path | None = None, limit: int | None = None) -> list[Document]:
    """The corpus `spec` names (training.sources), each document cut to `max_tokens`."""
    docs = load_documents(spec, home=home, limit=limit)
    if not docs:
        raise ValueError(f"corpus {spec!r} has no documents")
    return truncate(docs, tokenizer, max_tokens, min_tokens)


def save_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON record a line, written atomically (a killed build never leaves half a file)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, data.encode())


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
