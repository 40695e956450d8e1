"""A small Python client for ttmm.v1.TTMMService (sync; one channel, thread-safe)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from ttmm_vllm.stubs import pb2, pb2_grpc

MODES = {
    "ttmm": pb2.ROUTING_MODE_TTMM,
    "base": pb2.ROUTING_MODE_BASE,
    "top1": pb2.ROUTING_MODE_TOP1,
    "uniform": pb2.ROUTING_MODE_UNIFORM,
}


def routing_options(mode: str | None = None, *, beta: float | None = None,
                    tau: float | None = None, max_active: int | None = None,
                    experts: Sequence[int] = (), expert_weights: Sequence[float] = (),
                    reroute_every: int | None = None) -> pb2.RoutingOptions:
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
    s = pb2.SamplingOptions(stop=list(stop))
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    if logprobs:
        s.logprobs = 1
    return s


class TTMMClient:
    def __init__(self, target: str, *, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, tls: bool = False,
                 max_message_bytes: int = 4 << 20, server_name: str | None = None):
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                 certificate_chain)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb2_grpc.TTMMServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TTMMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def generate(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
                 routing: pb2.RoutingOptions | None = None, timeout: float | None = None,
                 request_id: str = "", **kw) -> pb2.GenerateResponse:
        req = self._request(prompt, sampling, routing, request_id, **kw)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def stream(self, prompt: str, *, sampling: pb2.SamplingOptions | None = None,
               routing: pb2.RoutingOptions | None = None, timeout: float | None = None,
               request_id: str = "", **kw) -> Iterator[pb2.GenerateChunk]:
        req = self._request(prompt, sampling, routing, request_id, **kw)
        return self.stub.GenerateStream(req, timeout=timeout, metadata=self.metadata)

    def route(self, prompt: str, routing: pb2.RoutingOptions | None = None,
              timeout: float | None = None) -> pb2.RouteResponse:
        return self.stub.Route(pb2.RouteRequest(prompt=prompt, routing=routing),
                               timeout=timeout, metadata=self.metadata)

    def score(self, prompt: str, continuation: str, routing: pb2.RoutingOptions | None = None,
              timeout: float | None = None, prompt_token_ids: Sequence[int] = (),
              continuation_token_ids: Sequence[int] = ()) -> pb2.ScoreResponse:
        req = pb2.ScoreRequest(prompt=prompt, continuation=continuation, routing=routing,
                               prompt_token_ids=list(prompt_token_ids),
                               continuation_token_ids=list(continuation_token_ids))
        return self.stub.Score(req, timeout=timeout, metadata=self.metadata)

    def list_experts(self, timeout: float | None = None) -> pb2.ListExpertsResponse:
        return self.stub.ListExperts(pb2.ListExpertsRequest(), timeout=timeout,
                                     metadata=self.metadata)

    def add_expert(self, expert_id: int, timeout: float | None = 60) -> pb2.ExpertInfo:
        """Admin (the client's token must be an admin token): serve an expert placed in the
        server's library directory (`experts/NNNN/` with `ttmm-expert.json`, as `ttmm library
        import --pending` writes it). Returns what the server now serves."""
        return self.stub.AddExpert(pb2.AddExpertRequest(expert_id=expert_id), timeout=timeout,
                                   metadata=self.metadata).expert

    def remove_expert(self, expert_id: int, timeout: float | None = 60) -> None:
        """Admin: stop routing to an expert (requests in flight keep their weights; its
        files stay in the library, marked deleted)."""
        self.stub.RemoveExpert(pb2.RemoveExpertRequest(expert_id=expert_id), timeout=timeout,
                               metadata=self.metadata)

    @staticmethod
    def _request(prompt, sampling, routing, request_id, **kw) -> pb2.GenerateRequest:
        if sampling is None:
            sampling = sampling_options(**{k: kw.pop(k) for k in list(kw) if k in (
                "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs")})
        if routing is None:
            routing = routing_options(**kw)
        elif kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        return pb2.GenerateRequest(prompt=prompt, sampling=sampling, routing=routing,
                                   request_id=request_id)
