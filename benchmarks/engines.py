"""One vLLM engine for the LoRA benchmarks (lora_throughput, lora_scale): the settings a row
needs, started the same way for every row so rows compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineSpec:
    lora: bool = True
    plugin: bool = True
    max_loras: int = 32
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None


def start_engine(model_dir: Path, spec: EngineSpec, lib_root: Path | None, kv_bytes: int):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ttmm_vllm.vllm_plugin.config import PluginConfig, engine_kwargs

    kw = dict(model=str(model_dir), tokenizer=str(model_dir), dtype="float32",
              enforce_eager=True, max_model_len=512, max_num_seqs=32, seed=0,
              # The stock op gathers a (tokens, out, max_lora_rank) tensor: at rank 256 a
              # 2048-token prefill step would need 3.2 GB for gate_up alone. Same cap for all.
              max_num_batched_tokens=1024,
              enable_prefix_caching=False, kv_cache_memory_bytes=kv_bytes,
              disable_log_stats=True)
    if spec.lora:
        pc = PluginConfig(enabled=spec.plugin,
                          library=str(lib_root) if spec.plugin and lib_root else None)
        kw.update(engine_kwargs(pc, max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank,
                                max_cpu_loras=spec.max_cpu_loras or 2 * 32 + spec.max_loras))
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
