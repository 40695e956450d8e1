"""What Ray Serve's gRPC proxy imports (by import path) to learn the services it forwards.

Kept apart from ray_serve.py so the proxy process imports gRPC stubs only, not torch: the
proxy calls these with a placeholder servicer, keeps the method names and request decoders,
and forwards each call to the ingress deployment's method of the same name.
"""

from __future__ import annotations

from typing import Any


def add_ttmm_servicer(servicer: Any, server: Any) -> None:
    """ttmm.v1.TTMMService (proto/ttmm/v1/ttmm.proto)."""
    from ttmm_vllm.stubs import pb2_grpc

    pb2_grpc.add_TTMMServiceServicer_to_server(servicer, server)


def add_health_servicer(servicer: Any, server: Any) -> None:
    """grpc.health.v1.Health, answered by the ingress deployment like any other RPC."""
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


SERVICER_FUNCTIONS = [f"{__name__}.add_ttmm_servicer", f"{__name__}.add_health_servicer"]
