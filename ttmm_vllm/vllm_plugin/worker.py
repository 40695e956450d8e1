"""Worker-side RPCs, added to vLLM's worker class through `worker_extension_cls`.

vLLM 0.32's `AsyncLLM.collective_rpc(method: str, args=...)` calls a method by name on every
worker; `ParallelConfig.worker_extension_cls` mixes this class into the worker class so the
names exist (`config.engine_kwargs` sets it). The calls run in the engine loop between steps,
so a routing never changes in the middle of a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttmm_vllm.vllm_plugin.state import STATE, library_key


class TTMMWorkerExtension:
    def ttmm_set_routing(self, lora_int_id: int, expert_ids: Sequence[int],
                         weights: Sequence[float]) -> bool:
        """Re-route a live "mix" adapter: the tokens computed from the next step on use it."""
        STATE.change_route(int(lora_int_id), expert_ids, weights)
        return True

    def ttmm_get_routing(self, lora_int_id: int) -> tuple[list[int], list[float]] | None:
        route = STATE.routes.get(int(lora_int_id))
        return None if route is None else (list(route.expert_ids), list(route.weights))

    def ttmm_adapter_info(self, lora_int_id: int) -> dict[str, float] | None:
        """What an "expand" merge built for this adapter: rank, relative error, merge time."""
        return STATE.built.get(int(lora_int_id))

    def ttmm_add_expert(self, library_root: str, expert_id: int) -> bool:
        """Make an expert just committed to the library's manifest servable in this worker."""
        if STATE.config.worker_merge == "mix":
            STATE.bank(library_root)  # loads the bank if it was not resident
        lib = STATE.refresh_library(library_root)
        active = {e.id for e in lib.manifest.active_experts}
        if int(expert_id) not in active:
            raise RuntimeError(f"ttmm: expert {expert_id} is not active in {library_root}")
        return True

    def ttmm_remove_expert(self, library_root: str, expert_id: int) -> bool:
        """Forget a removed expert (bank and cache); adapters in flight keep theirs."""
        STATE.refresh_library(library_root, removed=int(expert_id))
        return True

    def ttmm_forget_library(self, library_root: str) -> bool:
        """Drop a library's resident bank (benchmarks moving to another library); adapters
        in flight keep theirs."""
        STATE.forget_bank(library_root)
        return True

    def ttmm_info(self) -> dict[str, Any]:
        """What the plugin holds in this worker (for health pages and tests)."""
        return {
            "config": STATE.config.to_dict(),
            "mix_ops_active": STATE.mix_ops_active,
            "banks": {root: {"experts": list(b.expert_ids), "layers": len(b.modules),
                             "bytes": b.nbytes} for root, b in STATE.banks.items()},
            "expert_caches": {root: {"experts": len(c), "bytes": c.nbytes}
                              for root, c in STATE.caches.items()},
            "routes": {k: [list(r.expert_ids), list(r.weights)]
                       for k, r in STATE.routes.items()},
            "ranks": dict(STATE.ranks),
            # "mix" adapters still on a bank their library replaced (they name an expert
            # removed since): each keeps that bank alive until vLLM drops the adapter
            "routes_on_retired_banks": sorted(
                k for k, r in STATE.routes.items()
                if STATE.banks.get(library_key(r.bank.root)) is not r.bank),
        }
