"""Stage 4b (`--multitask`): one adapter trained the same way on every expert's training
documents: the fine-tuning baseline TTMM must beat, at an equal token budget.

It is trained on the union of the documents the experts trained on (so the cap per expert caps
it too), in one seeded shuffle, with the experts' settings; it lives in the library's
`multitask/` folder and is named in the manifest's extras. Issue 12's branch-from-multitask
builds start the experts from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from training.experts import ExpertJob, TrainSettings

FOLDER = "multitask"


def baseline_settings(settings: TrainSettings) -> TrainSettings:
    """The experts' settings for the baseline, but with its own trained A: the baseline is
    ordinary LoRA fine-tuning whether or not the experts share a frozen A."""
    return replace(settings, shared_a=False)


def multitask_order(members: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """Every expert's training documents, shuffled once (seeded) so clusters interleave."""
    union = np.concatenate([np.asarray(m, dtype=np.int64) for m in members])
    return np.random.default_rng(seed).permutation(union)


def multitask_job(texts: Sequence[str], order: np.ndarray, *, base_model: str,
                  base_fingerprint: str, settings: TrainSettings, seed: int,
                  out_dir: str) -> ExpertJob:
    """The multitask adapter's job: every expert's documents in `order`, the experts'
    settings (see `baseline_settings`), written to the library's multitask/ folder."""
    return ExpertJob(name="multitask", expert_id=-1, base_model=base_model,
                     base_fingerprint=base_fingerprint,
                     texts=tuple(texts[i] for i in order), settings=settings, seed=seed,
                     out_dir=out_dir)
