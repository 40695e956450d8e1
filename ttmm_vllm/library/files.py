"""File utilities of the library format: atomic writes, checksums, model fingerprints.

Readers never see a half-written file (temporary file + rename), and a model is named by what
it is (a digest of its config and weights), not by where it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ttmm_vllm.library.format import LibraryError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a Hugging Face model folder's config and weights.

    The weights' digests are cached beside them (keyed by size and mtime), so a server start
    does not re-hash hundreds of MB each time.
    """
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.exists():
        raise LibraryError(f"{model_dir} is not a model folder (no config.json)")
    cfg = json.loads(config.read_text())
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise LibraryError(f"{model_dir} has no *.safetensors weights")
    cache_file = model_dir / ".ttmm-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    for w in weights:
        st = w.stat()
        key = f"{w.name}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(w)
            changed = True
        h.update(w.name.encode())
        h.update(cache[key].encode())
    if changed:
        with contextlib.suppress(OSError):  # a read-only model folder: hash again next time
            atomic_write_json(cache_file, cache)
    return h.hexdigest()[:16]

