"""PEFT LoRA adapter folders <-> plain tensors (safetensors only, never pickles)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttmm_vllm.library.files import atomic_write_bytes, atomic_write_json
from ttmm_vllm.library.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LibraryError


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


def read_adapter(adapter_dir: str | os.PathLike, expert_id: int = -1,
                 shared_a: Mapping[str, Any] | None = None) -> ExpertWeights:
    """Read a PEFT LoRA adapter folder (safetensors only, memory-mapped).

    shared_a: module -> A, for an expert of a shared-A library whose A's were already checked
    against these (`ExpertCache`): only its B's are read, and its modules take these A
    tensors (half the bytes of a re-read, and merges see one A object per module).
    """
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
    if shared_a is not None:
        return ExpertWeights(expert_id, _read_b_only(weights_path, shared_a), scaling, rank)
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


def _read_b_only(weights_path: Path, shared_a: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    from safetensors import safe_open

    modules = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_B." not in name:
                continue
            mod = name.split(".lora_B.")[0]
            if mod not in shared_a:
                raise LibraryError(f"{weights_path}: module {mod} has no shared A")
            modules[mod] = (shared_a[mod], f.get_tensor(key))
    return modules


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

