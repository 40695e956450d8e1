"""Stage 4: one LoRA adapter per cluster, trained with PEFT for one epoch (the paper, step 2).

The unit of work is an `ExpertJob`: plain, picklable data (the base model folder, the training
texts in training order, the settings, the seed, the output folder). `train_expert(job)` runs
one job in any process, a local worker or a Ray task; `train_adapter(job)` is the part that
writes nothing, for a caller that wants the tensors back instead of a folder.

Every adapter folder is written atomically (a temporary folder, then a rename) with a record
(`ttmm-train.json`: the weights' sha256 and the job's fingerprint), so a killed build resumes
by skipping every folder whose record checks out. Training is deterministic given the job:
the seed fixes the LoRA initialisation, the job fixes the data order.

Shared A (`TrainSettings.shared_a`, `ttmm build --shared-a`): every expert's lora_A is the same
seeded random matrix per module, drawn from `SHARED_A_SEED` (not the job's seed, so every
expert of every build of the same model and rank gets the same A, an expert trained later
included) and frozen; only B trains. Then sum_k w_k s B_k A = (sum_k w_k s B_k) A: a merge of
any number of experts is exact at rank r.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ttmm_vllm.library import ADAPTER_WEIGHTS, atomic_write_json, sha256_file, write_adapter

log = logging.getLogger(__name__)

RECORD = "ttmm-train.json"
_PEFT_PREFIX = "base_model.model."
SHARED_A_SEED = 0  # the seed of the shared A; part of a shared-A job's fingerprint


@dataclass(frozen=True)
class TrainSettings:
    """How to train one adapter; the paper's Table 3 defaults (rank 16 instead of 64)."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()
    lr: float = 2e-4
    batch_size: int = 4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    epochs: int = 1
    max_tokens: int = 1024
    shared_a: bool = False  # one frozen, seeded A per module for every expert; B trains
    # Not part of what is trained (left out of the fingerprint):
    threads: int = 0  # torch threads in the training process (0: leave torch's default)
    progress: bool = True  # a per-step bar (off in worker processes)


@dataclass(frozen=True)
class ExpertJob:
    name: str  # "expert 3", "multitask": for logs and errors
    expert_id: int  # -1 for adapters that are not experts
    base_model: str  # model folder the adapter is trained on
    base_fingerprint: str  # ttmm_vllm.library.model_fingerprint of that folder
    texts: tuple[str, ...]  # training documents, in training order
    settings: TrainSettings
    seed: int
    out_dir: str  # the adapter folder to (atomically) create

    def fingerprint(self) -> str:
        """What the adapter depends on: a finished folder with another fingerprint is stale."""
        s = asdict(self.settings)
        s.pop("threads")
        s.pop("progress")
        if s.pop("shared_a"):  # absent when off: fingerprints of plain jobs stay as they were
            s["shared_a_seed"] = SHARED_A_SEED
        texts = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()
        key = {"settings": s, "base": self.base_fingerprint, "seed": self.seed,
               "texts": texts, "n": len(self.texts)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainedAdapter:
    """A trained adapter in memory: module -> (A (r, in), B (out, r)) and how training went."""

    modules: dict[str, tuple[Any, Any]]
    metrics: dict[str, Any]


@dataclass
class ExpertResult:
    name: str
    expert_id: int
    out_dir: str
    sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # already finished (resume)


# --------------------------------------------------------------------------- training


def _batches(token_ids: Sequence[Sequence[int]], batch_size: int):
    for start in range(0, len(token_ids), batch_size):
        yield token_ids[start:start + batch_size]


def _collate(batch: Sequence[Sequence[int]], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 on padding)."""
    import torch

    width = max(len(t) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(t)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train_adapter(job: ExpertJob, on_epoch: Callable[[int, dict[str, tuple[Any, Any]]], None]
                  | None = None) -> TrainedAdapter:
    """Train one LoRA adapter on `job.texts` (in that order); writes nothing.

    on_epoch(epoch, modules) is called after each epoch with a copy of the adapter so far:
    the learning rate is constant and epoch 0 visits the documents in job order, so the
    snapshot after epoch 0 of a 2-epoch job is exactly the 1-epoch adapter (one run gives
    the equal-data and the compute-matched baselines)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = job.settings
    if not job.texts:
        raise ValueError(f"{job.name}: no training documents")
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(job.seed)  # LoRA A's initialisation
    lora = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(s.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if s.shared_a:
        share_a(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.adam_betas), eps=s.adam_eps,
                            weight_decay=s.weight_decay)

    token_ids = [t[:s.max_tokens] for t in
                 tokenizer(list(job.texts), add_special_tokens=False)["input_ids"]]
    steps_per_epoch = -(-len(token_ids) // s.batch_size)
    losses: list[float] = []
    trained_tokens = 0
    bar = tqdm(total=steps_per_epoch * s.epochs, desc=job.name, unit="step", leave=False,
               disable=not s.progress)
    import numpy as np

    for epoch in range(s.epochs):
        order = np.arange(len(token_ids)) if epoch == 0 else \
            np.random.default_rng(job.seed + epoch).permutation(len(token_ids))
        for batch in _batches([token_ids[i] for i in order], s.batch_size):
            ids, mask, labels = _collate(batch, pad_id)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            if not torch.isfinite(out.loss.detach()):
                raise FloatingPointError(f"{job.name}: loss became {out.loss.item()} at step "
                                         f"{len(losses)}; lower the learning rate")
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            trained_tokens += int((labels[:, 1:] != -100).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, _adapter_modules(get_peft_model_state_dict(model)))
    bar.close()

    modules = _adapter_modules(get_peft_model_state_dict(model))
    seconds = time.perf_counter() - t0
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {
        "documents": len(token_ids),
        "tokens": trained_tokens,
        "steps": len(losses),
        "loss_first": float(np.mean(head)),
        "loss_last": float(np.mean(tail)),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(trained_tokens / seconds, 1) if seconds > 0 else None,
    }
    return TrainedAdapter(modules, metrics)


def _adapter_modules(state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """PEFT's state dict -> module name -> (A, B), float32 copies."""
    import torch

    modules: dict[str, list[Any]] = {}
    for key, t in state.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        mod, part = name.split(".lora_")
        slot = 0 if part.startswith("A") else 1
        modules.setdefault(mod, [None, None])[slot] = t.detach().to(torch.float32).clone()
    return {m: (a, b) for m, (a, b) in modules.items()}


def share_a(model) -> None:
    """Set every lora_A of a PEFT model to the shared A and freeze it.

    Each module's A is drawn from its own generator, seeded by `SHARED_A_SEED` and the
    module's name (as the library names it, e.g. `model.layers.0.self_attn.q_proj`), with
    PEFT's default distribution (kaiming-uniform with a=sqrt(5): uniform in
    +-1/sqrt(in_features)). So A depends on the module and its shape only: never on the
    job's seed, its data, or the order modules are visited in.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
            for lora_a in module.lora_A.values():
                weight = lora_a.weight  # (r, in)
                seed = int.from_bytes(hashlib.sha256(
                    f"{SHARED_A_SEED}:{name}".encode()).digest()[:8], "little")
                gen = torch.Generator().manual_seed(seed)
                bound = 1.0 / weight.shape[1] ** 0.5
                shared = (torch.rand(weight.shape, generator=gen, dtype=torch.float64) * 2 - 1)
                weight.copy_((shared * bound).to(weight.dtype))
                weight.requires_grad_(False)


# --------------------------------------------------------------------------- folders


def read_record(out_dir: str | os.PathLike) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(out_dir) / RECORD).read_text())
    return None


def finished(job: ExpertJob) -> dict | None:
    """The folder's record if the job is done: weights present, checksum and fingerprint match."""
    d = Path(job.out_dir)
    rec = read_record(d)
    if rec is None or not (d / ADAPTER_WEIGHTS).exists():
        return None
    if rec.get("job") != job.fingerprint():
        log.warning("%s: %s was trained from other data or settings; retraining",
                    job.name, d)
        return None
    if sha256_file(d / ADAPTER_WEIGHTS) != rec.get("sha256"):
        log.warning("%s: %s does not match its checksum record; retraining", job.name, d)
        return None
    return rec


def save_adapter(job: ExpertJob, trained: TrainedAdapter) -> ExpertResult:
    """Write the PEFT folder into a temporary sibling, then rename it into place."""
    final = Path(job.out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    s = job.settings
    sha = write_adapter(tmp, trained.modules, rank=s.rank, alpha=s.alpha,
                        base_model_name=job.base_model, target_modules=s.target_modules)
    atomic_write_json(tmp / RECORD, {"name": job.name, "expert_id": job.expert_id,
                                     "sha256": sha, "job": job.fingerprint(),
                                     "metrics": trained.metrics})
    if final.exists():  # a stale or corrupted earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    return ExpertResult(job.name, job.expert_id, str(final), sha, trained.metrics)


def train_expert(job: ExpertJob) -> ExpertResult:
    """Train and save one expert, or skip it when its folder is already finished."""
    rec = finished(job)
    if rec is not None:
        return ExpertResult(job.name, job.expert_id, job.out_dir, rec["sha256"],
                            rec.get("metrics", {}), skipped=True)
    return save_adapter(job, train_adapter(job))


def _clean_temporaries(jobs: Sequence[ExpertJob]) -> None:
    """Remove half-written folders a killed run left for these jobs (not other shards')."""
    for job in jobs:
        d = Path(job.out_dir)
        for tmp in d.parent.glob(f".{d.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def split_finished(jobs: Sequence[ExpertJob]) -> tuple[list[ExpertResult], list[ExpertJob]]:
    """(results of the jobs already done, the jobs left): what a resumed build skips."""
    _clean_temporaries(jobs)
    results: list[ExpertResult] = []
    todo: list[ExpertJob] = []
    for job in jobs:
        rec = finished(job)
        if rec is not None:
            log.info("%s: already trained (%s, sha256 %s...), skipping", job.name, job.out_dir,
                     rec["sha256"][:12])
            results.append(ExpertResult(job.name, job.expert_id, job.out_dir, rec["sha256"],
                                        rec.get("metrics", {}), skipped=True))
        else:
            todo.append(job)
    return results, todo


def train_all(jobs: Sequence[ExpertJob], *, workers: int = 1,
              desc: str = "experts") -> list[ExpertResult]:
    """Run every job (skipping finished ones), `workers` processes at a time.

    A failing job does not stop the others: every finished expert is kept, and the error
    raised at the end names each one that failed.
    """
    results, todo = split_finished(jobs)
    failures: dict[str, BaseException] = {}
    bar = tqdm(total=len(jobs), initial=len(results), desc=desc, unit="expert")

    def done(res: ExpertResult) -> None:
        results.append(res)
        m = res.metrics
        log.info("%s: trained on %s documents, %s tokens in %ss (loss %.3f -> %.3f)",
                 res.name, m.get("documents"), m.get("tokens"), m.get("seconds"),
                 m.get("loss_first", float("nan")), m.get("loss_last", float("nan")))
        bar.update(1)

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            try:
                done(train_expert(job))
            except Exception as e:  # noqa: BLE001 - reported together below
                log.error("%s failed: %s", job.name, e)
                failures[job.name] = e
    else:
        import multiprocessing as mp

        quiet = [_without_progress(j) for j in todo]
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(train_expert, j): j for j in quiet}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    done(fut.result())
                except Exception as e:  # noqa: BLE001 - reported together below
                    log.error("%s failed: %s", job.name, e)
                    failures[job.name] = e
    bar.close()
    raise_failures(failures)
    return sorted(results, key=lambda r: r.expert_id)


def raise_failures(failures: dict[str, BaseException]) -> None:
    """One error for every expert that failed, after the others finished: a build reports all
    of its failures at once, and what did finish is already on disk for the rerun."""
    if failures:
        names = ", ".join(sorted(failures))
        first = next(iter(failures.values()))
        raise RuntimeError(f"training failed for {names} (first error: {first}); finished "
                           "experts are kept, rerun to resume") from first


def _without_progress(job: ExpertJob) -> ExpertJob:
    from dataclasses import replace

    return replace(job, settings=replace(job.settings, progress=False))
