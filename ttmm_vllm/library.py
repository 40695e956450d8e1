"""The expert library: the contract between train time (`training/`) and serve time.

A library is a directory:

    manifest.json          format version, base model + fingerprint, embedder, LoRA spec,
                           router defaults, one entry per expert (id, title, size, file, sha256)
    centroids.npy          (K, d) float32, each row the re-normalised mean embedding of a cluster
    index.bin              hnswlib index over the centroids (inner-product space, label = expert id)
    experts/0000/          one PEFT adapter folder per expert (adapter_config.json +
                           adapter_model.safetensors), loadable alone by PEFT or vLLM
    assignments.npy        cluster id per corpus document (-1: not used)
    holdout.jsonl          held-out documents per cluster, for tuning and evaluation
    base/                  optional: a folded base checkpoint (branch-from-multitask builds)

Train time writes it with the helpers below; serve time opens it with `Library.open`, which
validates it and refuses, with an error that names what is wrong, a missing or corrupted expert,
a mismatched base model or embedder, or an unknown format version. Only safetensors are read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "ttmm-library"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CENTROIDS = "centroids.npy"
INDEX = "index.bin"
ASSIGNMENTS = "assignments.npy"
HOLDOUT = "holdout.jsonl"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PENDING_EXPERT = "ttmm-expert.json"

# The seven projections of a Llama block: the default LoRA targets.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LibraryError(ValueError):
    """A library that cannot be served as it is; the message names the part that is wrong."""


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelRef:
    """A model named by what it is (fingerprint), not only by where it was (path)."""

    name: str
    fingerprint: str
    path: str = ""  # where it was at build time: a hint, relative paths are library-relative


@dataclass(frozen=True)
class EmbedderRef:
    """The query/centroid embedding. kind: "sentence-transformers" or "base-hidden"."""

    name: str
    dim: int
    kind: str = "sentence-transformers"
    path: str = ""


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS


@dataclass(frozen=True)
class RouterDefaults:
    """Routing defaults tuned on the library's holdout (see training/tune.py)."""

    beta: float = 0.05
    tau: float = 0.01
    query_tokens: int = 50
    max_active: int = 10
    # "paper": ReLU(softmax - tau), renormalised. "threshold": keep softmax > tau, renormalise
    # (the paper's public code).
    sparse_softmax: str = "paper"
    # Top-M candidates searched in the index before the softmax (0: all experts).
    top_m: int = 0
    # Below this top similarity a prompt is flagged as out of reach (None: never).
    ood_threshold: float | None = None


@dataclass(frozen=True)
class ExpertInfo:
    id: int
    title: str
    size: int  # training documents
    file: str  # adapter folder, relative to the library
    sha256: str  # of the adapter's safetensors file
    rank: int
    alpha: float
    group: str = "default"
    deleted: bool = False


@dataclass(frozen=True)
class Manifest:
    base_model: ModelRef
    embedder: EmbedderRef
    lora: LoraSpec
    router: RouterDefaults
    experts: tuple[ExpertInfo, ...]
    # The model served under the experts: the base itself, or a folded checkpoint in the
    # library (branch-from-multitask). None means base_model.
    serving_base: ModelRef | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def active_experts(self) -> tuple[ExpertInfo, ...]:
        return tuple(e for e in self.experts if not e.deleted)

    @property
    def served_model(self) -> ModelRef:
        return self.serving_base or self.base_model

    def expert(self, expert_id: int) -> ExpertInfo:
        for e in self.experts:
            if e.id == expert_id:
                return e
        raise LibraryError(f"unknown expert id {expert_id}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extras"] = dict(self.extras)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise LibraryError(f"not a ttmm library manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise LibraryError(
                f"unknown library format version {version!r}; this ttmm-vllm reads version "
                f"{FORMAT_VERSION}"
            )
        try:
            lora = dict(d["lora"])
            lora["target_modules"] = tuple(lora["target_modules"])
            return cls(
                base_model=ModelRef(**d["base_model"]),
                embedder=EmbedderRef(**d["embedder"]),
                lora=LoraSpec(**lora),
                router=RouterDefaults(**d["router"]),
                experts=tuple(ExpertInfo(**e) for e in d["experts"]),
                serving_base=ModelRef(**d["serving_base"]) if d.get("serving_base") else None,
                extras=dict(d.get("extras") or {}),
            )
        except (KeyError, TypeError) as e:
            raise LibraryError(f"manifest.json is malformed: {e}") from e


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a Hugging Face model folder's config and weights.

    The weights' digests are cached beside them (keyed by size and mtime), so a server start
    does not re-hash hundreds of MB each time.
    """
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.exists():
        raise LibraryError(f"{model_dir} is not a model folder (no config.json)")
    cfg = json.loads(config.read_text())
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise LibraryError(f"{model_dir} has no *.safetensors weights")
    cache_file = model_dir / ".ttmm-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    for w in weights:
        st = w.stat()
        key = f"{w.name}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(w)
            changed = True
        h.update(w.name.encode())
        h.update(cache[key].encode())
    if changed:
        with contextlib.suppress(OSError):  # a read-only model folder: hash again next time
            atomic_write_json(cache_file, cache)
    return h.hexdigest()[:16]


def expert_dirname(expert_id: int) -> str:
    return f"experts/{expert_id:04d}"


# --------------------------------------------------------------------------- expert weights


@dataclass
class ExpertWeights:
    """One LoRA expert as plain tensors: module name -> (A (r, in), B (out, r)), and its scaling.

    Module names are the model's own (`model.layers.0.self_attn.q_proj`), without PEFT's
    `base_model.model.` prefix, so the merge and the vLLM plugin share them.
    """

    expert_id: int
    modules: dict[str, tuple[Any, Any]]  # torch tensors
    scaling: float  # alpha / r
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.modules.values())


_PEFT_PREFIX = "base_model.model."


def read_adapter(adapter_dir: str | os.PathLike, expert_id: int = -1) -> ExpertWeights:
    """Read a PEFT LoRA adapter folder (safetensors only, memory-mapped)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise LibraryError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors are read)")
    cfg = json.loads(cfg_path.read_text())
    rank = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        scaling = alpha / rank**0.5
    else:
        scaling = alpha / rank
    tensors = load_file(str(weights_path))
    modules: dict[str, list[Any]] = {}
    for key, t in tensors.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if ".lora_A." in name:
            mod, slot = name.split(".lora_A.")[0], 0
        elif ".lora_B." in name:
            mod, slot = name.split(".lora_B.")[0], 1
        else:
            raise LibraryError(f"{weights_path}: unexpected tensor {key!r} (LoRA A/B only)")
        modules.setdefault(mod, [None, None])[slot] = t
    for mod, (a, b) in modules.items():
        if a is None or b is None:
            raise LibraryError(f"{weights_path}: module {mod} lacks lora_A or lora_B")
    return ExpertWeights(expert_id, {m: (a, b) for m, (a, b) in modules.items()}, scaling, rank)


def write_adapter(
    adapter_dir: str | os.PathLike,
    modules: Mapping[str, tuple[Any, Any]],
    *,
    rank: int,
    alpha: float,
    base_model_name: str = "",
    target_modules: Iterable[str] | None = None,
) -> str:
    """Write a PEFT-format adapter folder atomically; returns the weights' sha256.

    Used for merged (rank-expanded) adapters and by train time; the folder loads in PEFT
    (`PeftModel.from_pretrained`) and in vLLM (`LoRARequest`).
    """
    from safetensors.torch import save

    adapter_dir = Path(adapter_dir)
    tensors = {}
    for mod, (a, b) in modules.items():
        tensors[f"{_PEFT_PREFIX}{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{mod}.lora_B.weight"] = b.contiguous()
    if target_modules is None:
        target_modules = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(alpha),
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    data = save(tensors)
    atomic_write_bytes(adapter_dir / ADAPTER_WEIGHTS, data)
    atomic_write_json(adapter_dir / ADAPTER_CONFIG, config)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the library


class Library:
    """An opened, validated library. Cheap to open; expert tensors are read on demand."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self._centroids: np.ndarray | None = None

    # ---- opening and validation

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        *,
        verify_checksums: bool = True,
        base_model_dir: str | os.PathLike | None = None,
        embedder_dim: int | None = None,
        embedder_name: str | None = None,
    ) -> Library:
        """Open and validate. Every check failure raises LibraryError naming the culprit.

        base_model_dir: the folder the server will load; its fingerprint must match the
        manifest's served model. embedder_*: what the server embeds queries with.
        """
        root = Path(root).expanduser().resolve()
        mpath = root / MANIFEST
        if not root.is_dir():
            raise LibraryError(f"library directory {root} does not exist")
        if not mpath.exists():
            raise LibraryError(f"{root} is not a ttmm library (no {MANIFEST})")
        try:
            raw = json.loads(mpath.read_text())
        except ValueError as e:
            raise LibraryError(f"{mpath} is not valid JSON: {e}") from e
        lib = cls(root, Manifest.from_json(raw))
        lib.validate(verify_checksums=verify_checksums)
        if base_model_dir is not None:
            lib.check_base_model(base_model_dir)
        if embedder_dim is not None and embedder_dim != lib.manifest.embedder.dim:
            raise LibraryError(
                f"embedder dimension {embedder_dim} does not match the library's "
                f"{lib.manifest.embedder.name} ({lib.manifest.embedder.dim})"
            )
        if embedder_name is not None and embedder_name != lib.manifest.embedder.name:
            raise LibraryError(
                f"embedder {embedder_name!r} is not the library's {lib.manifest.embedder.name!r}"
            )
        return lib

    def validate(self, verify_checksums: bool = True) -> None:
        m = self.manifest
        ids = [e.id for e in m.experts]
        if len(set(ids)) != len(ids):
            raise LibraryError("manifest lists an expert id twice")
        if not m.active_experts:
            raise LibraryError("library has no experts")
        cpath = self.root / CENTROIDS
        if not cpath.exists():
            raise LibraryError(f"missing {CENTROIDS}")
        cent = self.centroids
        if cent.ndim != 2 or cent.shape[1] != m.embedder.dim:
            raise LibraryError(
                f"{CENTROIDS} has shape {cent.shape}, expected (K, {m.embedder.dim})"
            )
        if cent.shape[0] <= max(ids):
            raise LibraryError(f"{CENTROIDS} has {cent.shape[0]} rows; expert id {max(ids)} "
                               "has no centroid")
        if not np.all(np.isfinite(cent)):
            raise LibraryError(f"{CENTROIDS} contains NaN or infinite values")
        if not (self.root / INDEX).exists():
            raise LibraryError(f"missing {INDEX} (the hnswlib centroid index)")
        for e in m.active_experts:
            self.check_expert(e, verify_checksum=verify_checksums)
        if m.serving_base is not None:
            base_dir = self.served_model_dir()
            if not base_dir.exists():
                raise LibraryError(f"folded base checkpoint {base_dir} is missing")

    def check_expert(self, e: ExpertInfo, verify_checksum: bool = True) -> None:
        d = self.resolve(e.file)
        w = d / ADAPTER_WEIGHTS
        if not (d / ADAPTER_CONFIG).exists() or not w.exists():
            raise LibraryError(f"expert {e.id} ({e.title!r}): adapter files missing in {d}")
        if verify_checksum:
            got = sha256_file(w)
            if got != e.sha256:
                raise LibraryError(
                    f"expert {e.id} ({e.title!r}): checksum mismatch for {w} "
                    f"(manifest {e.sha256[:12]}..., file {got[:12]}...): corrupted or replaced"
                )

    def check_base_model(self, model_dir: str | os.PathLike) -> None:
        want = self.manifest.served_model
        got = model_fingerprint(model_dir)
        if got != want.fingerprint:
            raise LibraryError(
                f"base model {model_dir} (fingerprint {got}) is not the model this library "
                f"was built on: {want.name} (fingerprint {want.fingerprint})"
            )

    # ---- paths and arrays

    def resolve(self, rel: str) -> Path:
        """A library-relative path; refuses anything that escapes the library directory."""
        p = (self.root / rel).resolve()
        if self.root not in p.parents and p != self.root:
            raise LibraryError(f"path {rel!r} escapes the library directory")
        return p

    def expert_dir(self, expert_id: int) -> Path:
        return self.resolve(self.manifest.expert(expert_id).file)

    def served_model_dir(self) -> Path:
        """The model folder to serve under the experts (the folded base when branched)."""
        ref = self.manifest.served_model
        p = Path(ref.path).expanduser()
        return p if p.is_absolute() else self.resolve(ref.path)

    @property
    def centroids(self) -> np.ndarray:
        if self._centroids is None:
            self._centroids = np.load(self.root / CENTROIDS, allow_pickle=False).astype(
                np.float32, copy=False
            )
        return self._centroids

    @property
    def num_experts(self) -> int:
        return len(self.manifest.active_experts)

    def load_index(self):  # -> hnswlib.Index
        import hnswlib

        cent = self.centroids
        index = hnswlib.Index(space="ip", dim=cent.shape[1])
        index.load_index(str(self.root / INDEX), max_elements=max(cent.shape[0], 1))
        for e in self.manifest.experts:
            if e.deleted:
                with contextlib.suppress(RuntimeError):
                    index.mark_deleted(e.id)
        return index

    def read_expert(self, expert_id: int, verify_checksum: bool = False) -> ExpertWeights:
        e = self.manifest.expert(expert_id)
        if e.deleted:
            raise LibraryError(f"expert {expert_id} is deleted")
        if verify_checksum:
            self.check_expert(e, verify_checksum=True)
        return read_adapter(self.resolve(e.file), expert_id)

    def titles(self) -> dict[int, str]:
        return {e.id: e.title for e in self.manifest.experts}

    # ---- writing (train time, admin RPCs)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.root / MANIFEST, manifest.to_json())
        self.manifest = manifest

    # ---- live changes (admin RPCs): files first, the manifest last, each write atomic

    def pending_expert(self, expert_id: int) -> tuple[ExpertInfo, np.ndarray]:
        """An expert placed in the library directory but not (or no longer) served.

        Its folder `experts/NNNN/` holds the PEFT adapter and `ttmm-expert.json`
        ({"title", "size", "group", "centroid": [...], optional "sha256"}): what the manifest
        and the index need. Validated like every expert: safetensors only, checksum,
        dimensions, a unit-norm centroid.
        """
        active = {e.id for e in self.manifest.active_experts}
        if expert_id in active:
            raise LibraryError(f"expert {expert_id} is already served")
        rel = expert_dirname(expert_id)
        d = self.resolve(rel)
        meta_path = d / PENDING_EXPERT
        if not meta_path.exists():
            raise LibraryError(f"expert {expert_id}: no {rel}/{PENDING_EXPERT} in the library")
        try:
            meta = json.loads(meta_path.read_text())
            centroid = np.asarray(meta["centroid"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise LibraryError(f"expert {expert_id}: malformed {PENDING_EXPERT}: {e}") from e
        if centroid.shape != (self.manifest.embedder.dim,):
            raise LibraryError(f"expert {expert_id}: centroid has shape {centroid.shape}, the "
                               f"library's embedder has dimension {self.manifest.embedder.dim}")
        if not np.all(np.isfinite(centroid)) or abs(float(np.linalg.norm(centroid)) - 1) > 1e-3:
            raise LibraryError(f"expert {expert_id}: centroid must be finite and unit-norm")
        weights = d / ADAPTER_WEIGHTS
        if not weights.exists():
            raise LibraryError(f"expert {expert_id}: no {ADAPTER_WEIGHTS} in {rel} "
                               "(only safetensors are read)")
        sha = sha256_file(weights)
        if meta.get("sha256") and meta["sha256"] != sha:
            raise LibraryError(f"expert {expert_id}: checksum mismatch for {weights}: "
                               "corrupted or replaced")
        w = read_adapter(d, expert_id)
        targets = {m.rsplit(".", 1)[-1] for m in w.modules}
        unknown = targets - set(self.manifest.lora.target_modules)
        if unknown:
            raise LibraryError(f"expert {expert_id}: adapts {sorted(unknown)}, which this "
                               "library's experts do not")
        cfg = json.loads((d / ADAPTER_CONFIG).read_text())
        info = ExpertInfo(id=expert_id, title=str(meta.get("title", f"expert {expert_id}")),
                          size=int(meta.get("size", 0)), file=rel, sha256=sha, rank=w.rank,
                          alpha=float(cfg["lora_alpha"]), group=str(meta.get("group",
                                                                               "default")))
        return info, centroid

    def commit_added(self, info: ExpertInfo, centroid: np.ndarray) -> None:
        """Record an added expert: centroid row, index, then the manifest."""
        cent = self.centroids
        if info.id >= len(cent):
            grown = np.zeros((info.id + 1, cent.shape[1]), np.float32)
            grown[: len(cent)] = cent
            cent = grown
        else:
            cent = cent.copy()
        cent[info.id] = centroid
        experts = [e for e in self.manifest.experts if e.id != info.id] + [info]
        experts.sort(key=lambda e: e.id)
        self._commit(cent, dataclasses.replace(self.manifest, experts=tuple(experts)))

    def commit_removed(self, expert_id: int) -> None:
        """Mark an expert deleted (its files stay: re-adding it is an AddExpert away)."""
        e = self.manifest.expert(expert_id)
        experts = tuple(dataclasses.replace(x, deleted=True) if x.id == e.id else x
                        for x in self.manifest.experts)
        self._commit(self.centroids, dataclasses.replace(self.manifest, experts=experts))

    def _commit(self, centroids: np.ndarray, manifest: Manifest) -> None:
        atomic_save_npy(self.root / CENTROIDS, centroids)
        alive = [e.id for e in manifest.experts if not e.deleted]
        index = build_index(centroids[alive], labels=alive)
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=self.root)
        os.close(fd)
        index.save_index(tmp)
        os.replace(tmp, self.root / INDEX)
        self._centroids = centroids
        self.write_manifest(manifest)


def build_index(centroids: np.ndarray, labels: Iterable[int] | None = None, *, ef: int = 200,
                m: int = 16):
    """An hnswlib inner-product index over unit-norm centroids (label = expert id)."""
    import hnswlib

    centroids = np.asarray(centroids, dtype=np.float32)
    n, d = centroids.shape
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=max(n, 1), ef_construction=ef, M=m, allow_replace_deleted=True)
    ids = np.arange(n) if labels is None else np.asarray(list(labels))
    index.add_items(centroids, ids)
    index.set_ef(max(ef, n))
    return index


def write_library(
    root: str | os.PathLike,
    manifest: Manifest,
    centroids: np.ndarray,
    *,
    assignments: np.ndarray | None = None,
) -> Library:
    """Write the arrays and the index, then the manifest last (its presence marks a library)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    centroids = np.asarray(centroids, dtype=np.float32)
    atomic_save_npy(root / CENTROIDS, centroids)
    index = build_index(centroids)
    fd, tmp = tempfile.mkstemp(prefix=".index.", dir=root)
    os.close(fd)
    index.save_index(tmp)
    os.replace(tmp, root / INDEX)
    if assignments is not None:
        atomic_save_npy(root / ASSIGNMENTS, np.asarray(assignments, dtype=np.int64))
    atomic_write_json(root / MANIFEST, manifest.to_json())
    return Library(root.resolve(), manifest)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)
