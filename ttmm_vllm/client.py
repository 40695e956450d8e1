"""Python clients for ttmm.v1.TTMMService: `TTMMClient` (sync; one channel, thread-safe) and
`AsyncClient` (asyncio, on grpc.aio), with the same methods and argument names.

The requests both send are built by the small pure functions below (`routing_options`,
`sampling_options`, `generate_request`, `route_request`, `score_request`, ...), so the two
clients cannot drift apart; the classes only add the channel, the token and the deadlines.

Deadlines: every unary call (generate, route, score, list_experts, add_expert,
remove_expert) gets the client's `timeout` (60 s unless the constructor says otherwise),
overridable per call with `timeout=` (None: no deadline). gRPC's own default is no deadline at
all, so a call to a server that accepted it and then stalls (overloaded, a wedged engine, a
network path that drops packets without resetting the connection) would wait forever; the
deadline also travels to the server, which cancels the request there once the caller has
given up. Streams (`stream`) have no deadline unless given one: a stream lasts as long as
the generation it carries (bounded by max_tokens), the caller sees it progress chunk by chunk,
and a fixed deadline would cut long generations off mid-way.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Iterator, Sequence
from types import ModuleType
from typing import Any, Final

import grpc
import grpc.aio

from ttmm_vllm.stubs import pb2, pb2_grpc

MODES = {
    "ttmm": pb2.ROUTING_MODE_TTMM,
    "base": pb2.ROUTING_MODE_BASE,
    "top1": pb2.ROUTING_MODE_TOP1,
    "uniform": pb2.ROUTING_MODE_UNIFORM,
}

# The keyword options of generate/stream that belong to SamplingOptions (the rest are routing's)
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs")


class _Default(enum.Enum):
    TIMEOUT = "the client's timeout"


# The per-call `timeout=` default of unary calls: use the client's `timeout`. (None cannot
# mean that: None is how a caller asks for no deadline at all.)
DEFAULT_TIMEOUT: Final = _Default.TIMEOUT
Timeout = float | None | _Default


# ------------------------------------------------------------------ request building (pure)

def routing_options(mode: str | None = None, *, beta: float | None = None,
                    tau: float | None = None, max_active: int | None = None,
                    experts: Sequence[int] = (), expert_weights: Sequence[float] = (),
                    reroute_every: int | None = None) -> pb2.RoutingOptions:
    """RoutingOptions with exactly the fields given set (an unset field: the server's
    default; zeros that are given travel, e.g. tau=0.0 or reroute_every=0)."""
    r = pb2.RoutingOptions(mode=MODES[mode] if mode else pb2.ROUTING_MODE_UNSPECIFIED,
                           experts=list(experts), expert_weights=list(expert_weights))
    if beta is not None:
        r.beta = beta
    if tau is not None:
        r.tau = tau
    if max_active is not None:
        r.max_active = max_active
    if reroute_every is not None:
        r.reroute_every = reroute_every
    return r


def sampling_options(max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, stop: Sequence[str] = (),
                     logprobs: bool = False) -> pb2.SamplingOptions:
    """SamplingOptions with exactly the fields given set."""
    s = pb2.SamplingOptions(stop=list(stop))
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    if logprobs:
        s.logprobs = 1
    return s


def generate_request(prompt: str, *, sampling: pb2.SamplingOptions | None = None,
                     routing: pb2.RoutingOptions | None = None, request_id: str = "",
                     **options: Any) -> pb2.GenerateRequest:
    """The request of generate/stream. Without `sampling`, the keyword options named in
    SAMPLING_KEYS build it; without `routing`, the others build it (`routing_options`'s
    arguments). Keywords beside an explicit `routing` are refused (TypeError)."""
    if sampling is None:
        sampling = sampling_options(**{k: options.pop(k) for k in list(options)
                                       if k in SAMPLING_KEYS})
    if routing is None:
        routing = routing_options(**options)
    elif options:
        raise TypeError(f"unexpected arguments {sorted(options)}")
    return pb2.GenerateRequest(prompt=prompt, sampling=sampling, routing=routing,
                               request_id=request_id)


def route_request(prompt: str, routing: pb2.RoutingOptions | None = None) -> pb2.RouteRequest:
    return pb2.RouteRequest(prompt=prompt, routing=routing)


def score_request(prompt: str, continuation: str, routing: pb2.RoutingOptions | None = None,
                  prompt_token_ids: Sequence[int] = (),
                  continuation_token_ids: Sequence[int] = ()) -> pb2.ScoreRequest:
    """By text (prompt, continuation) or, when given, by token ids (the server's tokenizer)."""
    return pb2.ScoreRequest(prompt=prompt, continuation=continuation, routing=routing,
                            prompt_token_ids=list(prompt_token_ids),
                            continuation_token_ids=list(continuation_token_ids))


def list_experts_request() -> pb2.ListExpertsRequest:
    return pb2.ListExpertsRequest()


def add_expert_request(expert_id: int) -> pb2.AddExpertRequest:
    return pb2.AddExpertRequest(expert_id=expert_id)


def remove_expert_request(expert_id: int) -> pb2.RemoveExpertRequest:
    return pb2.RemoveExpertRequest(expert_id=expert_id)


# ------------------------------------------------------------------ the clients

class _Client:
    """What both clients share: the channel (from `api`, grpc or grpc.aio), the stub, the
    bearer token and the default deadline."""

    def __init__(self, api: ModuleType, target: str, *, token: str | None,
                 root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None, tls: bool, max_message_bytes: int,
                 server_name: str | None, timeout: float | None):
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                       ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                 certificate_chain)
            self.channel = api.secure_channel(target, creds, options=opts)
        else:
            self.channel = api.insecure_channel(target, options=opts)
        self.stub = pb2_grpc.TTMMServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = \
            (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT_TIMEOUT else timeout


class TTMMClient(_Client):
    """A blocking client on one channel (thread-safe: share it between threads).

    token: bearer token (the server's --auth). root_certificates / tls: connect with TLS;
    private_key + certificate_chain: a client certificate (mutual TLS). server_name: the name
    the server's certificate must carry when it is not the target's host.
    timeout: the default deadline, in seconds, of every unary call (None: none); see the
    module docstring for why there is one and why streams have none.
    """

    def __init__(self, target: str, *, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, tls: bool = False,
                 max_message_bytes: int = 4 << 20, server_name: str | None = None,
                 timeout: float | None = 60.0):
        super().__init__(grpc, target, token=token, root_certificates=root_certificates,
                         private_key=private_key, certificate_chain=certificate_chain,
                         tls=tls, max_message_bytes=max_message_bytes,
                         server_name=server_name, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TTMMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the channel is connected; grpc.FutureTimeoutError after `timeout`."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def generate(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
                 routing: pb2.RoutingOptions | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
                 request_id: str = "", **kw: Any) -> pb2.GenerateResponse:
        """One response when generation ends. Options as `generate_request`'s keywords."""
        req = generate_request(prompt, sampling=sampling, routing=routing,
                               request_id=request_id, **kw)
        return self.stub.Generate(req, timeout=self._deadline(timeout), metadata=self.metadata)

    def stream(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
               routing: pb2.RoutingOptions | None = None, timeout: float | None = None,
               request_id: str = "", **kw: Any) -> Iterator[pb2.GenerateChunk]:
        """Chunks as they are generated (the first carries the routing). No deadline unless
        `timeout` is given; `.cancel()` on the returned iterator stops it early."""
        req = generate_request(prompt, sampling=sampling, routing=routing,
                               request_id=request_id, **kw)
        return self.stub.GenerateStream(req, timeout=timeout, metadata=self.metadata)

    def route(self, prompt: str, routing: pb2.RoutingOptions | None = None,
              timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.RouteResponse:
        """The routing decision only (no generation)."""
        return self.stub.Route(route_request(prompt, routing), timeout=self._deadline(timeout),
                               metadata=self.metadata)

    def score(self, prompt: str, continuation: str, routing: pb2.RoutingOptions | None = None,
              timeout: Timeout = DEFAULT_TIMEOUT, prompt_token_ids: Sequence[int] = (),
              continuation_token_ids: Sequence[int] = ()) -> pb2.ScoreResponse:
        """Log-probabilities of `continuation` under the prompt's merged expert."""
        req = score_request(prompt, continuation, routing, prompt_token_ids,
                            continuation_token_ids)
        return self.stub.Score(req, timeout=self._deadline(timeout), metadata=self.metadata)

    def list_experts(self, timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.ListExpertsResponse:
        """The experts this client may use, and the library's defaults."""
        return self.stub.ListExperts(list_experts_request(), timeout=self._deadline(timeout),
                                     metadata=self.metadata)

    def add_expert(self, expert_id: int, timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.ExpertInfo:
        """Admin (the client's token must be an admin token): serve an expert placed in the
        server's library directory (`experts/NNNN/` with `ttmm-expert.json`, as `ttmm library
        import --pending` writes it). Returns what the server now serves."""
        return self.stub.AddExpert(add_expert_request(expert_id),
                                   timeout=self._deadline(timeout),
                                   metadata=self.metadata).expert

    def remove_expert(self, expert_id: int, timeout: Timeout = DEFAULT_TIMEOUT) -> None:
        """Admin: stop routing to an expert (requests in flight keep their weights; its
        files stay in the library, marked deleted)."""
        self.stub.RemoveExpert(remove_expert_request(expert_id),
                               timeout=self._deadline(timeout), metadata=self.metadata)


class AsyncClient(_Client):
    """The asyncio twin of TTMMClient (grpc.aio): the same methods, arguments and deadlines;
    the unary ones are coroutines, `stream` returns an async iterator. Create it inside the
    event loop that uses it (a grpc.aio channel belongs to one loop); `async with` closes it.
    """

    def __init__(self, target: str, *, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, tls: bool = False,
                 max_message_bytes: int = 4 << 20, server_name: str | None = None,
                 timeout: float | None = 60.0):
        super().__init__(grpc.aio, target, token=token, root_certificates=root_certificates,
                         private_key=private_key, certificate_chain=certificate_chain,
                         tls=tls, max_message_bytes=max_message_bytes,
                         server_name=server_name, timeout=timeout)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running are cancelled (after `grace` seconds)."""
        await self.channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        """Return once the channel is connected; TimeoutError after `timeout`."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def generate(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
                       routing: pb2.RoutingOptions | None = None,
                       timeout: Timeout = DEFAULT_TIMEOUT, request_id: str = "",
                       **kw: Any) -> pb2.GenerateResponse:
        """One response when generation ends. Options as `generate_request`'s keywords."""
        req = generate_request(prompt, sampling=sampling, routing=routing,
                               request_id=request_id, **kw)
        return await self.stub.Generate(req, timeout=self._deadline(timeout),
                                        metadata=self.metadata)

    def stream(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
               routing: pb2.RoutingOptions | None = None, timeout: float | None = None,
               request_id: str = "", **kw: Any) -> AsyncIterator[pb2.GenerateChunk]:
        """Chunks as they are generated: `async for chunk in client.stream(...)`. No
        deadline unless `timeout` is given; `.cancel()` on the returned call stops it early."""
        req = generate_request(prompt, sampling=sampling, routing=routing,
                               request_id=request_id, **kw)
        return self.stub.GenerateStream(req, timeout=timeout, metadata=self.metadata)

    async def route(self, prompt: str, routing: pb2.RoutingOptions | None = None,
                    timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.RouteResponse:
        """The routing decision only (no generation)."""
        return await self.stub.Route(route_request(prompt, routing),
                                     timeout=self._deadline(timeout), metadata=self.metadata)

    async def score(self, prompt: str, continuation: str,
                    routing: pb2.RoutingOptions | None = None,
                    timeout: Timeout = DEFAULT_TIMEOUT, prompt_token_ids: Sequence[int] = (),
                    continuation_token_ids: Sequence[int] = ()) -> pb2.ScoreResponse:
        """Log-probabilities of `continuation` under the prompt's merged expert."""
        req = score_request(prompt, continuation, routing, prompt_token_ids,
                            continuation_token_ids)
        return await self.stub.Score(req, timeout=self._deadline(timeout),
                                     metadata=self.metadata)

    async def list_experts(self, timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.ListExpertsResponse:
        """The experts this client may use, and the library's defaults."""
        return await self.stub.ListExperts(list_experts_request(),
                                           timeout=self._deadline(timeout),
                                           metadata=self.metadata)

    async def add_expert(self, expert_id: int,
                         timeout: Timeout = DEFAULT_TIMEOUT) -> pb2.ExpertInfo:
        """Admin: as TTMMClient.add_expert."""
        resp = await self.stub.AddExpert(add_expert_request(expert_id),
                                         timeout=self._deadline(timeout),
                                         metadata=self.metadata)
        return resp.expert

    async def remove_expert(self, expert_id: int, timeout: Timeout = DEFAULT_TIMEOUT) -> None:
        """Admin: as TTMMClient.remove_expert."""
        await self.stub.RemoveExpert(remove_expert_request(expert_id),
                                     timeout=self._deadline(timeout), metadata=self.metadata)
