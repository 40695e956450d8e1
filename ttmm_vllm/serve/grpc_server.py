"""The gRPC server: the only module that knows gRPC.

Translates ttmm.v1 messages to the service's domain objects and back, and owns what a
production front door needs: admission control (RESOURCE_EXHAUSTED instead of an unbounded
queue), errors mapped to status codes with messages that name the field, authentication
(bearer tokens, optional TLS / mutual TLS), the standard health service and server reflection,
a Prometheus endpoint, engine-death detection, and a graceful drain on shutdown. Every RPC is
asynchronous end to end; a client's deadline or cancellation aborts its request in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ttmm_vllm.routing.router import Mode, Routing
from ttmm_vllm.serve.access import Access, Admission  # noqa: F401 - Admission: re-exported
from ttmm_vllm.serve.chat import ChatMessage
from ttmm_vllm.serve.engine_api import Sampling
from ttmm_vllm.serve.errors import (
    InvalidArgument,
    Unimplemented,
    status_of,
)
from ttmm_vllm.serve.service import Client, GenerateInput, RoutingRequest, TTMMService
from ttmm_vllm.stubs import SERVICE_NAME, pb2

log = logging.getLogger(__name__)

_MODES = {
    pb2.ROUTING_MODE_UNSPECIFIED: None,
    pb2.ROUTING_MODE_TTMM: Mode.TTMM,
    pb2.ROUTING_MODE_BASE: Mode.BASE,
    pb2.ROUTING_MODE_TOP1: Mode.TOP1,
    pb2.ROUTING_MODE_UNIFORM: Mode.UNIFORM,
}
_MODE_PB = {v: k for k, v in _MODES.items() if v is not None}
_FINISH = {"length": pb2.FINISH_REASON_LENGTH, "stop": pb2.FINISH_REASON_STOP,
           "abort": pb2.FINISH_REASON_ABORT}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # Requests admitted at once (running or waiting in vLLM); beyond: RESOURCE_EXHAUSTED.
    max_inflight: int = 256
    max_message_bytes: int = 4 << 20
    metrics_port: int | None = None  # None: no Prometheus endpoint; 0: any free port
    grace_s: float = 30.0
    # Bearer tokens -> client identity; empty: no authentication.
    tokens: Mapping[str, str] = field(default_factory=dict)
    admin_tokens: frozenset[str] = frozenset()
    # Client identity (token identity or mTLS subject) -> expert groups it may use.
    client_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate it signed
    engine_watch_s: float = 1.0
    # The most requests one authenticated client (token identity or certificate subject) may
    # have admitted at once. None: half of max_inflight.
    max_inflight_per_client: int | None = None
    # Transport: ping idle connections every keepalive_time_s and close those that do not
    # answer within keepalive_timeout_s (a vanished client's requests are cancelled); close
    # every connection after max_connection_age_s (+ grace for its requests to finish), so a
    # stream nobody reads cannot hold its admission slot for ever. None: no age limit.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_age_s: float | None = 3600.0
    max_connection_age_grace_s: float = 300.0
    # Health: every health_probe_s, a round trip to the engine core must answer within
    # health_timeout_s, else health says NOT_SERVING (until it answers again). 0: no probe.
    health_probe_s: float = 5.0
    health_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        """Refuse a configuration that would not do what it says, with a one-line message."""
        from ttmm_vllm.serve.access import check_auth, check_tls

        check_auth(self.tokens, self.admin_tokens, self.client_groups)
        # normalised (lists from a JSON file become the types above)
        object.__setattr__(self, "tokens", dict(self.tokens))
        object.__setattr__(self, "admin_tokens", frozenset(self.admin_tokens))
        object.__setattr__(self, "client_groups",
                           {k: tuple(v) for k, v in self.client_groups.items()})
        check_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_inflight_per_client is not None and self.max_inflight_per_client < 1:
            raise ValueError(f"max_inflight_per_client must be >= 1, got "
                             f"{self.max_inflight_per_client}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "max_connection_age_grace_s",
                     "health_timeout_s", "engine_watch_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            raise ValueError(f"max_connection_age_s must be > 0 or None, got "
                             f"{self.max_connection_age_s}")
        if self.health_probe_s < 0:
            raise ValueError(f"health_probe_s must be >= 0, got {self.health_probe_s}")


class _Bad:
    """A request that did not parse (e.g. non-UTF-8 text in a string field)."""

    def __init__(self, kind: str, error: Exception):
        self.kind, self.error = kind, error


def _safe_parser(cls, max_bytes: int) -> Callable[[bytes], object]:
    def parse(data: bytes):
        if len(data) > max_bytes:
            return _Bad(cls.DESCRIPTOR.full_name, ValueError(
                f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes"))
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            return _Bad(cls.DESCRIPTOR.full_name, e)
    return parse


def grpc_status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of a request that raised `e` (errors.status_of, in gRPC's terms)."""
    st = status_of(e)
    return grpc.StatusCode[st.code], st.message


class TTMMServicer:
    """ttmm.v1.TTMMService over a TTMMService."""

    def __init__(self, service: TTMMService, config: ServerConfig):
        self.service = service
        self.config = config
        # Auth and admission, shared with an HTTP door on the same server (launch.start)
        self.access = Access.from_config(service, config)
        self.admission = self.access.admission
        self.metrics = service.metrics

    # ------------------------------------------------------------------ plumbing

    def client(self, context: grpc.aio.ServicerContext, admin: bool = False) -> Client:
        """Authenticate (access.py): a bearer token (when configured) and/or the mTLS subject."""
        md = dict(context.invocation_metadata() or ())
        ac = context.auth_context() or {}
        cn = ac.get("x509_common_name") or ()
        return self.access.client(md.get("authorization"), admin=admin,
                                  peer=cn[0].decode() if cn else None,
                                  header="metadata 'authorization'")

    def _routing_pb(self, r: Routing, info: dict | None = None) -> pb2.Routing:
        msg = pb2.Routing(mode=_MODE_PB.get(r.mode, pb2.ROUTING_MODE_TTMM),
                          top_similarity=_finite(r.top_similarity), entropy=r.entropy,
                          out_of_reach=r.out_of_reach)
        sims = r.similarities or (float("nan"),) * len(r.expert_ids)
        for i, w, s in zip(r.expert_ids, r.weights, sims, strict=False):
            msg.experts.add(expert_id=i, weight=w, title=self.service.title(i),
                            similarity=_finite(s))
        if info:
            msg.merged_rank = int(info.get("rank", 0))
            msg.compression_error = float(info.get("rel_error", 0.0))
        return msg

    def _switches_pb(self, switches) -> list[pb2.RoutingSwitch]:
        return [pb2.RoutingSwitch(token_index=i, routing=self._routing_pb(r))
                for i, r in switches]

    @staticmethod
    def _timings_pb(t) -> pb2.Timings:
        return pb2.Timings(**t.as_dict())

    @staticmethod
    def _routing_request(r: pb2.RoutingOptions) -> RoutingRequest:
        if r.mode not in _MODES:
            raise InvalidArgument("routing.mode", f"unknown routing mode {r.mode}")
        return RoutingRequest(
            mode=_MODES[r.mode],
            beta=r.beta if r.HasField("beta") else None,
            tau=r.tau if r.HasField("tau") else None,
            max_active=r.max_active if r.HasField("max_active") else None,
            experts=tuple(r.experts),
            expert_weights=tuple(r.expert_weights),
            reroute_every=r.reroute_every if r.HasField("reroute_every") else None,
        )

    def _generate_input(self, req: pb2.GenerateRequest) -> GenerateInput:
        s = req.sampling
        sampling = Sampling(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else 0,
            temperature=s.temperature if s.HasField("temperature") else 0.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            logprobs=bool(s.logprobs) if s.HasField("logprobs") else False,
        )
        if len(req.request_id) > 128:
            raise InvalidArgument("request_id", "longer than 128 characters")
        return GenerateInput(prompt=req.prompt, prompt_token_ids=tuple(req.prompt_token_ids),
                             sampling=sampling, max_tokens_set=s.HasField("max_tokens"),
                             routing=self._routing_request(req.routing),
                             request_id=req.request_id,
                             messages=tuple(ChatMessage(m.role, m.content)
                                            for m in req.messages))

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request, context) -> pb2.GenerateResponse:
        client = self.client(context)
        with self.admission.admitted(client=client):
            gi = self._generate_input(_parsed(request))
            prepared = await self.service.prepare(gi, client)
            text, ids, lps, reason, switches = [], [], [], None, []
            prompt_tokens = completion = 0
            async for step in self.service.generate(prepared):
                text.append(step.text)
                ids += step.token_ids
                lps += step.logprobs
                switches += self._switches_pb(step.switches)
                reason, prompt_tokens = step.finish_reason, step.prompt_tokens
                completion = step.completion_tokens
            return pb2.GenerateResponse(
                request_id=prepared.request_id, text="".join(text), token_ids=ids,
                finish_reason=_FINISH.get(reason or "", pb2.FINISH_REASON_UNSPECIFIED),
                prompt_tokens=prompt_tokens, completion_tokens=completion,
                routing=self._routing_pb(prepared.routing, self.service.adapter_info(prepared)),
                timings=self._timings_pb(prepared.timings), logprobs=lps, switches=switches)

    async def GenerateStream(self, request, context):
        client = self.client(context)
        with self.admission.admitted(client=client):
            gi = self._generate_input(_parsed(request))
            prepared = await self.service.prepare(gi, client)
            first = True
            async for step in self.service.generate(prepared):
                chunk = pb2.GenerateChunk(
                    request_id=prepared.request_id, text=step.text, token_ids=step.token_ids,
                    prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                    logprobs=step.logprobs, switches=self._switches_pb(step.switches))
                if first:
                    chunk.routing.CopyFrom(self._routing_pb(prepared.routing,
                                                            self.service.adapter_info(prepared)))
                    first = False
                if step.finished:
                    chunk.finish_reason = _FINISH.get(step.finish_reason or "",
                                                      pb2.FINISH_REASON_UNSPECIFIED)
                    chunk.timings.CopyFrom(self._timings_pb(prepared.timings))
                yield chunk

    async def Route(self, request, context) -> pb2.RouteResponse:
        client = self.client(context)
        with self.admission.admitted(client=client):
            request = _parsed(request)
            routing, timings = await self.service.route(
                request.prompt, self._routing_request(request.routing), client)
            return pb2.RouteResponse(routing=self._routing_pb(routing),
                                     timings=self._timings_pb(timings))

    async def Score(self, request, context) -> pb2.ScoreResponse:
        client = self.client(context)
        with self.admission.admitted(client=client):
            request = _parsed(request)
            lps, ids, routing, timings, switches = await self.service.score(
                request.prompt, request.continuation, self._routing_request(request.routing),
                client, prompt_token_ids=tuple(request.prompt_token_ids),
                continuation_token_ids=tuple(request.continuation_token_ids))
            total = float(sum(lps))
            return pb2.ScoreResponse(logprobs=lps, token_ids=ids, total_logprob=total,
                                     perplexity=math.exp(-total / max(len(lps), 1)),
                                     routing=self._routing_pb(routing),
                                     timings=self._timings_pb(timings),
                                     switches=self._switches_pb(switches))

    async def ListExperts(self, request, context) -> pb2.ListExpertsResponse:
        client = self.client(context)
        _parsed(request)
        m = self.service.library.manifest
        resp = pb2.ListExpertsResponse(base_model=m.base_model.name, embedder=m.embedder.name,
                                       default_beta=m.router.beta, default_tau=m.router.tau,
                                       query_tokens=m.router.query_tokens)
        for e in self.service.experts_for(client):
            resp.experts.add(expert_id=e.id, title=e.title, size=e.size, rank=e.rank,
                             group=e.group)
        return resp

    async def AddExpert(self, request, context) -> pb2.AddExpertResponse:
        self.client(context, admin=True)
        request = _parsed(request)
        add = getattr(self.service, "add_expert", None)
        if add is None:
            raise Unimplemented("live library changes are not enabled")
        e = await add(request.expert_id)
        return pb2.AddExpertResponse(expert=pb2.ExpertInfo(
            expert_id=e.id, title=e.title, size=e.size, rank=e.rank, group=e.group))

    async def RemoveExpert(self, request, context) -> pb2.RemoveExpertResponse:
        self.client(context, admin=True)
        request = _parsed(request)
        remove = getattr(self.service, "remove_expert", None)
        if remove is None:
            raise Unimplemented("live library changes are not enabled")
        await remove(request.expert_id)
        return pb2.RemoveExpertResponse()


def _parsed(request):
    if isinstance(request, _Bad):
        if isinstance(request.error, ValueError):
            raise InvalidArgument("request", str(request.error))
        raise InvalidArgument("request", f"not a valid {request.kind} message (string fields "
                              f"must be UTF-8): {request.error}")
    return request


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


# ---------------------------------------------------------------------------- wiring


def _wrap_unary(servicer: TTMMServicer, name: str, fn):
    @functools.wraps(fn)
    async def handler(request, context):
        t0 = time.perf_counter()
        try:
            resp = await fn(request, context)
            servicer.metrics.requests.labels(name, "OK").inc()
            return resp
        except asyncio.CancelledError:
            servicer.metrics.requests.labels(name, "CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status, never a crash
            code, msg = grpc_status(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                servicer.metrics.rejected.inc()
            servicer.metrics.requests.labels(name, code.name).inc()
            await context.abort(code, msg)
        finally:
            log.debug("%s took %.1f ms", name, (time.perf_counter() - t0) * 1e3)
    return handler


def _wrap_stream(servicer: TTMMServicer, name: str, fn):
    @functools.wraps(fn)
    async def handler(request, context):
        try:
            async for item in fn(request, context):
                yield item
            servicer.metrics.requests.labels(name, "OK").inc()
        except asyncio.CancelledError:
            servicer.metrics.requests.labels(name, "CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001
            code, msg = grpc_status(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                servicer.metrics.rejected.inc()
            servicer.metrics.requests.labels(name, code.name).inc()
            await context.abort(code, msg)
    return handler


def service_handler(servicer: TTMMServicer) -> grpc.GenericRpcHandler:
    """The ttmm.v1 handlers, with parsers that turn undecodable requests into clean errors."""
    methods = pb2.DESCRIPTOR.services_by_name["TTMMService"].methods_by_name
    limit = servicer.config.max_message_bytes
    handlers = {}
    for name, m in methods.items():
        req_cls = getattr(pb2, m.input_type.name)
        resp_cls = getattr(pb2, m.output_type.name)
        fn = getattr(servicer, name)
        if m.server_streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(servicer, name, fn),
                request_deserializer=_safe_parser(req_cls, limit),
                response_serializer=resp_cls.SerializeToString)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(servicer, name, fn),
                request_deserializer=_safe_parser(req_cls, limit),
                response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Server:
    """A running gRPC server around a service. `await Server.start(service, config)`."""

    def __init__(self, service: TTMMService, config: ServerConfig, own_service: bool = True):
        self.service = service
        self.config = config
        self.own_service = own_service  # False: a second front door on a shared service
        self.servicer = TTMMServicer(service, config)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.engine_dead = asyncio.Event()
        # An HTTP door on the same service and access (launch.start); stopped after the drain
        self.http = None
        self._metrics_server = None
        self._watch: asyncio.Task | None = None

    @classmethod
    async def start(cls, service: TTMMService, config: ServerConfig | None = None,
                    own_service: bool = True) -> Server:
        self = cls(service, config or ServerConfig(), own_service)
        c = self.config
        # The transport accepts up to twice the limit so that an oversized request gets an
        # INVALID_ARGUMENT naming its size from us rather than a bare transport error.
        opts = [("grpc.max_receive_message_length", 2 * c.max_message_bytes + 1024),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", int(c.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1)]
        if c.max_connection_age_s is not None:
            opts += [("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1000)),
                     ("grpc.max_connection_age_grace_ms",
                      int(c.max_connection_age_grace_s * 1000))]
        self.grpc = grpc.aio.server(options=opts)
        self.grpc.add_generic_rpc_handlers((service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            self.port = self.grpc.add_secure_port(address, _server_credentials(c))
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.grpc.start()
        if c.metrics_port is not None:
            from prometheus_client import start_http_server

            srv, _ = start_http_server(c.metrics_port, addr=c.host,
                                       registry=service.metrics.registry)
            self._metrics_server = srv
            self.metrics_port = srv.server_port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_engine())
        log.info("ttmm server listening on %s:%d", c.host, self.port)
        return self

    async def _watch_engine(self) -> None:
        """If vLLM dies, stop saying SERVING (for good: `engine_dead`, so `ttmm serve` exits
        non-zero and a supervisor restarts it); while its engine core does not answer a probe
        in time, say NOT_SERVING, and SERVING again once it does."""
        c = self.config
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + c.health_probe_s
        serving = True
        while True:
            await asyncio.sleep(c.engine_watch_s)
            if not self.service.engine_running:
                log.error("vLLM engine died: health NOT_SERVING")
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                self.engine_dead.set()
                return
            if c.health_probe_s and loop.time() >= next_probe:
                ok = await self.service.engine_healthy(c.health_timeout_s)
                next_probe = loop.time() + c.health_probe_s
                if ok != serving:
                    serving = ok
                    if ok:
                        log.warning("vLLM engine answers again: health SERVING")
                    else:
                        log.error("vLLM engine did not answer its health probe within %.1f s: "
                                  "health NOT_SERVING", c.health_timeout_s)
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING if ok else
                                           health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests, let in-flight ones finish within `grace` seconds."""
        grace = self.config.grace_s if grace is None else grace
        self.servicer.admission.closed = True
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        if self._watch:
            self._watch.cancel()
        if self.grpc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.servicer.admission.drained(), grace)
            await self.grpc.stop(0)
        if self.http is not None:
            await self.http.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.own_service:
            await self.service.shutdown()


def _server_credentials(c: ServerConfig) -> grpc.ServerCredentials:
    with open(c.tls_key, "rb") as f:
        key = f.read()
    with open(c.tls_cert, "rb") as f:
        cert = f.read()
    ca = None
    if c.tls_client_ca:
        with open(c.tls_client_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)
