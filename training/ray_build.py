"""Stage 4 on a Ray cluster: one Ray task per expert, with no shared filesystem.

`ttmm build --ray [ADDRESS]` trains the experts with `train_on_ray` instead of
`training.experts.train_all`; everything else in the build is unchanged, and so is the promise:
the same jobs give the same adapters (training/experts.py: the seed fixes the initialisation,
the job fixes the data order), finished experts are skipped, and a failing expert is named
while every finished one is kept.

How the data moves (nothing assumes the workers see the driver's disks):
- the base model folder is read once by the driver and put into Ray's object store as one
  object; a worker writes it to its node's temporary folder once (keyed by a digest of every
  file, checked on arrival) and every later task on that node reuses the copy;
- each expert's job (its documents in training order, settings, seed) is its own object;
- a finished expert comes back as the bytes of its PEFT folder (safetensors, adapter config,
  the training record with metrics and sha256). The driver checks the checksum and writes the
  folder atomically (a temporary sibling, then a rename) into the library.

Failures: a task whose worker process dies (killed, out of memory, node lost) is rerun by Ray
up to `retries` times; an exception inside training is not retried (training is deterministic,
so it would fail again) and is reported with the expert's name at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from training.experts import (
    RECORD,
    ExpertJob,
    ExpertResult,
    finished,
    raise_failures,
    save_adapter,
    split_finished,
    train_adapter,
)
from ttmm_vllm.library import ADAPTER_WEIGHTS, atomic_write_bytes
from ttmm_vllm.ray_runtime import LOCAL, ray_runtime

log = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass(frozen=True)
class RayOptions:
    """Where the expert tasks run and what each one reserves."""

    address: str = LOCAL  # "local", "auto", or a cluster address (ttmm_vllm.ray_runtime)
    cpus: float = 1.0  # CPUs per task; also its torch threads when `threads` is 0
    gpus: float = 0.0
    memory_gib: float | None = None  # a scheduling reservation, not a limit
    retries: int = 3  # reruns of a task whose worker died
    threads: int = 0  # torch threads per task (0: max(1, int(cpus)))

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the Ray address must not be empty (use 'local' or 'auto')")
        if self.cpus <= 0:
            raise ValueError(f"ray cpus per task must be > 0, got {self.cpus}")
        if self.gpus < 0:
            raise ValueError(f"ray gpus per task must be >= 0, got {self.gpus}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError(f"ray memory per task must be > 0 GiB, got {self.memory_gib}")
        if self.retries < 0:
            raise ValueError(f"ray retries must be >= 0, got {self.retries}")

    @classmethod
    def from_config(cls, cfg) -> RayOptions:
        """From a training.config.BuildConfig whose `ray` is set."""
        return cls(address=cfg.ray, cpus=cfg.ray_cpus, gpus=cfg.ray_gpus,
                   memory_gib=cfg.ray_memory, retries=cfg.ray_retries, threads=cfg.threads)

    @property
    def task_threads(self) -> int:
        return self.threads or max(1, int(self.cpus))


@dataclass(frozen=True)
class ModelBox:
    """A base model folder in the object store. The reference sits inside a dataclass so Ray
    does not fetch it before the task runs: a worker whose node already has the folder never
    pulls the bytes."""

    digest: str  # files_digest of the folder: the node cache's key
    files: Any  # ray.ObjectRef to dict[str, bytes] (relative path -> content)
    nbytes: int


@dataclass
class PackedExpert:
    """A trained adapter folder as bytes: what a task returns to the driver."""

    name: str
    files: dict[str, bytes]  # file name -> content (adapter weights, config, record)
    sha256: str  # of the weights file
    metrics: dict[str, Any] = field(default_factory=dict)
    host: str = ""
    pid: int = 0


# --------------------------------------------------------------------------- worker side


def model_files(model_dir: str | os.PathLike) -> dict[str, bytes]:
    """Every regular file of a model folder (hidden files such as digest caches left out)."""
    root = Path(model_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = p.read_bytes()
    return out


def files_digest(files: dict[str, bytes]) -> str:
    """sha256 over every file's path and content (tokenizer files included, unlike the
    library's model fingerprint, which covers config and weights)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\x00" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:32]


def node_model_dir(box: ModelBox, cache_root: str | os.PathLike | None = None) -> Path:
    """This node's copy of the boxed model, written once (atomically) and then reused."""
    import fcntl

    import ray

    root = Path(cache_root or tempfile.gettempdir()) / "ttmm-ray" / "models"
    final = root / box.digest
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # One writer per node (the others wait, then reuse its copy); the rename publishes it.
    with open(root / f".{box.digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{box.digest}.", dir=root))
        try:
            files = ray.get(box.files)
            if files_digest(files) != box.digest:
                raise OSError("the base model's bytes changed on the way to this node")
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            del files
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def train_packed(job: ExpertJob, model: ModelBox) -> PackedExpert:
    """The body of one Ray task: train `job` on this node's copy of the base model and return
    the adapter folder as bytes. The folder is the one `save_adapter` writes for a local build
    (same config, same record), so the driver's library is byte-for-byte what a local build
    writes."""
    import socket

    local = node_model_dir(model)
    trained = train_adapter(replace(job, base_model=str(local)))
    with tempfile.TemporaryDirectory(prefix="ttmm-expert-") as tmp:
        res = save_adapter(replace(job, out_dir=str(Path(tmp) / "adapter")), trained)
        files = {p.name: p.read_bytes() for p in Path(res.out_dir).iterdir() if p.is_file()}
    return PackedExpert(job.name, files, res.sha256, trained.metrics, socket.gethostname(),
                        os.getpid())


# --------------------------------------------------------------------------- driver side


class ExpertIntegrityError(RuntimeError):
    pass


def install(job: ExpertJob, packed: PackedExpert) -> ExpertResult:
    """Write a returned adapter folder into place atomically, after checking its checksum."""
    weights = packed.files.get(ADAPTER_WEIGHTS)
    if weights is None or hashlib.sha256(weights).hexdigest() != packed.sha256:
        raise ExpertIntegrityError(f"{job.name}: the returned weights do not match their "
                                   "sha256")
    bad = [n for n in packed.files if Path(n).name != n or n.startswith(".")]
    if bad:
        raise ExpertIntegrityError(f"{job.name}: unexpected file names {bad}")
    final = Path(job.out_dir)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"  # swept by _clean_temporaries
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in packed.files.items():
        atomic_write_bytes(tmp / name, data)
    if final.exists():  # a stale or corrupted earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    if finished(job) is None:
        raise ExpertIntegrityError(f"{job.name}: {final} does not check out after writing "
                                   f"(its {RECORD} is for another job)")
    return ExpertResult(job.name, job.expert_id, str(final), packed.sha256, packed.metrics)


def _object_store_bytes(model_bytes: int) -> int:
    """A local Ray's object store: the base model plus room for jobs and results."""
    return max(512 << 20, int(model_bytes * 1.25) + (256 << 20))


def _cause(e: BaseException) -> BaseException:
    """The training exception inside Ray's wrapper, when there is one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def train_on_ray(jobs: Sequence[ExpertJob], options: RayOptions,
                 desc: str = "experts") -> list[ExpertResult]:
    """Run every job as a Ray task (skipping finished ones); same contract as `train_all`."""
    results, todo = split_finished(jobs)
    if not todo:
        return sorted(results, key=lambda r: r.expert_id)

    bases = sorted({j.base_model for j in todo})
    sizes = {b: sum(p.stat().st_size for p in Path(b).rglob("*") if p.is_file())
             for b in bases}
    failures: dict[str, BaseException] = {}
    with ray_runtime(options.address, object_store_bytes=_object_store_bytes(sum(
            sizes.values()))):
        import ray

        t0 = time.perf_counter()
        boxes = {}
        for b in bases:
            files = model_files(b)
            boxes[b] = ModelBox(files_digest(files), ray.put(files), sizes[b])
            del files
        log.info("base model in the object store (%.0f MB) in %.1fs; %d expert tasks on %s",
                 sum(sizes.values()) / 1e6, time.perf_counter() - t0, len(todo),
                 ray.cluster_resources())
        task = ray.remote(train_packed)
        task_options: dict[str, Any] = {"num_cpus": options.cpus, "num_gpus": options.gpus,
                                        "max_retries": options.retries,
                                        "retry_exceptions": False}
        if options.memory_gib:
            task_options["memory"] = int(options.memory_gib * _GIB)
        pending: dict[Any, ExpertJob] = {}
        for job in todo:
            quiet = replace(job, settings=replace(job.settings, progress=False,
                                                  threads=options.task_threads))
            ref = task.options(name=f"ttmm {job.name}", **task_options).remote(
                ray.put(quiet), boxes[job.base_model])
            pending[ref] = job
        bar = tqdm(total=len(jobs), initial=len(results), desc=desc, unit="expert")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    packed = ray.get(ready[0])
                    res = install(job, packed)
                except Exception as e:  # noqa: BLE001 - reported together below
                    failures[job.name] = _cause(e)
                    log.error("%s failed: %s", job.name, _cause(e))
                    continue
                results.append(res)
                m = res.metrics
                log.info("%s: trained on %s (pid %s) on %s documents, %s tokens in %ss "
                         "(loss %.3f -> %.3f)", res.name, packed.host, packed.pid,
                         m.get("documents"), m.get("tokens"), m.get("seconds"),
                         m.get("loss_first", float("nan")), m.get("loss_last", float("nan")))
                bar.update(1)
        finally:
            bar.close()
            for ref in pending:  # interrupted: do not leave tasks running on the cluster
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    raise_failures(failures)
    return sorted(results, key=lambda r: r.expert_id)
