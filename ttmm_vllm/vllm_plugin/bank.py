"""The worker-side expert bank: every expert of a library resident, stacked per LoRA layer.

Loaded once per worker process and library (`ttmm_vllm.library`: manifest validated, sha256
checked, safetensors only). For each of vLLM's LoRA layers the bank keeps one `BankModule`:
the experts' factors stacked as `ops.stack_expert_factors` lays them out, with PEFT's module
names mapped to vLLM's packed layers (q/k/v -> qkv_proj slices 0/1/2, gate/up ->
gate_up_proj slices 0/1, as the model's `packed_modules_mapping` says) and each expert's
scaling folded into B.

"mix" reads these tensors directly in the LoRA op (`ops.mix_lora_linear`). "expand" does not
need a bank (it reads only the experts a request names, `state.PluginState.experts`);
`expert_views` gives per-expert views for checks and tests.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ttmm_vllm.library import ExpertWeights, Library, LibraryError
from ttmm_vllm.vllm_plugin.ops import stack_expert_factors

log = logging.getLogger("vllm.ttmm.bank")  # a child of vLLM's logger: shown with its logs
_serials = itertools.count(1)


@dataclass(frozen=True)
class LayerLayout:
    """One of vLLM's LoRA layers as the bank needs to know it (plain data, no vLLM types).

    name: vLLM's module name (`model.layers.0.self_attn.qkv_proj`); sub_names: the PEFT
    module of each output slice (`...q_proj`, `...k_proj`, `...v_proj`); a plain layer has one.
    """

    name: str
    sub_names: tuple[str, ...]
    in_dim: int
    output_slices: tuple[int, ...]


def layouts_from_manager(manager) -> list[LayerLayout]:  # manager: vllm LoRAModelManager
    """The linear LoRA layers of a vLLM LoRA model manager, with their packed sub-modules."""
    out = []
    for name, module in manager.modules.items():
        a = getattr(module, "lora_a_stacked", None)
        b = getattr(module, "lora_b_stacked", None)
        if not isinstance(a, tuple) or not isinstance(b, tuple) or not a:
            continue  # logits / embedding / MoE layers: not adapted by experts here
        subs = tuple(manager.packed_modules.get(name, [name]))
        if len(subs) != len(a):
            continue
        out.append(LayerLayout(name, subs, int(a[0].shape[-1]),
                               tuple(int(t.shape[-2]) for t in b)))
    return out


@dataclass
class BankModule:
    """One layer's experts: a_cat (n*R, in), b_slices[i] (out_i, R), B scaled by s_k."""

    layout: LayerLayout
    a_cat: torch.Tensor
    b_slices: list[torch.Tensor]


class ExpertBank:
    """All active experts of one library, resident and stacked per LoRA layer."""

    def __init__(self, root: str, expert_ids: Sequence[int], ranks: Sequence[int],
                 modules: dict[str, BankModule]):
        self.root = root
        # Identifies this bank in per-layer caches: a library change builds a new bank while
        # adapters in flight keep the old one, and id() of a freed bank may be reused.
        self.serial = next(_serials)
        self.expert_ids = tuple(expert_ids)
        self.ranks = tuple(ranks)
        self.ranks_t = torch.tensor(self.ranks, dtype=torch.long)
        self.total_rank = sum(self.ranks)
        offs = [0]
        for r in self.ranks[:-1]:
            offs.append(offs[-1] + r)
        self.col_offsets = tuple(offs)
        self.modules = modules
        self.index_of = {e: k for k, e in enumerate(self.expert_ids)}

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    @property
    def nbytes(self) -> int:
        return sum(m.a_cat.numel() * m.a_cat.element_size()
                   + sum(b.numel() * b.element_size() for b in m.b_slices)
                   for m in self.modules.values())

    # ---- building

    @classmethod
    def load(cls, root: str | Path, layouts: Iterable[LayerLayout], dtype: torch.dtype,
             verify_checksums: bool = True) -> ExpertBank:
        """Read every active expert of the library once and stack them for `layouts`."""
        lib = Library.open(root, verify_checksums=verify_checksums)
        experts = [lib.read_expert(e.id) for e in lib.manifest.active_experts]
        return cls.from_experts(str(lib.root), experts, layouts, dtype)

    @classmethod
    def from_experts(cls, root: str, experts: Sequence[ExpertWeights],
                     layouts: Iterable[LayerLayout], dtype: torch.dtype) -> ExpertBank:
        layouts = list(layouts)
        by_sub = {s: lay for lay in layouts for s in lay.sub_names}
        for e in experts:
            missing = sorted(set(e.modules) - set(by_sub))
            if missing:
                raise LibraryError(
                    f"expert {e.expert_id} adapts {missing[:3]}{'...' if len(missing) > 3 else ''}"
                    " which have no LoRA layer in the served model: check the engine's "
                    "lora_target_modules against the library's"
                )
        ranks = [e.rank for e in experts]
        modules: dict[str, BankModule] = {}
        for lay in layouts:
            factors = [[e.modules.get(s) for s in lay.sub_names] for e in experts]
            if all(ab is None for per in factors for ab in per):
                continue  # no expert adapts this layer
            for e, per in zip(experts, factors, strict=True):
                for s, out, ab in zip(lay.sub_names, lay.output_slices, per, strict=True):
                    if ab is not None and (tuple(ab[0].shape) != (e.rank, lay.in_dim)
                                           or tuple(ab[1].shape) != (out, e.rank)):
                        raise LibraryError(
                            f"expert {e.expert_id} module {s}: A {tuple(ab[0].shape)}, B "
                            f"{tuple(ab[1].shape)} do not fit the model's layer "
                            f"(rank {e.rank}, in {lay.in_dim}, out {out})"
                        )
            a_cat, b_slices = stack_expert_factors(
                factors, [e.scaling for e in experts], ranks, lay.in_dim, lay.output_slices,
                dtype,
            )
            modules[lay.name] = BankModule(lay, a_cat, b_slices)
        bank = cls(root, [e.expert_id for e in experts], ranks, modules)
        log.info("ttmm expert bank %s: %d experts, %d layers, %.1f MB", root, len(experts),
                 len(modules), bank.nbytes / 1e6)
        return bank

    # ---- routing

    def weights_vector(self, expert_ids: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
        """(K,) float32 weight of each bank expert (0 for experts not in the routing)."""
        vec = torch.zeros(self.num_experts, dtype=torch.float32)
        for e, w in zip(expert_ids, weights, strict=True):
            k = self.index_of.get(int(e))
            if k is None:
                raise LibraryError(f"expert {e} is not in library {self.root} "
                                   f"(experts: {list(self.expert_ids)})")
            vec[k] = float(w)
        return vec

    def expert_views(self, expert_ids: Sequence[int]) -> list[ExpertWeights]:
        """Experts as `ExpertWeights` whose tensors are views into the bank (no copy).

        Their scaling is 1.0: the bank's B already holds s_k * B_k.
        """
        out = []
        for e in expert_ids:
            k = self.index_of.get(int(e))
            if k is None:
                raise LibraryError(f"expert {e} is not in library {self.root}")
            r, off, big_r = self.ranks[k], self.col_offsets[k], self.total_rank
            mods = {}
            for m in self.modules.values():
                for i, sub in enumerate(m.layout.sub_names):
                    a = m.a_cat[i * big_r + off: i * big_r + off + r]
                    b = m.b_slices[i][:, off:off + r]
                    mods[sub] = (a, b)
            out.append(ExpertWeights(int(e), mods, 1.0, r))
        return out
