"""Stage 4b (`--multitask`): one adapter trained the same way on every expert's training
documents: the fine-tuning baseline TTMM must beat, at an equal token budget.

It is trained on the union of the documents the experts trained on (so the cap per expert caps
it too), in one seeded shuffle, with the experts' settings; it lives in the library's
`multitask/` folder and is named in the manifest's extras. Issue 12's branch-from-multitask
builds start the experts from it.

Compute-matched baseline (`--compute-matched`, on by default). A branched library costs two
passes over the same documents: the multitask adapter's, then the experts' (together they
train on that union again). Its honest fine-tuning comparison is the multitask adapter trained
for as many tokens: the same job with twice the epochs (`matched_job`: the same order and seed,
so its first epoch is the multitask adapter's; later epochs are seeded permutations), in
`multitask-matched/`. A plain library needs none: its experts make one pass over the same
documents, so the equal-data multitask adapter is already compute-matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from training.experts import ExpertJob, TrainSettings

FOLDER = "multitask"
NAME = "multitask"  # the job's name (logs, and the build's results by name)
MATCHED_FOLDER = "multitask-matched"  # the compute-matched baseline of a branched library
MATCHED_NAME = "multitask, compute-matched"  # its job (and log) name
MATCHED_FACTOR = 2  # a branched library: the multitask pass plus the experts' pass


def baseline_settings(settings: TrainSettings) -> TrainSettings:
    """The experts' settings for the baseline, but with its own trained A: the baseline is
    ordinary LoRA fine-tuning whether or not the experts share a frozen A."""
    return replace(settings, shared_a=False)


def matched_settings(settings: TrainSettings) -> TrainSettings:
    """The baseline's settings (`baseline_settings`) for as many tokens as a branched library
    trains in all: `MATCHED_FACTOR` times the epochs."""
    return replace(baseline_settings(settings), epochs=matched_epochs(settings.epochs))


def matched_epochs(epochs: int) -> int:
    """The compute-matched adapter's epochs, for experts trained for `epochs`."""
    return MATCHED_FACTOR * epochs


def multitask_order(members: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """Every expert's training documents, shuffled once (seeded) so clusters interleave."""
    union = np.concatenate([np.asarray(m, dtype=np.int64) for m in members])
    return np.random.default_rng(seed).permutation(union)


def multitask_job(texts: Sequence[str], order: np.ndarray, *, base_model: str,
                  base_fingerprint: str, settings: TrainSettings, seed: int,
                  out_dir: str, name: str = NAME) -> ExpertJob:
    """The multitask adapter's job: every expert's documents in `order`, the experts'
    settings (see `baseline_settings`), written to the library's multitask/ folder (or, with
    `matched_settings` and `name=MATCHED_NAME`, the compute-matched one to multitask-matched/)."""
    return ExpertJob(name=name, expert_id=-1, base_model=base_model,
                     base_fingerprint=base_fingerprint,
                     texts=tuple(texts[i] for i in order), settings=settings, seed=seed,
                     out_dir=out_dir)
