"""What crosses the engine boundary: its configuration, a request's sampling options and
steps, and `EngineLike`, the interface the service drives.

Two engines implement it: `engine.Engine` (vLLM in this process) and `ray_serve.RemoteEngine`
(vLLM in Ray Serve replicas). The service and the front doors see nothing else of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ttmm_vllm.routing.router import Routing
from ttmm_vllm.serve.metrics import Timings

# vLLM accepts only these max_lora_rank values.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def allowed_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (capped at 512)."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    return LORA_RANKS[-1]


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
    # In-worker strategy: "mix" (resident experts, per-token weights) or "expand".
    worker_merge: str = "mix"
    # The plugin's CPU LoRA ops (False: vLLM's stock ops).
    plugin_ops: bool = True
    # Largest merged rank (disk path): above it the merge is compressed by SVD. None: the
    # library's rank x max_active, capped at vLLM's 512.
    rank_budget: int | None = None
    expert_cache_bytes: int = 2 << 30
    kv_cache_bytes: int = 1 << 30
    dtype: str = "float32"
    enforce_eager: bool = True
    scratch_dir: str | None = None
    seed: int = 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.merge_path not in ("worker", "disk"):
            raise ValueError(f"merge_path must be 'worker' or 'disk', got {self.merge_path!r}")
        if self.worker_merge not in ("mix", "expand"):
            raise ValueError(f"worker_merge must be 'mix' or 'expand', got {self.worker_merge!r}")
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


@dataclass
class Step:
    """What one engine step adds to a request (deltas), and its state."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
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
        """log p(continuation_i | prompt, continuation_<i) under the routing's merge."""
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
