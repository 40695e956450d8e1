"""Stage 1: documents from a corpus, each cut to its first `max_tokens` tokens.

The paper trains on the first 1024 tokens of each document; cutting once, here, means the
embedding, the clustering and the training all see the same text. Documents are kept as text
(decoded from the kept tokens) so every later stage tokenizes the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from training.sources import Document, load_documents
from ttmm_vllm.library import atomic_write_bytes


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
    docs = load_documents(spec, home=home, limit=limit)
    if not docs:
        raise ValueError(f"corpus {spec!r} has no documents")
    return truncate(docs, tokenizer, max_tokens, min_tokens)


def save_jsonl(path: Path, records: Sequence[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, data.encode())


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
