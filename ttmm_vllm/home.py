"""Where downloaded models, corpora and built libraries are cached (never in git)."""

from __future__ import annotations

import os
from pathlib import Path


def ttmm_home(explicit: str | os.PathLike | None = None) -> Path:
    """$TTMM_HOME, else ~/.cache/ttmm. Only the CLI and tests call this (they own the env)."""
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("TTMM_HOME") or "~/.cache/ttmm").expanduser()
