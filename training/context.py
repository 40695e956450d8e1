"""What every stage of a build shares: the settings, the folders, the stage cache, the models.

A stage is a function of typed inputs (training/pipeline.py lists them in order). What makes it
resumable lives here, once: `BuildContext.stage` runs a computation unless the work dir already
holds its outputs together with a record of the same inputs (a hash of them), so a rerun redoes
only what changed and a killed build picks up where it stopped. The context also keeps what
is expensive to load (the tokenizer, the embedders, evaluation models) for the length of one
build, and the timing of each stage for the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.config import BuildConfig
from ttmm_vllm.library import atomic_write_json, model_fingerprint

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    """A short, stable hash of JSON-able data: the key a cached stage output is valid for."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BuildContext:
    """One build's settings, folders, stage cache, loaded models and timings."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser().resolve()
        self.work = cfg.work.expanduser().resolve()
        self.base = Path(cfg.base_model).expanduser().resolve()
        # stage name -> {"seconds", "cached", ...}; in the order stages ran (the report's table)
        self.timings: dict[str, dict[str, Any]] = {}
        self._base_fingerprint: str | None = None
        self._tokenizer: Any = None
        self._embedders: dict[str, Any] = {}
        self._models: dict[Path, tuple[Any, Any]] = {}

    def start(self) -> None:
        """Check the inputs exist before any work, and create the work dir."""
        cfg = self.cfg
        if not (self.base / "config.json").exists():
            raise FileNotFoundError(f"base model {cfg.base_model} is not a model folder "
                                    "(no config.json)")
        emb = Path(cfg.embedder).expanduser()
        if cfg.has_sentence_embedder and not emb.is_dir():
            raise FileNotFoundError(f"embedder {cfg.embedder} is not a folder")
        self.work.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the stage cache

    def stage(self, name: str, key: dict[str, Any], outputs: Sequence[Path],
              compute: Callable[[], object]) -> str:
        """Run `compute` (which writes `outputs`) unless the work dir holds this stage's
        outputs for the same key; returns the key's digest, for later stages' keys."""
        key_digest = digest(key)
        rec_path = self.work / f"{name}.stage.json"
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            rec = None
        if rec and rec.get("key") == key_digest and all(p.exists() for p in outputs):
            log.info("stage %s: cached (%s)", name, rec_path)
            self.timings[name] = {"seconds": rec.get("seconds"), "cached": True}
            return key_digest
        log.info("stage %s: running", name)
        t0 = time.perf_counter()
        compute()
        seconds = round(time.perf_counter() - t0, 2)
        atomic_write_json(rec_path, {"key": key_digest, "seconds": seconds, "inputs": key})
        self.timings[name] = {"seconds": seconds, "cached": False}
        log.info("stage %s: done in %.1fs", name, seconds)
        return key_digest

    # ------------------------------------------------------------------ shared, loaded once

    @property
    def base_fingerprint(self) -> str:
        """The base model's fingerprint: part of every key that depends on the base."""
        if self._base_fingerprint is None:
            self._base_fingerprint = model_fingerprint(self.base)
        return self._base_fingerprint

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (documents are cut, and prefixes taken, with it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        return self._tokenizer

    def embedder_path(self, kind: str) -> Path:
        """The folder an embedding of `kind` is computed with (the base for base-hidden)."""
        if kind == "base-hidden":
            return self.base
        return Path(self.cfg.embedder).expanduser().resolve()

    def embed(self, kind: str, texts: list[str], desc: str) -> np.ndarray:
        """(n, d) unit rows: `texts` embedded by the `kind` embedder, loaded once per build."""
        from training.embeddings import embed_texts

        if kind not in self._embedders:
            from ttmm_vllm.routing.embed import load_embedder

            self._embedders[kind] = load_embedder(kind, self.embedder_path(kind))
        return embed_texts(self._embedders[kind], texts, self.cfg.embed_batch_size, desc=desc)

    def release_embedders(self) -> None:
        """Drop the embedders once routing is chosen: the base-hidden one holds a whole model."""
        self._embedders.clear()

    def model(self, model_dir: Path) -> tuple[Any, Any]:
        """(model, tokenizer) for evaluation, loaded once per build (tuning and the test
        documents score the same models)."""
        if model_dir not in self._models:
            from training.evaluate import load_model

            self._models[model_dir] = load_model(model_dir)
        return self._models[model_dir]
