"""The plugin's state in one vLLM worker process: config, expert banks, live routings.

One `PluginState` per process (`STATE`). vLLM's worker is single-threaded: adapters load,
routings change (through `collective_rpc`) and forward passes run one after another in the
engine loop, so no lock is needed. Every change that the LoRA op's per-step metadata depends
on bumps `version`; the punica wrapper rebuilds its metadata when it sees a new version, which
is how a re-routing takes effect at the next step even when vLLM does not call
`update_metadata` (it skips it when the batch mapping is unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ttmm_vllm.library import Library
from ttmm_vllm.library.expert_cache import ExpertCache
from ttmm_vllm.vllm_plugin.bank import ExpertBank, layouts_from_manager
from ttmm_vllm.vllm_plugin.config import PluginConfig


@dataclass(frozen=True)
class Route:
    """A "mix" adapter's routing: weights over its bank's experts."""

    bank: ExpertBank
    expert_ids: tuple[int, ...]
    weights: tuple[float, ...]
    vector: torch.Tensor  # (K,) float32, bank order
    name: str = ""  # the adapter name it was loaded from


class PluginState:
    def __init__(self) -> None:
        self.config = PluginConfig()
        self.configured = False  # set once the worker's vLLM config has been read
        self.manager: Any = None  # vLLM LoRAModelManager (worker side)
        self.layer_names: dict[int, str] = {}  # id(layer.lora_a_stacked) -> vLLM module name
        self.banks: dict[str, ExpertBank] = {}  # "mix": every expert resident, stacked
        self.caches: dict[str, ExpertCache] = {}  # "expand": experts read on demand (LRU)
        self.routes: dict[int, Route] = {}  # lora_int_id -> routing of a "mix" adapter
        self.ranks: dict[int, int] = {}  # lora_int_id -> real rank of an ordinary adapter
        # lora_int_id -> {"rank", "rel_error", "merge_ms"} of an in-worker "expand" merge
        self.built: dict[int, dict[str, float]] = {}
        # lora_int_id -> library key: the adapter is a merge of that shared-A library's
        # experts, so its slot holds the library's A (the decode op reads it once for all)
        self.shared_a_of: dict[int, str] = {}
        self._shared_a: dict[str, dict[str, torch.Tensor]] = {}  # library -> layer -> A
        self.mix_ops_active = False  # the plugin's punica wrapper is in use
        self.version = 0

    # ---- lifecycle (called from the patches in vllm_plugin/__init__.py)

    def configure(self, config: PluginConfig) -> None:
        self.config = config
        self.configured = True

    def attach_manager(self, manager: Any) -> None:
        """Remember vLLM's LoRA model manager, whose layers the banks are stacked for."""
        self.manager = manager
        self.layer_names = {id(m.lora_a_stacked): name for name, m in manager.modules.items()
                            if isinstance(getattr(m, "lora_a_stacked", None), tuple)}
        self.banks.clear()
        self.caches.clear()
        self._shared_a.clear()
        self.routes.clear()
        self.ranks.clear()
        self.built.clear()
        self.version += 1

    # ---- banks

    def bank(self, root: str | Path) -> ExpertBank:
        """The bank of a library, loaded on first use (once per process)."""
        key = library_key(root)
        bank = self.banks.get(key)
        return bank if bank is not None else self.reload_bank(key)

    def reload_bank(self, root: str | Path) -> ExpertBank:
        """Re-read a library's active experts (after a live add/remove in its manifest).

        Adapters already loaded keep the bank they were built on (their `Route` holds it),
        so requests in flight are unaffected; new adapters use the new bank.
        """
        key = library_key(root)
        if self.manager is None:
            raise RuntimeError("ttmm: no vLLM LoRA manager yet (is LoRA enabled?)")
        layouts = layouts_from_manager(self.manager)
        if not layouts:
            raise RuntimeError("ttmm: the model has no linear LoRA layers to adapt")
        dtype = next(iter(self.manager.modules.values())).lora_a_stacked[0].dtype
        bank = ExpertBank.load(key, layouts, dtype, self.config.verify_checksums)
        self.banks[key] = bank
        self.version += 1
        return bank

    def forget_bank(self, root: str | Path) -> None:
        """Drop what this worker holds of a library (its bank and its expert cache)."""
        self.banks.pop(library_key(root), None)
        self.caches.pop(library_key(root), None)
        self._shared_a.pop(library_key(root), None)

    def experts(self, root: str | Path) -> ExpertCache:
        """A library's experts for "expand" merges: read on demand (each checksum-verified
        on its first read) into an LRU bounded by `PluginConfig.expert_cache_bytes`, so
        memory and start-up do not grow with the library: only the experts requests use are
        read."""
        key = library_key(root)
        cache = self.caches.get(key)
        if cache is None:
            lib = Library.open(key, verify_checksums=False)
            cache = ExpertCache(lib, self.config.expert_cache_bytes,
                                verify_checksums=self.config.verify_checksums)
            self.caches[key] = cache
        return cache

    def refresh_library(self, root: str | Path, removed: int | None = None) -> Library:
        """A library's manifest changed (live add/remove): re-read it where it is held, and
        return it. Adapters already built keep their tensors."""
        key = library_key(root)
        lib = Library.open(key, validate=False)  # validated by the server before its commit
        cache = self.caches.get(key)
        if cache is not None:
            cache.library = lib
            if removed is not None:
                cache.drop(removed)
        if key in self.banks:
            self.update_bank(key, lib)
        return lib

    def update_bank(self, root: str | Path, lib: Library) -> None:
        """Bring a resident bank to the manifest's active experts without re-reading it.

        This runs in the engine loop (between steps), so it must not cost a library read:
        experts the old bank holds are restacked from its own tensors, only an added expert
        is read (and checksum-verified) from disk. Routes whose experts are all in the new
        bank move to it, so the old bank is freed as soon as no adapter still needs a
        removed expert (those finish on the old bank: requests in flight are unaffected).
        """
        key = library_key(root)
        old = self.banks.get(key)
        active = [e.id for e in lib.manifest.active_experts]
        if old is None:
            return
        if not active:
            self.banks.pop(key, None)
            return
        kept = [e for e in active if e in old.index_of]
        views = dict(zip(kept, old.expert_views(kept), strict=True))
        experts = [views[e] if e in views else
                   lib.read_expert(e, verify_checksum=self.config.verify_checksums)
                   for e in active]
        dtype = next(iter(self.manager.modules.values())).lora_a_stacked[0].dtype
        new = ExpertBank.from_experts(key, experts, layouts_from_manager(self.manager), dtype)
        self.banks[key] = new
        for lora_id, route in list(self.routes.items()):
            if route.bank is old and all(e in new.index_of for e in route.expert_ids):
                self.set_route(lora_id, new, route.expert_ids, route.weights, route.name)
        self.version += 1

    # ---- adapters and routings

    def set_route(self, lora_int_id: int, bank: ExpertBank, expert_ids: Sequence[int],
                  weights: Sequence[float], name: str = "") -> None:
        vector = bank.weights_vector(expert_ids, weights)
        self.routes[lora_int_id] = Route(bank, tuple(int(i) for i in expert_ids),
                                         tuple(float(w) for w in weights), vector, name)
        self.ranks.pop(lora_int_id, None)
        self.version += 1

    def change_route(self, lora_int_id: int, expert_ids: Sequence[int],
                     weights: Sequence[float]) -> None:
        """Re-route a live "mix" adapter (the bank stays that of its library)."""
        route = self.routes.get(lora_int_id)
        if route is None:
            raise KeyError(f"ttmm: LoRA id {lora_int_id} is not a loaded 'mix' routing adapter")
        self.set_route(lora_int_id, route.bank, expert_ids, weights, route.name)

    def note_ordinary(self, lora_int_id: int, rank: int, shared_a: str | None = None) -> None:
        """An ordinary adapter (disk or "expand") was loaded under this id, with this rank;
        `shared_a`: it is a merge of that shared-A library's experts."""
        self.ranks[lora_int_id] = int(rank)
        self.routes.pop(lora_int_id, None)
        if shared_a is None:
            self.shared_a_of.pop(lora_int_id, None)
        else:
            self.shared_a_of[lora_int_id] = shared_a
        self.version += 1

    def shared_a_table(self, library: str) -> dict[str, torch.Tensor]:
        """A shared-A library's A per vLLM LoRA layer, slices stacked: (n * r, in).

        Read from any one expert (they all hold it), mapped to vLLM's packed layers as the
        bank maps them; a layer some slice of which the experts do not adapt is left out (its
        slots' own A is read instead)."""
        table = self._shared_a.get(library)
        if table is None:
            cache = self.experts(library)
            first = cache.library.manifest.active_experts[0].id
            modules = cache.get(first).modules
            dtype = next(iter(self.manager.modules.values())).lora_a_stacked[0].dtype
            table = {}
            for lay in layouts_from_manager(self.manager):
                parts = [modules.get(sub) for sub in lay.sub_names]
                if all(p is not None for p in parts):
                    table[lay.name] = torch.cat([p[0] for p in parts]).to(dtype).contiguous()
            self._shared_a[library] = table
        return table

    def forget(self, lora_int_id: int) -> None:
        """An adapter removed from vLLM: drop what this process keeps for it."""
        for table in (self.routes, self.ranks, self.built, self.shared_a_of):
            table.pop(lora_int_id, None)
        self.version += 1

    def prune(self, keep: set[int]) -> None:
        """Forget routings and ranks of adapters vLLM no longer holds (bounded bookkeeping)."""
        for table in (self.routes, self.ranks, self.built, self.shared_a_of):
            for k in [k for k in table if k not in keep]:
                del table[k]
        self.version += 1


def adapter_rank(lora: Any) -> int:
    """The largest rank among an adapter's layers (its real rank in vLLM's slot buffers)."""
    rank = 0
    for w in lora.loras.values():
        a = w.lora_a
        for t in a if isinstance(a, list) else [a]:
            if t is not None:
                rank = max(rank, int(t.shape[0]))
    return rank or int(lora.rank)


def library_key(root: str | Path) -> str:
    return str(Path(root).expanduser().resolve())


STATE = PluginState()
