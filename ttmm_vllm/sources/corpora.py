"""Corpora as lists of documents {"id", "text", "title", "topic"}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict


class Document(TypedDict, total=False):
    id: str
    text: str
    title: str
    topic: str


def load_documents(spec: str, *, home: Path | None = None, limit: int | None = None
                   ) -> list[Document]:
    """Documents from a corpus spec.

    spec: a path to a JSONL file ({"text", optional "id", "title", "topic"} per line).
    (The sources issue extends this: "wiki", "python", text folders, "hf:<dataset>".)
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {spec!r} not found")
    docs: list[Document] = []
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            docs.append(Document(id=str(rec.get("id", i)), text=rec["text"],
                                 title=rec.get("title", ""), topic=rec.get("topic", "")))
            if limit is not None and len(docs) >= limit:
                break
    return docs
