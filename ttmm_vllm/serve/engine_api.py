"""What crosses the engine boundary: its configuration, a request's sampling options and
steps, and `EngineLike`, the interface the service drives.

Two engines implement it: `engine.Engine` (vLLM in this process) and `ray_serve.RemoteEngine`
(vLLM in Ray Serve replicas). The service and the front doors see nothing else of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ttmm_vllm.routing.router import Routing
from ttmm_vllm.serve.metrics import Timings

# Most alternatives per token a request may ask for (Sampling.top_logprobs, the prompt's in
# score_top): vLLM's default max_logprobs, which bounds both.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    # Distinct adapters in one step (vLLM's max_loras); more distinct routings wait their turn.
    max_loras: int = 32
    # Merged adapters kept registered while unused (beyond: removed, files deleted).
    idle_adapters: int = 32
    # "worker": merge inside vLLM's worker (ttmm plugin); "disk": rank-expanded PEFT folder.
    merge_path: str = "worker"
    # In-worker strategy: "auto" (the cost model of serve/serving_path.py picks), "mix"
    # (resident experts, per-token weights; CPU only) or "expand" (one merged adapter per
    # request in vLLM's slots, at rank_budget; exact for shared-A libraries).
    worker_merge: str = "auto"
    # The plugin's CPU LoRA ops (False: vLLM's stock ops).
    plugin_ops: bool = True
    # Rank of a per-request merged adapter: above it the merge is compressed to it (the
    # optimal rank-b approximation; its error is reported per request). None: worker
    # "expand" uses the experts' rank; the disk path the exact rank (r x max_active, <= 512).
    rank_budget: int | None = None
    expert_cache_bytes: int = 2 << 30
    kv_cache_bytes: int = 1 << 30
    # "auto": float32 on the CPU (no native bf16 there), bfloat16 on GPUs.
    dtype: str = "auto"
    enforce_eager: bool = True
    scratch_dir: str | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    # GPUs: the fraction of GPU memory vLLM may use (None: vLLM's default), GPUs per engine.
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    # Any other vLLM engine argument (AsyncEngineArgs field -> value), applied last.
    engine_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.merge_path not in ("worker", "disk"):
            raise ValueError(f"merge_path must be 'worker' or 'disk', got {self.merge_path!r}")
        if self.worker_merge not in ("auto", "mix", "expand"):
            raise ValueError("worker_merge must be 'auto', 'mix' or 'expand', got "
                             f"{self.worker_merge!r}")
        if self.rank_budget is not None and not 1 <= self.rank_budget <= 512:
            raise ValueError(f"rank_budget must be in [1, 512], got {self.rank_budget}")
        for name in ("max_model_len", "max_num_seqs", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Sampling:
    """Sampling options, validated by the server; independent of vLLM's types."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    # With logprobs: the k most likely tokens per generated token, besides the chosen one
    # (vLLM's SamplingParams.logprobs=k; 0: the chosen token only). At most MAX_TOP_LOGPROBS.
    top_logprobs: int = 0


@dataclass
class Step:
    """What one engine step adds to a request (deltas), and its state."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # With Sampling.top_logprobs k > 0, per token: token id -> log-probability of the k most
    # likely tokens and the chosen one (k or k + 1 entries), most likely first
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Re-routing (service.py): (index of the first generated token that used it, routing)
    switches: list[tuple[int, Routing]] = field(default_factory=list)



class EngineLike(Protocol):
    """The engine as the service uses it."""

    config: EngineConfig
    tokenizer: Any

    @property
    def is_running(self) -> bool:
        """False once the engine has died (health turns NOT_SERVING)."""
        ...

    def generate(self, request_id: str, prompt_ids: Sequence[int], sampling: Sampling,
                 routing: Routing, timings: Timings | None = None) -> AsyncIterator[Step]:
        """Stream a request's steps under its routing's merged experts; cancelling the
        consumer aborts the request."""
        ...

    async def score(self, request_id: str, prompt_ids: Sequence[int],
                    continuation_ids: Sequence[int], routing: Routing,
                    timings: Timings | None = None) -> list[float]:
        """log p(continuation_i | prompt, continuation_<i) under the routing's merge.

        An engine may also offer `score_top(request_id, prompt_ids, continuation_ids,
        routing, top_logprobs, timings) -> (logprobs, alternatives)`: the same, with per
        continuation token the `top_logprobs` most likely tokens besides it (token id ->
        log-probability, most likely first; vLLM's prompt_logprobs=k). `engine.Engine` does;
        without it the service reports each token's own log-probability only."""
        ...

    def adapter_info(self, routing: Routing, request_id: str = "") -> dict[str, Any]:
        """What served a routing: {"rank", "rel_error"} of its merged adapter ({} if unknown)."""
        ...

    def adapter_stats(self) -> dict[str, int]:
        """Counters for metrics: registered/in_use/idle adapters, expert cache bytes."""
        ...

    async def add_expert(self, expert_id: int) -> None: ...

    async def remove_expert(self, expert_id: int) -> None: ...

    async def shutdown(self) -> None: ...
