"""Prometheus metrics: per-stage timings, request outcomes, adapter and expert caches.

One registry per server (tests start several in one process), exported over HTTP by the server
(the gRPC server's metrics port, the HTTP door's /metrics). It also exports vLLM's own engine
metrics (`vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
`vllm:kv_cache_usage_perc`, ...), which vLLM keeps in prometheus_client's default registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("embed", "search", "merge", "register", "queue", "generate", "total")
# 0.1 ms .. ~100 s
_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5,
            10, 30, 100)


@dataclass
class Timings:
    """Milliseconds per stage of one request; returned with its result."""

    embed_ms: float = 0.0
    search_ms: float = 0.0
    merge_ms: float = 0.0
    register_ms: float = 0.0
    queue_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class VllmMetrics:
    """A collector that forwards vLLM's metric families (named `vllm:*`) from the default
    registry, where vLLM's Prometheus stat logger puts them."""

    def __init__(self, source: CollectorRegistry = REGISTRY):
        self.source = source

    def collect(self):
        for family in self.source.collect():
            if family.name.startswith("vllm:"):
                yield family


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.stage = Histogram("ttmm_stage_seconds", "Time per request stage", ["stage"],
                               registry=r, buckets=_BUCKETS)
        self.requests = Counter("ttmm_requests", "Requests by RPC and gRPC status",
                                ["rpc", "code"], registry=r)
        self.tokens = Counter("ttmm_generated_tokens", "Generated tokens", registry=r)
        self.inflight = Gauge("ttmm_inflight_requests", "Requests admitted and not finished",
                              registry=r)
        self.adapters = Gauge("ttmm_adapters", "Merged adapters registered with vLLM",
                              ["state"], registry=r)
        self.active_experts = Histogram("ttmm_active_experts", "Experts merged per request",
                                        registry=r, buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100))
        self.expert_cache_bytes = Gauge("ttmm_expert_cache_bytes",
                                        "Expert tensors held in host memory", registry=r)
        self.rejected = Counter("ttmm_rejected", "Requests refused by admission control",
                                registry=r)
        r.register(VllmMetrics())

    def observe(self, t: Timings) -> None:
        for stage in STAGES:
            self.stage.labels(stage).observe(getattr(t, f"{stage}_ms") / 1000.0)

    def set_adapter_stats(self, stats: dict[str, int]) -> None:
        for state in ("registered", "in_use", "idle"):
            self.adapters.labels(state).set(stats.get(state, 0))
