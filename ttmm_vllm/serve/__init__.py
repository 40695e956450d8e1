"""Serve time: the request path from a front door to vLLM.

    grpc_server.py   the gRPC front door: messages <-> domain objects, admission, auth, TLS,
                     health, reflection, metrics endpoint, graceful drain
    http_server.py   the OpenAI-compatible HTTP door (FastAPI + uvicorn) on the same service
    access.py        what both doors share: bearer tokens -> Client, admission (in-flight bound)
    chat.py          chat messages -> the base model's chat template; the text routing embeds
    service.py       validate -> route (embed, index, weights) -> engine; transport-free
    engine_api.py    what crosses the engine boundary: EngineConfig, Sampling, Step, EngineLike
    engine.py        EngineLike over vLLM's AsyncLLM, one merged adapter per distinct routing
    adapter_registry.py   the engine's merged adapters (one per distinct routing)
    errors.py        every error a request can end in, and the one map to status codes
    metrics.py       Prometheus metrics and per-request stage timings
    ray_serve.py, ray_grpc.py   the same service as Ray Serve deployments
    launch.py        ServeConfig and start(config): the one start sequence

`from ttmm_vllm.serve import ServeConfig, start` (loaded lazily: importing a submodule, as
Ray's gRPC proxy does with ray_grpc, stays light).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("ServeConfig", "start"):
        from ttmm_vllm.serve import launch

        return getattr(launch, name)
    raise AttributeError(name)
