"""The expert library: the contract between train time (`training/`) and serve time.

The only module that reads and changes a whole library: `Library.open` validates it and
refuses, with an error that names what is wrong, a missing or corrupted expert, a mismatched
base model or embedder, or an unknown format version; `write_library` writes a new one (train
time); `pending_expert` / `commit_added` / `commit_removed` are the admin RPCs' live changes.
The format itself is in `format.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ttmm_vllm.library.adapter_io import ExpertWeights, read_adapter
from ttmm_vllm.library.files import (
    atomic_save_npy,
    atomic_write_json,
    known_digest,
    model_fingerprint,
    remember_digest,
    sha256_file,
)
from ttmm_vllm.library.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ASSIGNMENTS,
    CENTROIDS,
    MANIFEST,
    PENDING_EXPERT,
    ExpertInfo,
    LibraryError,
    LibraryLimits,
    Manifest,
    check_expert_info,
    expert_dirname,
)

# safetensors dtypes an expert's A and B may have (float only: ints would be silently scaled)
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_PEFT_PREFIX = "base_model.model."

# --------------------------------------------------------------------------- the library


class Library:
    """An opened, validated library. Cheap to open; expert tensors are read on demand."""

    def __init__(self, root: Path, manifest: Manifest, limits: LibraryLimits | None = None):
        self.root = root
        self.manifest = manifest
        self.limits = limits or LibraryLimits()
        self._centroids: np.ndarray | None = None
        # module name -> (in, out) of the experts seen so far: every expert must agree
        self._module_shapes: dict[str, tuple[int, int]] = {}

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
        limits: LibraryLimits | None = None,
        allow_empty: bool = False,
        validate: bool = True,
    ) -> Library:
        """Open and validate. Every check failure raises LibraryError naming the culprit.

        base_model_dir: the folder the server will load; its fingerprint must match the
        manifest's served model. embedder_*: what the server embeds queries with. limits: the
        ranges every expert's id and metadata must lie in. Each expert's tensors are checked
        from the safetensors header (shapes against the declared rank and the other experts,
        float dtype); with verify_checksums also read in full (finite values).
        allow_empty: accept a library with no expert yet (`ttmm library create` makes one;
        importing adapters fills it). A server never opens one: there is nothing to route to.
        validate=False reads the manifest only: for a vLLM worker re-reading a manifest the
        server has just validated and committed (checking every expert again would read every
        expert's file inside the engine loop); the worker checks what it reads itself.
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
        lib = cls(root, Manifest.from_json(raw), limits)
        if validate:
            lib.validate(verify_checksums=verify_checksums, allow_empty=allow_empty)
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

    def validate(self, verify_checksums: bool = True, allow_empty: bool = False) -> None:
        m = self.manifest
        ids = [e.id for e in m.experts]
        if len(set(ids)) != len(ids):
            raise LibraryError("manifest lists an expert id twice")
        if not m.active_experts and not allow_empty:
            raise LibraryError(f"library {self.root.name} has no experts: nothing to route to "
                               "(add adapters with `ttmm library import LIB ADAPTER`)")
        for e in m.experts:  # ids first: a huge id is refused before any table is sized by it
            check_expert_info(e, self.limits)
        cpath = self.root / CENTROIDS
        if not cpath.exists():
            raise LibraryError(f"missing {CENTROIDS}")
        cent = self.centroids
        if cent.ndim != 2 or cent.shape[1] != m.embedder.dim:
            raise LibraryError(
                f"{CENTROIDS} has shape {cent.shape}, expected (K, {m.embedder.dim})"
            )
        if ids and cent.shape[0] <= max(ids):
            raise LibraryError(f"{CENTROIDS} has {cent.shape[0]} rows; expert id {max(ids)} "
                               "has no centroid")
        if not np.all(np.isfinite(cent)):
            raise LibraryError(f"{CENTROIDS} contains NaN or infinite values")
        for e in m.active_experts:
            self.check_expert(e, verify_checksum=verify_checksums)
        if m.serving_base is not None:
            base_dir = self.served_model_dir()
            if not base_dir.exists():
                raise LibraryError(f"folded base checkpoint {base_dir} is missing")

    def check_expert(self, e: ExpertInfo, verify_checksum: bool = True) -> None:
        """An expert's files: present, its tensors' shapes and dtypes (from the header), and
        with `verify_checksum` its checksum and finite values (one read of the file; skipped
        when this very file, same size and mtime, passed both before: files.known_digest).
        Messages name files relative to the library, never by absolute path."""
        d = self.resolve(e.file)
        w = d / ADAPTER_WEIGHTS
        if not (d / ADAPTER_CONFIG).exists() or not w.exists():
            raise LibraryError(f"expert {e.id} ({e.title!r}): adapter files missing in {e.file}")
        self.check_expert_tensors(e.id, d, e.rank, finite=False)
        if verify_checksum and known_digest(w) != e.sha256:  # else: verified, unchanged since
            data = w.read_bytes()
            got = hashlib.sha256(data).hexdigest()
            if got != e.sha256:
                raise LibraryError(
                    f"expert {e.id} ({e.title!r}): checksum mismatch for "
                    f"{e.file}/{ADAPTER_WEIGHTS} (manifest {e.sha256[:12]}..., "
                    f"file {got[:12]}...): corrupted or replaced"
                )
            _check_finite(e.id, data)
            remember_digest(w, got)  # only a file that passed both checks is remembered

    def check_expert_tensors(self, expert_id: int, adapter_dir: Path, rank: int, *,
                             finite: bool = True, max_rank: int | None = None) -> None:
        """An expert's A (r, in) and B (out, r) per module: r the declared rank (<= max_rank,
        the engine's max_lora_rank when known), float dtypes, the same (in, out) per module as
        the library's other experts, and (finite) no NaN or infinite value."""
        if max_rank is not None and rank > max_rank:
            raise LibraryError(f"expert {expert_id}: rank {rank} exceeds the engine's "
                               f"max_lora_rank {max_rank}")
        header = _safetensors_header(adapter_dir / ADAPTER_WEIGHTS, expert_id)
        pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key, (dtype, shape) in header.items():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_A." in name:
                pairs.setdefault(name.split(".lora_A.")[0], {})["A"] = (dtype, shape)
            elif ".lora_B." in name:
                pairs.setdefault(name.split(".lora_B.")[0], {})["B"] = (dtype, shape)
            else:
                raise LibraryError(f"expert {expert_id}: unexpected tensor {key!r} "
                                   "(LoRA A/B only)")
        if not pairs:
            raise LibraryError(f"expert {expert_id}: no LoRA tensors")
        shapes = {}
        for mod, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise LibraryError(f"expert {expert_id}: module {mod} lacks lora_A or lora_B")
            (da, sa), (db, sb) = ab["A"], ab["B"]
            if da not in _FLOAT_DTYPES or db not in _FLOAT_DTYPES:
                raise LibraryError(f"expert {expert_id}: module {mod} has dtype {da}/{db}; "
                                   f"expected one of {sorted(_FLOAT_DTYPES)}")
            if len(sa) != 2 or len(sb) != 2 or sa[0] != rank or sb[1] != rank:
                raise LibraryError(f"expert {expert_id}: module {mod} has A {list(sa)} and "
                                   f"B {list(sb)}; expected A [{rank}, in] and B [out, {rank}] "
                                   f"(declared rank {rank})")
            shapes[mod] = (sa[1], sb[0])
            want = self._module_shapes.get(mod)
            if want is not None and want != shapes[mod]:
                raise LibraryError(f"expert {expert_id}: module {mod} maps {shapes[mod][0]} -> "
                                   f"{shapes[mod][1]}; the library's experts map {want[0]} -> "
                                   f"{want[1]}")
        for mod, shape in shapes.items():
            self._module_shapes.setdefault(mod, shape)
        if finite:
            _check_finite(expert_id, (adapter_dir / ADAPTER_WEIGHTS).read_bytes())

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

    def read_expert(self, expert_id: int, verify_checksum: bool = False,
                    shared_a: Mapping[str, Any] | None = None) -> ExpertWeights:
        e = self.manifest.expert(expert_id)
        if e.deleted:
            raise LibraryError(f"expert {expert_id} is deleted")
        if verify_checksum:
            self.check_expert(e, verify_checksum=True)
        try:
            return read_adapter(self.resolve(e.file), expert_id, shared_a)
        except LibraryError as err:  # name files relative to the library, never absolutely
            raise LibraryError(str(err).replace(f"{self.root}/", "").replace(
                str(self.root), "<library>")) from None

    def titles(self) -> dict[int, str]:
        return {e.id: e.title for e in self.manifest.experts}

    # ---- writing (train time, admin RPCs)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.root / MANIFEST, manifest.to_json())
        self.manifest = manifest

    # ---- live changes (admin RPCs): files first, the manifest last, each write atomic

    def pending_expert(self, expert_id: int, max_rank: int | None = None
                       ) -> tuple[ExpertInfo, np.ndarray]:
        """An expert placed in the library directory but not (or no longer) served.

        Its folder `experts/NNNN/` holds the PEFT adapter and `ttmm-expert.json`
        ({"title", "size", "group", "centroid": [...], optional "sha256"}): what the manifest
        and the index need. Validated like every expert, before anything serves it: the id and
        metadata in range (`limits`), safetensors only, checksum, tensor shapes against the
        declared rank and the library's other experts, rank <= `max_rank` (the engine's
        max_lora_rank), float dtypes, finite values, a unit-norm centroid.
        """
        if type(expert_id) is not int or not 0 <= expert_id < self.limits.max_expert_id:
            raise LibraryError(f"expert id must be in [0, {self.limits.max_expert_id}), "
                               f"got {expert_id}")
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
            if not isinstance(meta, dict):
                raise TypeError("not a JSON object")
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
            raise LibraryError(f"expert {expert_id}: checksum mismatch for "
                               f"{rel}/{ADAPTER_WEIGHTS}: corrupted or replaced")
        try:
            cfg = json.loads((d / ADAPTER_CONFIG).read_text())
            rank, alpha = cfg["r"], cfg["lora_alpha"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LibraryError(f"expert {expert_id}: malformed {rel}/{ADAPTER_CONFIG}: "
                               f"{type(e).__name__} {e}") from None
        size = meta.get("size", 0)
        info = ExpertInfo(id=expert_id, title=meta.get("title", f"expert {expert_id}"),
                          size=size, file=rel, sha256=sha, rank=rank,
                          alpha=float(alpha) if isinstance(alpha, int | float) else alpha,
                          group=meta.get("group", "default"))
        check_expert_info(info, self.limits)
        self._ensure_module_shapes()
        self.check_expert_tensors(expert_id, d, rank, finite=True, max_rank=max_rank)
        targets = {m.rsplit(".", 1)[-1] for m in _module_names(d / ADAPTER_WEIGHTS, expert_id)}
        unknown = targets - set(self.manifest.lora.target_modules)
        if unknown:
            raise LibraryError(f"expert {expert_id}: adapts {sorted(unknown)}, which this "
                               "library's experts do not")
        return info, centroid

    def _ensure_module_shapes(self) -> None:
        """Learn the module shapes from a served expert if none was checked yet (a library
        opened without validation)."""
        if not self._module_shapes and self.manifest.active_experts:
            e = self.manifest.active_experts[0]
            self.check_expert_tensors(e.id, self.resolve(e.file), e.rank, finite=False)

    def snapshot(self) -> tuple[Manifest, np.ndarray]:
        """The manifest and centroid table as they are: what `restore` puts back."""
        return self.manifest, self.centroids

    def restore(self, snapshot: tuple[Manifest, np.ndarray]) -> None:
        """Undo live changes made since `snapshot` (both files rewritten atomically)."""
        manifest, centroids = snapshot
        self._commit(centroids, manifest)

    def commit_added(self, info: ExpertInfo, centroid: np.ndarray) -> None:
        """Record an added expert: its centroid row, then the manifest."""
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
        self._centroids = centroids
        self.write_manifest(manifest)


def _safetensors_header(path: Path, expert_id: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (dtype, shape), from the file's header only (no tensor data read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # noqa: BLE001 - any unreadable header is a bad expert
        raise LibraryError(f"expert {expert_id}: {ADAPTER_WEIGHTS} is not a readable "
                           f"safetensors file ({type(e).__name__})") from None


def _module_names(path: Path, expert_id: int) -> set[str]:
    return {k.split(".lora_")[0] for k in _safetensors_header(path, expert_id)}


def _check_finite(expert_id: int, data: bytes) -> None:
    """Every tensor of an expert's safetensors bytes is finite: one Inf in one expert would
    turn every merge that includes it (0 x Inf in a mix) into NaN for other clients too."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001
        raise LibraryError(f"expert {expert_id}: {ADAPTER_WEIGHTS} is not a readable "
                           f"safetensors file ({type(e).__name__})") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LibraryError(f"expert {expert_id}: tensor {key!r} has NaN or infinite values")


def write_library(
    root: str | os.PathLike,
    manifest: Manifest,
    centroids: np.ndarray,
    *,
    assignments: np.ndarray | None = None,
) -> Library:
    """Write the arrays, then the manifest last (its presence marks a library)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    centroids = np.asarray(centroids, dtype=np.float32)
    atomic_save_npy(root / CENTROIDS, centroids)
    if assignments is not None:
        atomic_save_npy(root / ASSIGNMENTS, np.asarray(assignments, dtype=np.int64))
    atomic_write_json(root / MANIFEST, manifest.to_json())
    return Library(root.resolve(), manifest)

