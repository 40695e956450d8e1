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


DIGESTS = ".ttmm-digests.json"


def _digest_key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def known_digest(path: str | os.PathLike) -> str | None:
    """The sha256 remembered for a file as it is now (same name, size and mtime), if any."""
    path = Path(path)
    try:
        cache = json.loads((path.parent / DIGESTS).read_text())
        got = cache.get(_digest_key(path)) if isinstance(cache, dict) else None
    except (OSError, ValueError):
        return None
    return got if isinstance(got, str) else None


def remember_digest(path: str | os.PathLike, digest: str) -> None:
    """Remember a file's verified sha256 beside it (`.ttmm-digests.json`, keyed by name, size
    and mtime) so the next check costs a stat, not a pass over its bytes. A folder that
    cannot be written just verifies again next time."""
    path = Path(path)
    cache_file = path.parent / DIGESTS
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path.name}:")}
    cache[_digest_key(path)] = digest
    with contextlib.suppress(OSError):
        atomic_write_json(cache_file, cache)


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered beside it: hashed again only when the file changed."""
    digest = known_digest(path)
    if digest is None:
        digest = sha256_file(path)
        remember_digest(path, digest)
    return digest


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
    for w in weights:
        h.update(w.name.encode())
        h.update(sha256_cached(w).encode())
    return h.hexdigest()[:16]

