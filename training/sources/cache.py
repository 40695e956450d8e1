"""Cached artefacts under $TTMM_HOME: built once, published atomically, trusted only if intact.

Every artefact (a model folder or a corpus file) is built into a hidden temporary sibling and
renamed into place, so a reader never sees half of one. A marker records the sha256 of every
file produced and the options the artefact was built with; `ensure` reuses an artefact only
when its marker matches both, so a half-written, corrupted or differently-built artefact is
rebuilt rather than used. The marker of a folder lives inside it (it is renamed with it); the
marker of a file lives beside it and is removed before the file is replaced.

Concurrent fetches of the same artefact are serialised by a lock file, so the second one finds
the first one's result and returns at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ttmm_vllm.library import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MARKER_FORMAT = "ttmm-artefact"
MARKER_VERSION = 1
DIR_MARKER = ".ttmm-artefact.json"


def marker_path(artefact: Path) -> Path:
    """Where the marker of `artefact` is: inside a folder, beside a file."""
    if artefact.is_dir():
        return artefact / DIR_MARKER
    return artefact.with_name(f".{artefact.name}.ttmm-artefact.json")


def digests(artefact: Path) -> dict[str, str]:
    """sha256 of each file of the artefact, keyed by path relative to it (a file: its name)."""
    if artefact.is_file():
        return {artefact.name: sha256_file(artefact)}
    return {
        p.relative_to(artefact).as_posix(): sha256_file(p)
        for p in sorted(artefact.rglob("*"))
        if p.is_file() and p.name != DIR_MARKER
    }


def read_marker(artefact: Path) -> dict[str, Any] | None:
    """The marker's content, or None when it is missing or unreadable."""
    try:
        marker = json.loads(marker_path(artefact).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker


def problem(artefact: Path, options: Mapping[str, Any] | None = None) -> str | None:
    """Why `artefact` cannot be used as it is (None: it is intact and built with `options`).

    Files the marker does not list are tolerated (e.g. a digest cache that a reader wrote into
    a model folder); every listed file must be present with its recorded digest.
    """
    if not artefact.exists():
        return "missing"
    marker = read_marker(artefact)
    if marker is None:
        return "no valid marker (an interrupted or foreign build)"
    if marker.get("version") != MARKER_VERSION:
        return f"marker version {marker.get('version')!r}, expected {MARKER_VERSION}"
    if options is not None and marker.get("options") != _jsonable(options):
        return f"built with other options {marker.get('options')!r}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no files"
    base = artefact if artefact.is_dir() else artefact.parent
    for rel, digest in files.items():
        path = base / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} does not match its recorded sha256 (corrupted or changed)"
    return None


def ensure(
    dest: Path,
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    options: Mapping[str, Any],
    force: bool = False,
) -> Path:
    """`dest`, built by `build(tmp)` unless an intact artefact with the same options is there.

    `build` writes a file or a folder at the path it is given (which does not exist yet) and
    may return extra facts (e.g. the source wheel's digest) to keep in the marker.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if not force:
            why = problem(dest, options)
            if why is None:
                log.info("%s is already there and intact", dest)
                return dest
            if why != "missing":
                log.warning("rebuilding %s: %s", dest, why)
        _remove_stale_temps(dest)
        t0 = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
        try:
            tmp = workdir / dest.name
            facts = build(tmp) or {}
            if not tmp.exists():
                raise RuntimeError(f"building {dest.name} produced nothing at {tmp}")
            marker = {
                "format": MARKER_FORMAT,
                "version": MARKER_VERSION,
                "options": _jsonable(options),
                **_jsonable(facts),
                "files": digests(tmp),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _publish(tmp, dest, marker)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        log.info("built %s in %.1f s", dest, time.perf_counter() - t0)
    return dest


def _publish(tmp: Path, dest: Path, marker: dict[str, Any]) -> None:
    """Rename the finished build into place; the old artefact, if any, goes away whole."""
    if tmp.is_dir():
        atomic_write_json(tmp / DIR_MARKER, marker)
        _make_readable(tmp)
        old = None
        if dest.exists() or dest.is_symlink():
            old = tmp.parent / f"old-{dest.name}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            _remove(old)
    else:
        marker_path(dest).unlink(missing_ok=True)  # a crash before the marker means "rebuild"
        if dest.is_dir():
            _remove(dest)
        _make_readable(tmp)
        os.replace(tmp, dest)
        atomic_write_json(marker_path(dest), marker)
        _make_readable(marker_path(dest))


def _make_readable(path: Path) -> None:
    """Temporary files are created private (0600); a shared cache is readable by all."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-"


def _remove_stale_temps(dest: Path) -> None:
    """Temporary folders left by a killed build (we hold the lock, so none is in use)."""
    for stale in dest.parent.glob(_temp_prefix(dest) + "*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    lock = dest.with_name(f".{dest.name}.lock")
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _jsonable(obj: Any) -> Any:
    """Options as they read back from the marker (tuples become lists, paths strings)."""
    return json.loads(json.dumps(obj, default=str))
