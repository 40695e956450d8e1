"""Where downloaded models, corpora and built libraries are cached (never in git), and the
environment every ttmm process runs with."""

from __future__ import annotations

import os
from pathlib import Path

# No model or data from a hub at run time, no telemetry, and no tokenizer thread pools
# fighting the engine for the cores. Set (as defaults) by the CLI, the benchmarks and the
# tests, and forwarded to Ray workers, which do not inherit this process's environment.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def offline_env() -> None:
    """Apply OFFLINE_ENV where the environment does not already say otherwise."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def ttmm_home(explicit: str | os.PathLike | None = None) -> Path:
    """$TTMM_HOME, else ~/.cache/ttmm. Only the CLI and tests call this (they own the env)."""
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("TTMM_HOME") or "~/.cache/ttmm").expanduser()
