"""The library format: what a library directory holds and what its manifest says.

A library is a directory:

    manifest.json          format version, base model + fingerprint, embedder, LoRA spec,
                           router defaults, one entry per expert (id, title, size, file, sha256)
    centroids.npy          (K, d) float32, each row the re-normalised mean embedding of a cluster
    experts/0000/          one PEFT adapter folder per expert (adapter_config.json +
                           adapter_model.safetensors), loadable alone by PEFT or vLLM
    assignments.npy        cluster id per corpus document (-1: not used)
    holdout.jsonl          held-out documents per cluster, for tuning and evaluation
    base/                  optional: a folded base checkpoint (branch-from-multitask builds)

The routing index is built from centroids.npy when a server starts (it is small and cheap to
build); an `index.bin` written by older builds is ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = "ttmm-library"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CENTROIDS = "centroids.npy"
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
    # True: every expert has the same A per module (the library's shared A, frozen at train
    # time; only B is trained). A weighted merge is then exact at rank r:
    # sum_k w_k s_k B_k A = (sum_k w_k s_k B_k) A, and serves like one rank-r adapter.
    shared_a: bool = False


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
class LibraryLimits:
    """What a library may hold, checked on open and on every add (a bad manifest entry or a
    huge id is refused before anything serves it). Defaults in docs/security.md."""

    # Expert ids lie in [0, max_expert_id): the centroid table has one row per id.
    max_expert_id: int = 1_000_000
    # vLLM's largest max_lora_rank.
    max_rank: int = 512
    # Titles travel in every routing of every response.
    max_title_chars: int = 256
    # Group names: letters, digits, '_', '-', '.', ':' (they name access groups in auth files).
    max_group_chars: int = 64

    def __post_init__(self) -> None:
        for name in ("max_expert_id", "max_rank", "max_title_chars", "max_group_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


_GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")


def check_expert_info(e: ExpertInfo, limits: LibraryLimits | None = None) -> None:
    """Range-check one manifest entry; LibraryError names the expert, the field and the limit."""
    lim = limits or LibraryLimits()

    def bad(what: str) -> LibraryError:
        return LibraryError(f"expert {e.id!r}: {what}")

    if type(e.id) is not int or not 0 <= e.id < lim.max_expert_id:
        raise bad(f"id must be an integer in [0, {lim.max_expert_id}), got {e.id!r}")
    if type(e.size) is not int or e.size < 0:
        raise bad(f"size must be an integer >= 0, got {e.size!r}")
    if type(e.rank) is not int or not 1 <= e.rank <= lim.max_rank:
        raise bad(f"rank must be an integer in [1, {lim.max_rank}], got {e.rank!r}")
    if isinstance(e.alpha, bool) or not isinstance(e.alpha, int | float) \
            or not math.isfinite(e.alpha) or e.alpha <= 0:
        raise bad(f"alpha must be a finite number > 0, got {e.alpha!r}")
    if not isinstance(e.title, str) or len(e.title) > lim.max_title_chars:
        raise bad(f"title must be a string of at most {lim.max_title_chars} characters")
    if not isinstance(e.group, str) or not 1 <= len(e.group) <= lim.max_group_chars \
            or not set(e.group) <= _GROUP_CHARS:
        raise bad(f"group must be 1..{lim.max_group_chars} letters, digits or '_-.:', "
                  f"got {e.group!r}")
    if not isinstance(e.file, str) or not isinstance(e.sha256, str) \
            or not isinstance(e.deleted, bool):
        raise bad("file and sha256 must be strings, deleted a boolean")


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



def expert_dirname(expert_id: int) -> str:
    """Where an expert's adapter folder lives, relative to the library."""
    return f"experts/{expert_id:04d}"
