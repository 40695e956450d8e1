"""Merging inside the worker: a routing adapter becomes a LoRAModel with no file read.

Called from the plugin's patch of `WorkerLoRAManager._load_adapter` for requests whose name
carries a routing (`protocol.py`). Two strategies:

- "mix": a placeholder LoRAModel (no weights: vLLM zeroes its slot) plus the routing in
  `STATE.routes`; the plugin's punica wrapper sends its tokens through the mix op over the
  library's resident bank. Costs nothing per request; the routing stays mutable.
- "expand": the merge (`merge.merge_experts`) of the request's experts, read on demand into
  the worker's LRU expert cache (no resident bank: memory and start-up do not grow with the
  library), turned into a LoRAModel with `LoRAModel.from_lora_tensors`. An ordinary adapter from then on: it works
  with vLLM's stock ops and on GPUs. Shared-A libraries merge exactly at the experts' rank;
  others are rank-expanded and, above `max_lora_rank`, compressed to it (the optimal
  rank-b approximation; its relative error is kept in `STATE.built` for the engine to report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.peft_helper import PEFTHelper

from ttmm_vllm.merge import merge_experts
from ttmm_vllm.vllm_plugin.bank import ExpertBank
from ttmm_vllm.vllm_plugin.protocol import RoutingSpec
from ttmm_vllm.vllm_plugin.state import STATE, PluginState, library_key

log = logging.getLogger("vllm.ttmm.worker_merge")  # a child of vLLM's logger: shown with its logs

# The placeholder's only entry: a name no model has, so vLLM finds no weights for any layer
# (it zeroes the adapter's slot) while `_create_merged_loras_inplace`, which reads the first
# entry, still has one.
PLACEHOLDER_MODULE = "ttmm.routing_placeholder"
_PEFT_PREFIX = "base_model.model."


def load_routing_adapter(worker_manager: Any, lora_request: Any, spec: RoutingSpec,
                         state: PluginState = STATE) -> LoRAModel:
    """Build the adapter a routing LoRARequest names (see the module docstring)."""
    strategy = spec.strategy or state.config.worker_merge
    lora_id = lora_request.lora_int_id
    if strategy == "off":
        raise ValueError("ttmm: in-worker merging is off (PluginConfig.worker_merge='off'); "
                         f"routing adapter {lora_request.lora_name!r} cannot be served")
    if strategy == "mix":
        bank = state.bank(lora_request.lora_path)
        if not state.mix_ops_active:
            raise ValueError("ttmm: 'mix' routing adapters need the plugin's LoRA ops "
                             "(PluginConfig.enabled=True on the CPU backend); use 'expand'")
        live = state.routes.get(lora_id)
        if live is None or live.name != lora_request.lora_name:
            ids, weights = servable(bank, spec.expert_ids, spec.weights, lora_request.lora_name)
            state.set_route(lora_id, bank, ids, weights, lora_request.lora_name)
        # else: vLLM evicted this adapter from its cache and reloads it; a re-routing made
        # since (`ttmm_set_routing`) stays in force rather than reverting to the name's, and
        # it keeps the bank it was built on if that still holds an expert removed since
        # (`PluginState.update_bank` moved it to the new bank otherwise).
        return placeholder_adapter(lora_id, worker_manager._lora_model_cls)
    cache = state.experts(lora_request.lora_path)
    t0 = time.perf_counter()
    experts = cache.get_many(spec.expert_ids)
    merged = merge_experts(experts, spec.weights,
                           rank_budget=worker_manager.lora_config.max_lora_rank,
                           shared_a=cache.library.manifest.lora.shared_a)  # exact at r
    merge_ms = (time.perf_counter() - t0) * 1e3
    if merged.rel_error > 0:
        log.debug("ttmm: expand merge of %s has rank %d > max_lora_rank; compressed "
                  "(relative error %.3g)", lora_request.lora_name,
                  sum(e.rank for e in experts), merged.rel_error)
    tensors = {}
    for name, (a, b) in merged.modules.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b
    helper = PEFTHelper(r=merged.rank, lora_alpha=merged.rank,
                        target_modules=sorted({n.rsplit(".", 1)[-1] for n in merged.modules}))
    helper.validate_legal(worker_manager.lora_config)
    lora = worker_manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_id, tensors=tensors, peft_helper=helper, device="cpu",
        dtype=worker_manager.lora_config.lora_dtype,
        model_vocab_size=worker_manager.vocab_size,
    )
    shared = cache.library.manifest.lora.shared_a
    state.note_ordinary(lora_id, merged.rank,
                        shared_a=library_key(lora_request.lora_path) if shared else None)
    state.built[lora_id] = {"rank": merged.rank, "rel_error": merged.rel_error,
                            "merge_ms": merge_ms}
    return lora


def servable(bank: ExpertBank, expert_ids: Sequence[int], weights: Sequence[float],
             name: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The routing restricted to experts the bank holds, weights renormalised.

    The service routes only over active experts, so a missing one means the request was
    routed just before a live RemoveExpert and its adapter loads just after. Raising here
    would fail inside vLLM's engine step; serving the remaining experts (the base model if
    none remain) is the closest answer, and the log says so.
    """
    keep = [(int(e), float(w)) for e, w in zip(expert_ids, weights, strict=True)
            if int(e) in bank.index_of]
    if len(keep) == len(expert_ids):
        return tuple(int(e) for e in expert_ids), tuple(float(w) for w in weights)
    log.warning("ttmm: adapter %s names experts removed since it was routed (%s); serving "
                "the remaining ones", name,
                sorted(set(map(int, expert_ids)) - {e for e, _ in keep}))
    total = sum(w for _, w in keep)
    if not keep or total <= 0:
        return (), ()
    return tuple(e for e, _ in keep), tuple(w / total for _, w in keep)


def placeholder_adapter(lora_id: int, cls: type[LoRAModel] = LoRAModel) -> LoRAModel:
    """A LoRAModel that adapts no layer of the model (its slot stays zero)."""
    import torch

    w = LoRALayerWeights(PLACEHOLDER_MODULE, 1, 1, torch.zeros(1, 1), torch.zeros(1, 1))
    return cls(lora_id, 1, {PLACEHOLDER_MODULE: w})
