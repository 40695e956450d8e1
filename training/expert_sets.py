"""Stage 4: the expert sets (and the multitask adapters), trained locally, sharded or on Ray.

Expert sets. `plain` experts are trained from the base (the paper; `experts/NNNN`); `branched`
experts from the base with the multitask adapter folded in (training/branching.py;
`branched/base`, `branched/experts/NNNN`). `--branch-from-multitask` decides which are trained;
when both are, tuning decides which one the library serves (training/tune.py, `choose_set`).
When the branched set is trained, so is the compute-matched baseline (`multitask-matched/`,
training/multitask.py; `--no-compute-matched` skips it), beside the multitask adapter.

Every adapter is written straight into the library folder, atomically with a checksum record
(training/experts.py), so a killed build skips what it finished. With `--shard i/n` a process
trains only every n-th job; the branched experts start once the multitask adapter exists, and
whichever run finds every adapter present goes on to write the library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import branching
from training import multitask as mt
from training.config import BuildConfig
from training.context import BuildContext
from training.documents import Corpus
from training.experts import ExpertJob, ExpertResult, TrainSettings, finished, train_all
from ttmm_vllm.library import MANIFEST, expert_dirname, model_fingerprint

log = logging.getLogger(__name__)

PLAIN, BRANCHED = "plain", "branched"  # the two expert sets


@dataclass
class ExpertSet:
    """K experts trained from one model: `plain` from the base, `branched` from the folded
    multitask model (`model_dir`, with its fingerprint)."""

    name: str
    model_dir: Path
    fingerprint: str
    experts: list[ExpertResult]

    def folder(self, expert_id: int) -> str:
        """The expert's library-relative folder."""
        if self.name == BRANCHED:
            return branching.expert_dirname(expert_id)
        return expert_dirname(expert_id)


@dataclass(frozen=True)
class ExpertSets:
    """What stage 4 trained: one or both expert sets, by name, the multitask adapter and the
    compute-matched one (twice the epochs; trained with the branched set)."""

    sets: dict[str, ExpertSet]  # plain and/or branched, in that order
    multitask: ExpertResult | None
    matched: ExpertResult | None = None


def trains_matched(cfg: BuildConfig) -> bool:
    """Whether the build trains the compute-matched baseline: with the branched experts (a
    plain library's multitask adapter is compute-matched already), unless turned off."""
    return cfg.compute_matched and cfg.trains_multitask and cfg.branch_mode != "off"


def train_settings(cfg: BuildConfig) -> TrainSettings:
    """The LoRA training knobs of the build, as every adapter job carries them."""
    return TrainSettings(
        rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
        lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
        adam_betas=tuple(cfg.adam_betas), adam_eps=cfg.adam_eps, epochs=cfg.epochs,
        max_tokens=cfg.max_tokens, shared_a=cfg.shared_a, threads=cfg.torch_threads)


def expert_jobs(ctx: BuildContext, texts: Sequence[str], members: Sequence[np.ndarray],
                s: ExpertSet) -> list[ExpertJob]:
    """One job per expert of set `s`, trained from `s.model_dir` on its cluster."""
    label = "expert" if s.name == PLAIN else "branched expert"
    settings = train_settings(ctx.cfg)
    return [ExpertJob(name=f"{label} {k}", expert_id=k, base_model=str(s.model_dir),
                      base_fingerprint=s.fingerprint, texts=tuple(texts[i] for i in ids),
                      settings=settings, seed=ctx.cfg.seed + k,
                      out_dir=str(ctx.out / s.folder(k)))
            for k, ids in enumerate(members)]


def run_share(ctx: BuildContext, jobs: Sequence[ExpertJob]) -> dict[str, ExpertResult]:
    """Train this shard's share of `jobs` (every n-th), locally or on Ray; by job name."""
    cfg = ctx.cfg
    i, n = cfg.shard_index
    mine = [j for idx, j in enumerate(jobs) if idx % n == i]
    if not mine:
        return {}
    manifest = ctx.out / MANIFEST
    if manifest.exists() and any(finished(j) is None for j in mine):
        # experts are about to change under an existing library: unpublish it first, so
        # nobody opens a manifest whose checksums no longer hold (rewritten at the end)
        log.warning("retraining experts of the existing library %s: removing its "
                    "manifest until the build finishes", ctx.out)
        manifest.unlink()
    if cfg.ray is not None:  # one Ray task per expert (training/ray_build.py)
        from training.ray_build import RayOptions, train_on_ray

        results = train_on_ray(mine, RayOptions.from_config(cfg))
    else:
        results = train_all(mine, workers=cfg.workers)
    return {r.name: r for r in results}


def fold_multitask(ctx: BuildContext, multitask_sha: str) -> tuple[Path, str]:
    """The base with the multitask adapter folded in (`branched/base`, a cached stage), and
    its fingerprint (which the branched experts' jobs carry: a new fold retrains them)."""
    out_dir = ctx.out / branching.BASE
    ctx.stage("fold", {"base": ctx.base_fingerprint, "multitask": multitask_sha},
              [out_dir / "config.json"],
              lambda: branching.fold_adapter(ctx.base, ctx.out / mt.FOLDER, out_dir))
    return out_dir, model_fingerprint(out_dir)


def train_expert_sets(ctx: BuildContext, corpus: Corpus,
                      members: Sequence[np.ndarray]) -> ExpertSets | None:
    """Stage 4: the plain experts and the multitask adapter, then (once the multitask adapter
    exists) the folded base and the branched experts. None while another shard's adapters
    are missing."""
    cfg = ctx.cfg
    texts = corpus.texts
    mode = cfg.branch_mode
    plain = ExpertSet(PLAIN, ctx.base, ctx.base_fingerprint, [])
    first = [] if mode == "on" else expert_jobs(ctx, texts, members, plain)
    mt_job = matched_job = None
    if cfg.trains_multitask:
        # the baseline trains as usual, its A included, even when the experts share one A
        order = mt.multitask_order(members, cfg.seed)
        mt_job = mt.multitask_job(
            texts, order, base_model=str(ctx.base), base_fingerprint=ctx.base_fingerprint,
            settings=mt.baseline_settings(train_settings(cfg)), seed=cfg.seed,
            out_dir=str(ctx.out / mt.FOLDER))
        if trains_matched(cfg):  # the same job, twice the epochs
            matched_job = mt.multitask_job(
                texts, order, base_model=str(ctx.base), base_fingerprint=ctx.base_fingerprint,
                settings=mt.matched_settings(train_settings(cfg)), seed=cfg.seed,
                out_dir=str(ctx.out / mt.MATCHED_FOLDER), name=mt.MATCHED_NAME)
    baselines = [j for j in (mt_job, matched_job) if j is not None]
    t0 = time.perf_counter()
    done = run_share(ctx, first + baselines)
    branched, second = None, []
    if mt_job is not None and mode != "off" and finished(mt_job) is not None:
        folded_dir, folded_fp = fold_multitask(ctx, finished(mt_job)["sha256"])
        branched = ExpertSet(BRANCHED, folded_dir, folded_fp, [])
        second = expert_jobs(ctx, texts, members, branched)
        done.update(run_share(ctx, second))
    trained = [r for r in done.values() if not r.skipped]
    # wall time of this run's training, then each adapter's own training time (from the
    # records, so a resumed build still reports what its experts cost)
    ctx.timings["train"] = {"seconds": round(time.perf_counter() - t0, 2),
                            "cached": not trained, "trained": len(trained),
                            "skipped": len(done) - len(trained)}
    missing = []
    for job in first + baselines + second:
        if job.name in done:
            continue
        rec = finished(job)
        if rec is None:
            missing.append(job.name)
        else:
            done[job.name] = ExpertResult(job.name, job.expert_id, job.out_dir,
                                          rec["sha256"], rec.get("metrics", {}), True)
    if missing:
        log.info("shard %s done; still missing: %s. The last shard to finish, or a rerun "
                 "without --shard, writes the library (branched experts start once the "
                 "multitask adapter exists).", cfg.shard, ", ".join(missing))
        return None
    sets = {}
    for s, jobs, label in ((plain, first, "train: experts"),
                           (branched, second, "train: branched experts")):
        if s is None or not jobs:
            continue
        s.experts = [done[j.name] for j in jobs]
        sets[s.name] = s
        ctx.timings[label] = {
            "seconds": round(sum(e.metrics.get("seconds", 0) for e in s.experts), 2),
            "cached": all(e.skipped for e in s.experts)}
    multitask, matched = done.get(mt.NAME), done.get(mt.MATCHED_NAME)
    for label, r in (("train: multitask", multitask),
                     ("train: multitask, compute-matched", matched)):
        if r is not None:
            ctx.timings[label] = {"seconds": r.metrics.get("seconds"), "cached": r.skipped}
    return ExpertSets(sets, multitask, matched)
