"""Readers for corpora in the user's own formats: JSONL, text files, folders, `datasets`.

Each reader yields documents lazily (so a `limit` stops a big file or a streamed hub data set
early) and names the file and line, or the column, of anything malformed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict


class Document(TypedDict, total=False):
    id: str
    text: str
    title: str
    topic: str


class CorpusError(ValueError):
    """A corpus spec or file that cannot be read as documents."""


TEXT_SUFFIXES = (".txt", ".md", ".py")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _field(value: Any) -> str:
    return "" if value is None else str(value)


def read_jsonl(path: Path) -> Iterator[Document]:
    """One JSON object per line: "text" (a string) required; "id", "title", "topic" optional
    (id defaults to the line number). Blank lines are skipped; ids must be unique."""
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            text = rec.get("text")
            if not isinstance(text, str):
                problem = "no \"text\" field" if text is None else \
                    f"\"text\" is a {type(text).__name__}, expected a string"
                raise CorpusError(f"{where}: {problem}")
            doc_id = _field(rec.get("id", lineno))
            if doc_id in seen:
                raise CorpusError(f"{where}: id {doc_id!r} already used on line {seen[doc_id]}")
            seen[doc_id] = lineno
            yield Document(id=doc_id, text=text, title=_field(rec.get("title")),
                           topic=_field(rec.get("topic")))


def read_text_blocks(path: Path) -> Iterator[Document]:
    """A text file, one document per block of lines separated by blank lines."""
    text = _read_text(path)
    blocks = (b.strip() for b in _BLANK_LINE.split(text.replace("\r\n", "\n")))
    for k, block in enumerate((b for b in blocks if b), start=1):
        yield Document(id=f"{path.name}:{k}", text=block, title=path.stem, topic="")


def read_text_dir(root: Path) -> Iterator[Document]:
    """Every .txt/.md/.py file under `root` (sorted, hidden folders skipped), one document per
    file: id = path relative to root, topic = its first sub-folder (empty at the top)."""
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix in TEXT_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise CorpusError(f"{root}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
    for p in files:
        rel = p.relative_to(root)
        text = _read_text(p)
        if text.strip():
            yield Document(id=rel.as_posix(), text=text, title=p.stem,
                           topic=rel.parts[0] if len(rel.parts) > 1 else "")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from None


# ---------------------------------------------------------------- Hugging Face `datasets`

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                   ".txt": "text", ".arrow": "arrow"}


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, str]:
    """"hf:<path or name>[@config][:split][:text_field]" -> (path, config, split, field).

    `@config` (e.g. "wikimedia/wikipedia@20231101.en") is read only when the path is not a
    local file or folder, whose name may contain "@"."""
    if not spec.startswith("hf:"):
        raise CorpusError(f"{spec!r}: a datasets spec starts with 'hf:'")
    parts = spec[3:].split(":")
    if len(parts) > 3:
        raise CorpusError(f"{spec!r}: expected hf:<path or name>[:split][:text_field]")
    path, split, text_field = (parts + ["", ""])[:3]
    if not path:
        raise CorpusError(f"{spec!r}: no data set path or name after 'hf:'")
    config = None
    if "@" in path and not Path(path).expanduser().exists():
        path, config = path.split("@", 1)
    return path, config or None, split or "train", text_field or "text"


def read_hf(spec: str, cache_dir: Path | None = None) -> Iterator[Document]:
    """Rows of a `datasets` data set: a local data file (json/jsonl/csv/parquet/txt/arrow), a
    folder (`save_to_disk` output or data files), or a hub name (streamed, so a limit does not
    download the whole set). Optional "id", "title", "topic" columns are kept."""
    path, config, split, text_field = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{spec!r} needs the `datasets` package: "
                          "pip install 'ttmm-vllm[hf]'") from None
    local = Path(path).expanduser()
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        if local.is_file():
            builder = _LOCAL_BUILDERS.get(local.suffix)
            if builder is None:
                raise CorpusError(f"{spec!r}: cannot read {local.suffix!r} files; expected one "
                                  f"of {', '.join(_LOCAL_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split,
                                       cache_dir=cache)
        elif local.is_dir() and any((local / f).exists() for f in
                                    ("dataset_info.json", "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CorpusError(f"{spec!r}: no split {split!r}; it has {sorted(ds)}")
                ds = ds[split]
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split, cache_dir=cache)
        else:
            ds = datasets.load_dataset(path, config, split=split, streaming=True,
                                       cache_dir=cache)
    except CorpusError:
        raise
    except Exception as e:  # datasets raises many types; keep the cause, add the spec
        raise CorpusError(f"{spec!r}: datasets could not load it: {e}") from e

    seen: set[str] = set()
    for i, row in enumerate(ds):
        if text_field not in row:
            raise CorpusError(f"{spec!r}: no column {text_field!r}; columns are {sorted(row)} "
                              "(name the text column: hf:<path>:<split>:<column>)")
        text = row[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{spec!r}: row {i}: column {text_field!r} is a "
                              f"{type(text).__name__}, expected a string")
        doc_id = _field(row.get("id", i))
        if doc_id in seen:
            raise CorpusError(f"{spec!r}: row {i}: id {doc_id!r} appears twice")
        seen.add(doc_id)
        yield Document(id=doc_id, text=text, title=_field(row.get("title")),
                       topic=_field(row.get("topic")))
