"""The expert library: the contract between train time (`training/`) and serve time.

The only module that reads and changes a whole library: `Library.open` validates it and
refuses, with an error that names what is wrong, a missing or corrupted expert, a mismatched
base model or embedder, or an unknown format version; `write_library` writes a new one (train
time); `pending_expert` / `commit_added` / `commit_removed` are the admin RPCs' live changes.
The format itself is in `format.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from ttmm_vllm.library.adapter_io import ExpertWeights, read_adapter
from ttmm_vllm.library.files import (
    atomic_save_npy,
    atomic_write_json,
    model_fingerprint,
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
    Manifest,
    expert_dirname,
)

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

