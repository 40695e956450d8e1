"""`ttmm serve --ray`: the service as Ray Serve deployments behind Ray Serve's gRPC proxy.

    client --gRPC--> Ray Serve gRPC proxy --> Frontend --(routing: a few numbers)--> EngineReplica x N
                     (ttmm.v1.TTMMService,     validate, embed, route     vLLM + merged experts
                      grpc.health.v1.Health)   (TTMMService, TTMMServicer)

Ray Serve's gRPC proxy forwards each RPC to the deployment method with the RPC's name, so the
Frontend's methods are named like the RPCs of proto/ttmm/v1/ttmm.proto and reuse the gRPC
server's servicer (server.TTMMServicer) as it is: same validation, admission, auth and error
codes. The engine is not in the Frontend: `RemoteEngine` presents the part of
`engine.Engine` that `TTMMService` uses and sends each request's prompt ids, sampling options
and routing to an EngineReplica through a deployment handle. The replica streams the engine's
steps back.

Which replica gets a request is the handle's request router:
- spread (default): Ray Serve's power-of-two-choices on queue lengths;
- affinity (`--affinity`): `ExpertAffinityRouter`, rendezvous hashing on the routing's top
  expert. Requests that share a top expert go to the same replica (so its merged adapters,
  expert tensors and prefix cache stay warm), unless that replica is at its
  `max_ongoing_requests`; then the others, least loaded first.

What the proxy carries and what it does not (tests/serve/test_ray_serve.py shows each): unary and
server-streaming RPCs, status codes and details set by the servicer, request metadata (bearer
tokens), client cancellation, server reflection; the standard health service is carried as a
forwarded RPC (the Frontend answers `Check`/`Watch`). It does not carry TLS (the proxy
listens in plaintext on all interfaces), and it decodes requests itself, so an undecodable
request gets the proxy's error, not INVALID_ARGUMENT naming the field.

The library and the base model must be at the same path on every node that runs a replica
(a shared or replicated folder); training (`ttmm build --ray`) needs no shared filesystem.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ttmm_vllm.library import Library
from ttmm_vllm.routing.router import Routing
from ttmm_vllm.serve.engine import Engine
from ttmm_vllm.serve.engine_api import EngineConfig, Sampling, Step
from ttmm_vllm.serve.errors import NotFound
from ttmm_vllm.serve.grpc_server import ServerConfig, TTMMServicer, grpc_status
from ttmm_vllm.serve.metrics import Timings
from ttmm_vllm.serve.ray_grpc import SERVICER_FUNCTIONS
from ttmm_vllm.stubs import SERVICE_NAME

log = logging.getLogger(__name__)

APP_NAME = "ttmm"


# --------------------------------------------------------------------------- affinity

def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[int]:
    """Indices of `replica_ids`, most preferred first, for `key` (highest random weight).

    Every key has its own ranking of the replicas; adding or removing a replica moves only
    the keys that ranked it first, so the others keep their warm replica.
    """
    def score(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

    return sorted(range(len(replica_ids)), key=lambda i: score(replica_ids[i]), reverse=True)


def affinity_key(routing: Routing) -> str | None:
    """Requests that share this key prefer one replica: the routing's top expert."""
    if routing.is_base:
        return None
    top = max(range(len(routing.weights)), key=lambda i: routing.weights[i])
    return f"expert:{routing.expert_ids[top]}"


class ExpertAffinityRouter(RequestRouter):
    """Ray Serve request router: the replica the request's affinity key ranks first, and the
    rest (least loaded first, Ray Serve's probing) when it is full."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity_key") if pending_request else None
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        ranked = [candidate_replicas[i] for i in order]
        return [ranked[:1], ranked[1:]]


# --------------------------------------------------------------------------- engine replicas

@dataclass
class RemoteStep:
    """One engine step as it travels from a replica to the Frontend, with the request's
    stage timings so far and its merged adapter's facts. `step` None: the trailer sent after
    the last step (the final timings)."""

    step: Step | None
    timings: dict[str, float]
    adapter: dict[str, Any]
    replica: str = ""
    adapters_created: int = 0  # merged adapters this replica has built so far


_ENGINE_STAGES = ("merge_ms", "register_ms", "queue_ms", "generate_ms")


class EngineReplica:
    """One vLLM engine with the library's experts (a Ray Serve replica)."""

    async def __init__(self, library_dir: str, engine_config: EngineConfig,
                       model_dir: str | None = None):
        library = Library.open(library_dir)
        self.engine = await Engine.start(library, engine_config, model_dir)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.requests = 0

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: Sampling,
                       routing: Routing, affinity_key: str | None = None
                       ) -> AsyncIterator[RemoteStep]:
        self.requests += 1
        timings = Timings()
        info: dict[str, Any] = {}
        async for step in self.engine.generate(request_id, prompt_ids, sampling, routing,
                                               timings):
            info = info or self.engine.adapter_info(routing)
            yield RemoteStep(step, timings.as_dict(), info, self.replica,
                             self.engine.registry.created)
        yield RemoteStep(None, timings.as_dict(), info, self.replica,
                         self.engine.registry.created)

    async def score(self, request_id: str, prompt_ids: list[int], continuation_ids: list[int],
                    routing: Routing, affinity_key: str | None = None
                    ) -> tuple[list[float], dict[str, float], dict[str, Any], str]:
        self.requests += 1
        timings = Timings()
        lps = await self.engine.score(request_id, prompt_ids, continuation_ids, routing,
                                      timings)
        return lps, timings.as_dict(), self.engine.adapter_info(routing), self.replica

    def stats(self, affinity_key: str | None = None) -> dict[str, Any]:
        """This replica's counters (`affinity_key` lets the affinity router pick the replica
        a key's requests go to)."""
        return {"replica": self.replica, "requests": self.requests,
                "adapters_created": self.engine.registry.created,
                **self.engine.adapter_stats()}

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        await self.engine.shutdown()


class RemoteEngine:
    """The engine as `TTMMService` uses it, with vLLM in EngineReplica deployments.

    It sends what a request needs (prompt ids, sampling options, routing) through a
    deployment handle, copies the replica's stage timings into the request's `Timings`, and
    remembers each request's merged-adapter facts for the response.
    """

    def __init__(self, handle: Any, config: EngineConfig, tokenizer: Any):
        self.handle = handle
        self.config = config
        self.tokenizer = tokenizer
        self.is_running = True
        self._adapters: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.replica_stats: dict[str, dict[str, int]] = {}

    def _remember(self, request_id: str, routing: Routing, adapter: dict[str, Any],
                  replica: str) -> None:
        self._adapters[request_id] = adapter
        while len(self._adapters) > 4096:
            self._adapters.popitem(last=False)
        s = self.replica_stats.setdefault(replica, {"requests": 0, "keys": {}})
        s["requests"] += 1
        key = affinity_key(routing) or "base"
        s["keys"][key] = s["keys"].get(key, 0) + 1

    def adapter_info(self, routing: Routing, request_id: str = "") -> dict[str, Any]:
        """What the replica reported for this request's adapter (kept for the last 4096)."""
        return self._adapters.get(request_id) or {}

    async def generate(self, request_id: str, prompt_ids: Sequence[int], sampling: Sampling,
                       routing: Routing, timings: Timings | None = None
                       ) -> AsyncIterator[Step]:
        timings = timings if timings is not None else Timings()
        gen = self.handle.options(stream=True, method_name="generate").remote(
            request_id, list(prompt_ids), sampling, routing, affinity_key=affinity_key(routing))
        done = False
        first = True
        try:
            async for item in gen:
                for k in _ENGINE_STAGES:
                    setattr(timings, k, item.timings[k])
                if first:
                    self._remember(request_id, routing, item.adapter, item.replica)
                    first = False
                self.replica_stats[item.replica]["adapters_created"] = item.adapters_created
                if item.step is not None:
                    yield item.step
            done = True
        finally:
            if not done:  # the client went away: stop the replica's request (vLLM aborts it)
                gen.cancel()

    async def score(self, request_id: str, prompt_ids: Sequence[int],
                    continuation_ids: Sequence[int], routing: Routing,
                    timings: Timings | None = None) -> list[float]:
        timings = timings if timings is not None else Timings()
        lps, t, info, replica = await self.handle.options(method_name="score").remote(
            request_id, list(prompt_ids), list(continuation_ids), routing,
            affinity_key=affinity_key(routing))
        self._remember(request_id, routing, info, replica)
        for k in _ENGINE_STAGES:
            setattr(timings, k, t[k])
        return lps

    def adapter_stats(self) -> dict[str, int]:
        return {}

    async def shutdown(self) -> None:
        return None


# --------------------------------------------------------------------------- the front door

class RequestFailed(Exception):
    """What a Frontend method raises once it has set the status code and details on Ray
    Serve's gRPC context (which the proxy sends). A plain one-argument exception, because Ray
    pickles it to the proxy and the domain errors' constructors take other arguments."""


def _fail(e: BaseException, grpc_context: Any) -> RequestFailed:
    """Map a domain error to its status code and message as grpc_server.py does."""
    code, message = grpc_status(e)
    if code.name == "INTERNAL":
        log.error("request failed", exc_info=e)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return RequestFailed(message)


class Frontend:
    """The ingress deployment: its methods are the RPCs of ttmm.v1.TTMMService (and
    grpc.health.v1.Health); each takes the request message and Ray Serve's gRPC context."""

    async def __init__(self, library_dir: str, engine: Any, engine_config: EngineConfig,
                       server_config: ServerConfig, model_dir: str | None = None,
                       embedder_path: str | None = None):
        from transformers import AutoTokenizer

        from ttmm_vllm.routing.embed import load_library_embedder
        from ttmm_vllm.serve.service import TTMMService

        library = Library.open(library_dir)
        model = Path(model_dir) if model_dir else library.served_model_dir()
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model))
        embedder = await asyncio.to_thread(load_library_embedder, library.manifest.embedder,
                                           embedder_path)
        self.remote = RemoteEngine(engine, engine_config, tokenizer)
        self.service = TTMMService(library, self.remote, embedder)
        self.servicer = TTMMServicer(self.service, server_config)

    async def __del__(self) -> None:
        await self.service.shutdown()

    async def _unary(self, name: str, request: Any, grpc_context: Any) -> Any:
        try:
            return await getattr(self.servicer, name)(request, grpc_context)
        except Exception as e:
            raise _fail(e, grpc_context) from None

    async def Generate(self, request, grpc_context):
        return await self._unary("Generate", request, grpc_context)

    async def GenerateStream(self, request, grpc_context):
        try:
            async for chunk in self.servicer.GenerateStream(request, grpc_context):
                yield chunk
        except Exception as e:
            raise _fail(e, grpc_context) from None

    async def Route(self, request, grpc_context):
        return await self._unary("Route", request, grpc_context)

    async def Score(self, request, grpc_context):
        return await self._unary("Score", request, grpc_context)

    async def ListExperts(self, request, grpc_context):
        return await self._unary("ListExperts", request, grpc_context)

    async def AddExpert(self, request, grpc_context):
        return await self._unary("AddExpert", request, grpc_context)

    async def RemoveExpert(self, request, grpc_context):
        return await self._unary("RemoveExpert", request, grpc_context)

    # grpc.health.v1.Health: the Frontend answers for the application. Ray Serve replaces
    # an EngineReplica whose engine fails its health check (EngineReplica.check_health).
    def _health(self, request) -> Any:
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            raise NotFound(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Check(self, request, grpc_context):
        try:
            return self._health(request)
        except NotFound as e:
            raise _fail(e, grpc_context) from None

    async def Watch(self, request, grpc_context):
        try:
            yield self._health(request)
        except NotFound as e:
            raise _fail(e, grpc_context) from None
        await asyncio.Event().wait()  # the status does not change while this replica lives

    def stats(self) -> dict[str, Any]:
        """Requests per engine replica and affinity key, as seen from here (for benchmarks
        and operators)."""
        return {"replicas": dict(self.remote.replica_stats)}


# --------------------------------------------------------------------------- deploying

@dataclass(frozen=True)
class RayServeConfig:
    """How the service is laid out on Ray Serve."""

    address: str = "local"  # ttmm_vllm.ray_runtime: "local", "auto" or a cluster address
    replicas: int = 1  # EngineReplica count (each starts its own vLLM engine)
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    frontends: int = 1
    frontend_cpus: float = 0.5
    affinity: bool = False  # ExpertAffinityRouter instead of power-of-two-choices
    grpc_port: int = 50051
    http_port: int = 8000  # Ray Serve always starts its HTTP proxy too (unused by ttmm)
    app_name: str = APP_NAME
    # Replica actors' environment (the Ray runtime's job environment does not reach the
    # detached Serve controller's actors).
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.frontends < 1:
            raise ValueError(f"frontend replicas must be >= 1, got {self.frontends}")
        if self.replica_cpus <= 0 or self.frontend_cpus <= 0:
            raise ValueError("replica and frontend CPUs must be > 0")
        if self.replica_gpus < 0:
            raise ValueError(f"replica GPUs must be >= 0, got {self.replica_gpus}")


def build_app(library_dir: str | Path, engine_config: EngineConfig,
              server_config: ServerConfig, config: RayServeConfig, *,
              model_dir: str | Path | None = None, embedder_path: str | Path | None = None):
    """The Ray Serve application: Frontend bound to N EngineReplicas."""
    if server_config.tls_cert or server_config.tls_client_ca:
        raise ValueError("Ray Serve's gRPC proxy listens in plaintext: terminate TLS in front "
                         "of it (a load balancer), or serve without --ray")
    from ray.serve.config import RequestRouterConfig

    env = {"env_vars": dict(config.env_vars)}
    router = {}
    if config.affinity:
        router["request_router_config"] = RequestRouterConfig(
            request_router_class=f"{__name__}.ExpertAffinityRouter")
    engine = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=config.replicas,
        max_ongoing_requests=engine_config.max_num_seqs,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                           "runtime_env": env},
        graceful_shutdown_timeout_s=server_config.grace_s, **router,
    ).bind(str(library_dir), engine_config, str(model_dir) if model_dir else None)
    frontend = serve.deployment(
        Frontend, name="Frontend", num_replicas=config.frontends,
        max_ongoing_requests=server_config.max_inflight + 8,
        ray_actor_options={"num_cpus": config.frontend_cpus, "runtime_env": env},
        graceful_shutdown_timeout_s=server_config.grace_s,
    )
    return frontend.bind(str(library_dir), engine, engine_config, server_config,
                         str(model_dir) if model_dir else None,
                         str(embedder_path) if embedder_path else None)


@dataclass
class Deployed:
    frontend: Any  # the Frontend's DeploymentHandle (its `stats` method, for operators)
    grpc_port: int  # where Ray Serve's gRPC proxy listens


def _grpc_options_in_use() -> Any:
    """The gRPC options of the Serve instance running in this cluster (Serve keeps the first
    ones it was started with)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_grpc_config.remote())


def deploy(library_dir: str | Path, engine_config: EngineConfig, server_config: ServerConfig,
           config: RayServeConfig, *, model_dir: str | Path | None = None,
           embedder_path: str | Path | None = None) -> Deployed:
    """Start Ray Serve's proxies (gRPC on `config.grpc_port`) and run the application, once
    every replica is up. Needs a Ray connection (ttmm_vllm.ray_runtime.ray_runtime).

    When Serve already runs in the cluster it keeps its own proxy settings: the port is
    reported from there, and a Serve started without the ttmm services is refused (its proxy
    would answer UNIMPLEMENTED)."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port,
                                 grpc_servicer_functions=SERVICER_FUNCTIONS))
    running = _grpc_options_in_use()
    missing = sorted(set(SERVICER_FUNCTIONS) - set(running.grpc_servicer_functions))
    if missing:
        raise RuntimeError(f"Ray Serve already runs in this cluster without the ttmm gRPC "
                           f"services ({', '.join(missing)}); shut it down (`serve shutdown`) "
                           "or start it with them")
    if running.port != config.grpc_port:
        log.warning("Ray Serve already runs with its gRPC proxy on port %d (not %d)",
                    running.port, config.grpc_port)
    app = build_app(library_dir, engine_config, server_config, config, model_dir=model_dir,
                    embedder_path=embedder_path)
    handle = serve.run(app, name=config.app_name, route_prefix=f"/{config.app_name}")
    return Deployed(handle, running.port)


def serve_until_signalled(library_dir: str | Path, engine_config: EngineConfig,
                          server_config: ServerConfig, config: RayServeConfig, *,
                          model_dir: str | Path | None = None,
                          embedder_path: str | Path | None = None) -> int:
    """`ttmm serve --ray`: deploy, print the address, wait for SIGTERM or SIGINT, take the
    application down (and the local Ray, when this process started it)."""
    import signal
    import threading

    from ttmm_vllm.ray_runtime import ray_runtime

    stop = threading.Event()
    with ray_runtime(config.address):
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        deployed = deploy(library_dir, engine_config, server_config, config,
                          model_dir=model_dir, embedder_path=embedder_path)
        lib = Library.open(library_dir)
        print(f"serving {lib.root} ({lib.num_experts} experts) on Ray Serve: gRPC port "
              f"{deployed.grpc_port}, {config.replicas} engine replica(s), "
              f"{'expert affinity' if config.affinity else 'spread'}", flush=True)
        while not stop.wait(1.0):  # wakes up for signal handlers
            pass
        log.info("stopping: deleting the %s application", config.app_name)
        serve.delete(config.app_name)
        if config.address == "local":
            serve.shutdown()
    return 0
