"""The expert library: the one contract between train time (`training/`) and serve time.

    format.py      what a library directory holds; the manifest's typed records
    files.py       atomic writes, checksums, model fingerprints
    adapter_io.py  PEFT LoRA folders <-> plain tensors (safetensors only)
    store.py       open + validate a library, write one, live additions and removals
    expert_cache.py  experts read on demand, kept in an LRU bounded by bytes

Imports numpy, torch and safetensors only: nothing of routing, serving or vLLM.
"""

from ttmm_vllm.library.adapter_io import ExpertWeights, read_adapter, write_adapter
from ttmm_vllm.library.files import (
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    model_fingerprint,
    sha256_file,
)
from ttmm_vllm.library.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ASSIGNMENTS,
    CENTROIDS,
    FORMAT,
    FORMAT_VERSION,
    HOLDOUT,
    LLAMA_TARGETS,
    MANIFEST,
    PENDING_EXPERT,
    EmbedderRef,
    ExpertInfo,
    LibraryError,
    LoraSpec,
    Manifest,
    ModelRef,
    RouterDefaults,
    expert_dirname,
)
from ttmm_vllm.library.store import Library, write_library

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ASSIGNMENTS", "CENTROIDS", "FORMAT", "FORMAT_VERSION",
    "HOLDOUT", "LLAMA_TARGETS", "MANIFEST", "PENDING_EXPERT", "EmbedderRef", "ExpertInfo",
    "ExpertWeights", "Library", "LibraryError", "LoraSpec", "Manifest", "ModelRef",
    "RouterDefaults", "atomic_save_npy", "atomic_write_bytes", "atomic_write_json",
    "expert_dirname", "model_fingerprint", "read_adapter", "sha256_file", "write_adapter",
    "write_library",
]
