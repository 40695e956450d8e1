"""The OpenAI-compatible HTTP door: FastAPI + uvicorn, a thin layer over the same TTMMService.

    GET  /v1/models             ttmm, ttmm:top1, ttmm:uniform, base, expert-<id> (the caller's)
    POST /v1/completions        prompt (a string, strings, token ids or lists of token ids),
                                max_tokens, temperature, top_p, stop, seed, stream (SSE),
                                echo and logprobs (what lm-eval-harness's loglikelihood tasks use)
    POST /v1/chat/completions   messages, rendered with the base model's chat template
    GET  /health                200, or 503 when the engine is not running or the server drains
    GET  /metrics               the Prometheus metrics (ttmm's and vLLM's)

`model` chooses the routing: `ttmm` (the library's defaults), `ttmm:top1`, `ttmm:uniform`,
`base` (no adapter) or `expert-<id>` (one expert). The body's extension object `ttmm`
({beta, tau, max_active, experts, expert_weights, reroute_every}) overrides it per request, as
gRPC's RoutingOptions do. Each response (each choice, each stream's first and last chunk)
carries a `ttmm` extension field: the routing (experts, weights, titles) and stage timings.

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
status of errors.status_of, so one error has the same meaning at both doors. Authentication
(`Authorization: Bearer <token>`, identities, client groups), admission control and metrics are
the gRPC door's (access.py): launch.start hands both doors one `Access`.

Log-probabilities as OpenAI's: /v1/completions `logprobs: k` (k <= MAX_COMPLETION_LOGPROBS)
gives per token its log-probability and `top_logprobs`, {token text: log-probability} of the k
most likely tokens and the chosen one (k or k + 1 entries; vLLM's SamplingParams.logprobs=k);
with `echo` the prompt's tokens get the same from the scoring pass (vLLM's prompt_logprobs=k;
the first token has none). /v1/chat/completions `logprobs: true, top_logprobs: k`
(k <= MAX_CHAT_TOP_LOGPROBS) gives per token the k most likely as {token, logprob, bytes}.

TLS: HttpConfig's tls_cert/tls_key serve HTTPS (`ttmm serve` gives the door the gRPC flags'
certificate), and tls_client_ca requires a client certificate signed by that CA (mutual TLS);
without a bearer token the certificate's common name is the identity, as at the gRPC door.

Token names are each token decoded alone; a token that is part of a character (which alone
decodes to U+FFFD) is named by its bytes as OpenAI names it, "bytes:\\xe2\\x80", so the
keys of `top_logprobs` stay distinct. gRPC's `logprobs` still carry the chosen token only.

Differences from OpenAI worth knowing: `n` and `best_of` must be 1; `text_offset` counts
characters of the returned `text`; a stream takes one prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttmm_vllm.routing.router import Mode, Routing
from ttmm_vllm.serve.access import Access, check_tls
from ttmm_vllm.serve.chat import ROLE_ALIASES, ChatMessage
from ttmm_vllm.serve.engine_api import Sampling
from ttmm_vllm.serve.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
    status_of,
)
from ttmm_vllm.serve.metrics import Timings
from ttmm_vllm.serve.service import Client, GenerateInput, RoutingRequest, TTMMService

log = logging.getLogger(__name__)

MODES = {"ttmm": None, "ttmm:top1": Mode.TOP1, "ttmm:uniform": Mode.UNIFORM, "base": Mode.BASE}
EXPERT_PREFIX = "expert-"
# Largest k of `logprobs: k` (completions) and `top_logprobs: k` (chat): OpenAI's limits. A
# larger one is refused with a 400 naming the field (vLLM's own bound, max_logprobs, is 20).
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
# vLLM's floor for log-probabilities (JSON has no -inf)
LOGPROB_FLOOR = -9999.0
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                501: "not_implemented_error", 503: "service_unavailable_error"}


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    # Largest request body; beyond it 400 (as gRPC's max_message_bytes)
    max_body_bytes: int = 4 << 20
    # Prompts in one /v1/completions request (each is admitted as one request)
    max_prompts: int = 64
    # Seconds uvicorn waits for open connections when stopping (after the drain)
    grace_s: float = 5.0
    # HTTPS with this certificate and its key (PEM). launch.start gives a door without its own
    # the gRPC server's (`ttmm serve --tls-cert/--tls-key`), so both doors speak TLS or none.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Set: clients must present a certificate this CA signed (mutual TLS, --tls-client-ca)
    tls_client_ca: str | None = None

    def __post_init__(self) -> None:
        check_tls(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


# ---------------------------------------------------------------------------- request models


class TTMMOptions(BaseModel):
    """The body's `ttmm` extension: routing overrides (gRPC's RoutingOptions)."""

    model_config = ConfigDict(extra="forbid")
    beta: float | None = None
    tau: float | None = None
    max_active: int | None = None
    experts: list[int] = Field(default_factory=list)
    expert_weights: list[float] = Field(default_factory=list)
    reroute_every: int | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # OpenAI fields this server does not know are ignored (as vLLM does), not refused
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    ttmm: TTMMOptions | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: the server's default
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[MessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ---------------------------------------------------------------------------- the door


class HttpDoor:
    """The routes, over a service and an Access (auth + admission)."""

    def __init__(self, service: TTMMService, access: Access, config: HttpConfig):
        self.service = service
        self.access = access
        self.config = config
        self.metrics = service.metrics
        self.created = int(time.time())
        self._forms: dict[int, TokenForm] = {}  # token id -> its form (at most the vocabulary)

    # ------------------------------------------------------------------ plumbing

    def authenticate(self, request: Request) -> Client:
        """A bearer token (when configured), else the client certificate's common name
        (mutual TLS), else anonymous: as the gRPC door."""
        peer = (request.scope.get("state") or {}).get(PEER_STATE)
        return self.access.client(request.headers.get("authorization"), peer=peer,
                                  header="header 'Authorization: Bearer <token>'")

    def error(self, request: Request, e: BaseException, param: str | None = None) -> JSONResponse:
        """OpenAI's error JSON with the status errors.status_of gives `e`; counted in metrics."""
        st = status_of(e)
        message = st.message
        if isinstance(e, InvalidArgument):
            param = http_field(e.field)
            if message.startswith(f"{e.field}: "):
                message = f"{param}: {message[len(e.field) + 2:]}"
        elif isinstance(e, UnknownModel):
            param = "model"
        if st.internal:
            log.error("%s failed", request.url.path, exc_info=e)
        self.count(request, st.code)
        code = "model_not_found" if isinstance(e, UnknownModel) else st.code.lower()
        body = {"error": {"message": message, "type": _ERROR_TYPES.get(st.http, "server_error"),
                          "param": param, "code": code}}
        headers = {"WWW-Authenticate": "Bearer"} if st.http == 401 else None
        return JSONResponse(body, status_code=st.http, headers=headers)

    def count(self, request: Request, code: str) -> None:
        route = request.scope.get("route")
        name = getattr(route, "path", None) or "unknown"
        self.metrics.requests.labels(name, code).inc()
        if code == "RESOURCE_EXHAUSTED":
            self.metrics.rejected.inc()

    def routing_for(self, model: str, options: TTMMOptions | None,
                    client: Client) -> RoutingRequest:
        """`model` and the `ttmm` extension -> the service's routing request. An expert the
        client may not use is refused as the service refuses it: unknown and not permitted
        look the same (403) to a client limited to some groups."""
        o = options or TTMMOptions()
        experts = tuple(o.experts)
        if model in MODES:
            mode = MODES[model]
        elif model.startswith(EXPERT_PREFIX) and model[len(EXPERT_PREFIX):].isdigit():
            expert = int(model[len(EXPERT_PREFIX):])
            permitted = self.service.permitted(client)
            if permitted is not None and expert not in permitted:
                raise PermissionDenied(f"model: {model} is unknown or not permitted for "
                                       f"{client.identity}")
            if expert not in self.service.index:
                raise UnknownModel(model)
            if experts:
                raise InvalidArgument("ttmm.experts", f"the model {model} names the expert")
            mode, experts = None, (expert,)
        else:
            raise UnknownModel(model)
        return RoutingRequest(mode=mode, beta=o.beta, tau=o.tau, max_active=o.max_active,
                              experts=experts, expert_weights=tuple(o.expert_weights),
                              reroute_every=o.reroute_every)

    @staticmethod
    def sampling_for(req: _Request, max_tokens: int | None, logprobs: bool,
                     top_logprobs: int = 0) -> Sampling:
        if req.n != 1:
            raise InvalidArgument("n", f"must be 1, got {req.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise InvalidArgument(name, "is not supported (must be 0)")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
        return Sampling(
            max_tokens=max_tokens or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0, seed=req.seed, stop=tuple(stop), logprobs=logprobs,
            top_logprobs=top_logprobs if logprobs else 0)

    def ttmm_field(self, routing: Routing, timings: Timings | None = None, switches=(),
                   info: dict | None = None) -> dict:
        out: dict[str, Any] = {"routing": routing_json(routing, self.service.title, info)}
        if timings is not None:
            out["timings"] = timings.as_dict()
        if switches:
            out["switches"] = [{"token_index": i, "routing": routing_json(r, self.service.title)}
                               for i, r in switches]
        return out

    def token_forms(self, ids: list[int]) -> list[TokenForm]:
        """Each token's text, name and bytes (token_form), remembered per token id."""
        out = []
        for t in ids:
            form = self._forms.get(t)
            if form is None:
                form = self._forms[t] = token_form(self.service.tokenizer, t)
            out.append(form)
        return out

    def top_forms(self, tops: list[dict[int, float] | None], k: int | None = None
                  ) -> list[list[tuple[TokenForm, float]] | None]:
        """Per position the alternatives (most likely first; at most `k`) as (token form,
        floored log-probability)."""
        return [None if top is None else list(zip(
            self.token_forms(list(top)[:k]), [_floor(v) for v in list(top.values())[:k]],
            strict=True)) for top in tops]

    # ------------------------------------------------------------------ routes

    async def models(self, request: Request, client: Client) -> JSONResponse:
        m = self.service.library.manifest
        data = [self.model_card(name, m.base_model.name) for name in MODES]
        for e in self.service.experts_for(client):
            card = self.model_card(f"{EXPERT_PREFIX}{e.id}", m.base_model.name)
            card["ttmm"] = {"expert_id": e.id, "title": e.title, "group": e.group,
                            "rank": e.rank, "size": e.size}
            data.append(card)
        self.count(request, "OK")
        return JSONResponse({"object": "list", "data": data})

    def model_card(self, name: str, root: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "ttmm",
                "root": root, "parent": None}

    async def completions(self, request: Request, req: CompletionRequest,
                          client: Client) -> Response:
        routing = self.routing_for(req.model, req.ttmm, client)
        prompts = self.prompts_of(req.prompt)
        if req.best_of not in (None, 1):
            raise InvalidArgument("best_of", f"must be 1, got {req.best_of}")
        if req.suffix:
            raise InvalidArgument("suffix", "is not supported")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], "
                                  f"got {req.logprobs}")
        if req.max_tokens is not None and req.max_tokens < (0 if req.echo else 1):
            raise InvalidArgument("max_tokens", f"must be >= 1 (0 only with echo), "
                                  f"got {req.max_tokens}")
        sampling = self.sampling_for(req, req.max_tokens, req.logprobs is not None,
                                     req.logprobs or 0)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            if len(prompts) != 1:
                raise InvalidArgument("prompt", "a stream takes one prompt")
            if req.echo and req.logprobs is not None:
                raise InvalidArgument("echo", "echo with logprobs needs stream=false")
            text, ids = prompts[0]
            gi = GenerateInput(prompt=text, prompt_token_ids=ids, sampling=sampling,
                               max_tokens_set=req.max_tokens is not None, routing=routing)
            echo = (text or self.service.tokenizer.decode(list(ids))) if req.echo else None
            return await self.stream(request, rid, "text_completion", req, gi, client, echo)
        with self.access.admission.admitted(len(prompts), client):
            choices = await _until_disconnected(request, _all(*(
                self.complete_one(i, text, ids, req, sampling, routing, client)
                for i, (text, ids) in enumerate(prompts))))
        usage = {"prompt_tokens": sum(c.pop("_prompt_tokens") for c in choices),
                 "completion_tokens": sum(c.pop("_completion_tokens") for c in choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.count(request, "OK")
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": req.model, "choices": choices, "usage": usage,
                             "ttmm": choices[0]["ttmm"]})

    def prompts_of(self, prompt) -> list[tuple[str, tuple[int, ...]]]:
        """(text, token ids) per prompt: a string, strings, token ids, or lists of them."""
        if isinstance(prompt, str):
            out = [(prompt, ())]
        elif not prompt:
            raise InvalidArgument("prompt", "is empty")
        elif isinstance(prompt[0], str):
            out = [(p, ()) for p in prompt]
        elif isinstance(prompt[0], int):
            out = [("", tuple(prompt))]
        else:
            out = [("", tuple(p)) for p in prompt]
        if len(out) > self.config.max_prompts:
            raise InvalidArgument("prompt", f"at most {self.config.max_prompts} prompts per "
                                  f"request, got {len(out)}")
        for text, ids in out:
            if not text and not ids:
                raise InvalidArgument("prompt", "is empty")
        return out

    async def complete_one(self, index: int, text: str, ids: tuple[int, ...],
                           req: CompletionRequest, sampling: Sampling, routing: RoutingRequest,
                           client: Client) -> dict:
        """One prompt's choice: its generation, and with echo its prompt (and the prompt's
        log-probabilities and top alternatives, scored under the same routing: the first
        token has none)."""
        svc = self.service
        prompt_ids = await asyncio.to_thread(svc.tokenize_prompt, text, ids)
        echoed = text or svc.tokenizer.decode(prompt_ids)
        want_lps = req.logprobs is not None
        out_text, out_ids, out_lps, out_tops, reason, switches = "", [], [], [], "length", []
        info, timings, served = None, None, None

        async def score_prompt():
            if not (req.echo and want_lps and len(prompt_ids) > 1):
                return None
            return await svc.score_top("", "", routing, client, top_logprobs=req.logprobs,
                                       prompt_token_ids=prompt_ids[:1],
                                       continuation_token_ids=prompt_ids[1:],
                                       routing_token_ids=prompt_ids)

        async def generate():
            if req.max_tokens == 0:
                return None
            gi = GenerateInput(prompt_token_ids=tuple(prompt_ids), sampling=sampling,
                               max_tokens_set=req.max_tokens is not None, routing=routing)
            return await self.run(await svc.prepare(gi, client))

        scored, generated = await _all(score_prompt(), generate())
        if generated is not None:
            prepared, out_text, out_ids, out_lps, out_tops, reason, switches = generated
            served, timings, info = prepared.routing, prepared.timings, svc.adapter_info(prepared)
        prompt_lps: list[float | None] = [None]
        prompt_tops: list[dict[int, float] | None] = [None]
        if scored is not None:
            lps, tops, _, score_routing, score_timings, _ = scored
            prompt_lps += lps
            prompt_tops += tops
            if served is None:
                served, timings = score_routing, score_timings
        if served is None:  # echo of a one-token prompt, nothing generated
            timings = Timings()
            served = await svc.route_ids(prompt_ids, svc.params_for(routing, client), client,
                                         timings)
        choice: dict[str, Any] = {"index": index, "text": (echoed if req.echo else "") + out_text,
                                  "logprobs": None, "finish_reason": reason}
        if want_lps:
            ids_all = (list(prompt_ids) if req.echo else []) + out_ids
            lps_all = (prompt_lps if req.echo else []) + out_lps
            tops_all = (prompt_tops if req.echo else []) + out_tops if req.logprobs else None
            choice["logprobs"] = self.completion_logprobs(ids_all, lps_all, tops_all)
        choice["ttmm"] = self.ttmm_field(served, timings, switches, info)
        choice["_prompt_tokens"], choice["_completion_tokens"] = len(prompt_ids), len(out_ids)
        return choice

    async def run(self, prepared):
        """Generate a prepared request to its end: (prepared, text, ids, logprobs, top
        logprobs, finish reason, switches)."""
        parts, ids, lps, tops, reason, switches = [], [], [], [], None, []
        async for step in self.service.generate(prepared):
            parts.append(step.text)
            ids += step.token_ids
            lps += step.logprobs
            tops += step.top_logprobs
            switches += step.switches
            reason = step.finish_reason or reason
        return prepared, "".join(parts), ids, lps, tops, reason, switches

    def completion_logprobs(self, ids: list[int], lps: list[float | None],
                            tops: list[dict[int, float] | None] | None = None) -> dict:
        """OpenAI's completion logprobs. `tops`: per token the alternatives the engine gave
        (the k most likely and the chosen one); None (k = 0): the chosen token alone."""
        forms = self.token_forms(ids)
        tokens = [f.name for f in forms]
        offsets, pos = [], 0
        for f in forms:
            offsets.append(pos)
            pos += len(f.text)
        values = [None if lp is None else _floor(lp) for lp in lps]
        if tops is None or len(tops) != len(values):
            top = [None if v is None else {t: v} for t, v in zip(tokens, values, strict=False)]
        else:
            top = [None if alts is None else _first_per_name(alts)
                   for alts in self.top_forms(tops)]
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top,
                "text_offset": offsets}

    async def chat(self, request: Request, req: ChatRequest, client: Client) -> Response:
        routing = self.routing_for(req.model, req.ttmm, client)
        messages = tuple(chat_message(i, m) for i, m in enumerate(req.messages))
        if not messages:
            raise InvalidArgument("messages", "is empty")
        k = req.top_logprobs or 0
        if not 0 <= k <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_CHAT_TOP_LOGPROBS}], "
                                  f"got {k}")
        if k and not req.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs: true")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        sampling = self.sampling_for(req, max_tokens, req.logprobs, k)
        gi = GenerateInput(messages=messages, sampling=sampling,
                           max_tokens_set=max_tokens is not None, routing=routing)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return await self.stream(request, rid, "chat.completion.chunk", req, gi, client)
        with self.access.admission.admitted(client=client):
            prepared = await self.service.prepare(gi, client)
            _, text, ids, lps, tops, reason, switches = await _until_disconnected(
                request, self.run(prepared))
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self.chat_logprobs(ids, lps, tops, k) if req.logprobs else None,
                  "finish_reason": reason}
        usage = {"prompt_tokens": len(prepared.prompt_ids), "completion_tokens": len(ids),
                 "total_tokens": len(prepared.prompt_ids) + len(ids)}
        self.count(request, "OK")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": [choice], "usage": usage,
            "ttmm": self.ttmm_field(prepared.routing, prepared.timings, switches,
                                    self.service.adapter_info(prepared))})

    def chat_logprobs(self, ids: list[int], lps: list[float],
                      tops: list[dict[int, float]], k: int) -> dict:
        """OpenAI's chat logprobs: per token its own and the `k` most likely (none if 0)."""
        alts = self.top_forms(tops, k) if k and len(tops) == len(ids) else [[]] * len(ids)
        content = []
        for f, lp, top in zip(self.token_forms(ids), lps, alts, strict=False):
            content.append({"token": f.name, "logprob": _floor(lp), "bytes": list(f.raw),
                            "top_logprobs": [{"token": a.name, "logprob": v,
                                              "bytes": list(a.raw)} for a, v in top]})
        return {"content": content}

    async def stream(self, request: Request, rid: str, kind: str, req: _Request,
                     gi: GenerateInput, client: Client, echo: str | None = None) -> Response:
        """Server-sent events: prepared (validated, routed) before the 200 is sent, so errors
        up to there get their status; a later error is sent as an event."""
        admission = self.access.admission
        admission.enter(client)
        try:
            prepared = await self.service.prepare(gi, client)
        except BaseException:
            admission.leave(client)
            raise
        release = _Once(lambda: admission.leave(client))
        chat = kind.startswith("chat")
        usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def chunk(choice: dict, **extra) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": req.model,
                    "choices": [choice] if choice else [], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            code = "OK"
            completion = 0
            try:
                first = {"ttmm": self.ttmm_field(prepared.routing, None, (),
                                                 self.service.adapter_info(prepared))}
                if chat:
                    yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}, **first)
                    first = {}
                elif echo:
                    yield chunk({"index": 0, "text": echo, "logprobs": None,
                                 "finish_reason": None}, **first)
                    first = {}
                async with contextlib.aclosing(self.service.generate(prepared)) as steps:
                    async for step in steps:
                        completion = step.completion_tokens
                        extra = dict(first)
                        first = {}
                        if step.finished:
                            extra["ttmm"] = {**extra.get("ttmm", {}),
                                             "timings": prepared.timings.as_dict()}
                        if step.switches:
                            extra.setdefault("ttmm", {})["switches"] = self.ttmm_field(
                                prepared.routing, None, step.switches)["switches"]
                        reason = step.finish_reason if step.finished else None
                        if chat:
                            lps = self.chat_logprobs(step.token_ids, step.logprobs,
                                                     step.top_logprobs,
                                                     gi.sampling.top_logprobs) \
                                if gi.sampling.logprobs else None
                            choice = {"index": 0, "delta": {"content": step.text} if step.text
                                      else {}, "logprobs": lps, "finish_reason": reason}
                        else:
                            lps = self.completion_logprobs(
                                step.token_ids, step.logprobs,
                                step.top_logprobs if gi.sampling.top_logprobs else None) \
                                if gi.sampling.logprobs else None
                            choice = {"index": 0, "text": step.text, "logprobs": lps,
                                      "finish_reason": reason}
                        yield chunk(choice, **extra)
                if usage:
                    n = len(prepared.prompt_ids)
                    yield chunk({}, usage={"prompt_tokens": n, "completion_tokens": completion,
                                           "total_tokens": n + completion})
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:  # noqa: BLE001 - after the 200: reported as an event
                st = status_of(e)
                code = st.code
                if st.internal:
                    log.error("%s failed", request.url.path, exc_info=e)
                yield "data: " + json.dumps({"error": {
                    "message": st.message, "type": _ERROR_TYPES.get(st.http, "server_error"),
                    "param": None, "code": st.code.lower()}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                release()
                self.count(request, code)

        return _Stream(events(), release)

    def health(self) -> JSONResponse:
        if self.access.admission.closed:
            return JSONResponse(_error_body(Unavailable("server is shutting down")), 503)
        if not self.service.engine_running:
            return JSONResponse(_error_body(Unavailable("the vLLM engine is not running")), 503)
        return JSONResponse({"status": "ok"})

    def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class UnknownModel(NotFound):
    def __init__(self, model: str):
        super().__init__(f"model {model!r} does not exist: GET /v1/models lists the models "
                         "(ttmm, ttmm:top1, ttmm:uniform, base, expert-<id>)")


class _Once:
    def __init__(self, fn: Callable[[], None]):
        self.fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class _Stream(StreamingResponse):
    """An SSE response that releases its admission even when its body never starts (the
    client left before the first byte)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.release = events, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()
            self.release()


class ClientGone(ServiceError):
    code = "CANCELLED"


async def _all(*aws) -> list:
    """asyncio.gather, but the first failure cancels the others (their engine requests)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def _until_disconnected(request: Request, aw):
    """Await `aw`, cancelling it if the client disconnects first (its engine requests are
    aborted, as a gRPC cancellation does)."""
    work = asyncio.ensure_future(aw)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise ClientGone("client disconnected")
    return work.result()


# ---------------------------------------------------------------------------- helpers


def http_field(field_name: str) -> str:
    """The service's field names in the HTTP body's terms (routing.beta -> ttmm.beta)."""
    if field_name.startswith("routing"):
        return "ttmm" + field_name[len("routing"):]
    if field_name.startswith("sampling."):
        return field_name[len("sampling."):]
    if field_name in ("prompt_token_ids", "continuation", "continuation_token_ids"):
        return "prompt"
    return field_name


def chat_message(i: int, m: MessageIn) -> ChatMessage:
    if m.content is None:
        content = ""
    elif isinstance(m.content, str):
        content = m.content
    else:
        content = "".join(p.text for p in m.content)
    return ChatMessage(ROLE_ALIASES.get(m.role, m.role), content)


def routing_json(r: Routing, title: Callable[[int], str], info: dict | None = None) -> dict:
    sims = r.similarities or (float("nan"),) * len(r.expert_ids)
    out = {"mode": r.mode.value,
           "experts": [{"id": i, "title": title(i), "weight": w, "similarity": _finite(s)}
                       for i, w, s in zip(r.expert_ids, r.weights, sims, strict=False)],
           "top_similarity": _finite(r.top_similarity), "entropy": _finite(r.entropy),
           "out_of_reach": r.out_of_reach}
    if info:
        out["merged_rank"] = int(info.get("rank", 0))
        out["compression_error"] = float(info.get("rel_error", 0.0))
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _first_per_name(alternatives: list[tuple[TokenForm, float]]) -> dict[str, float]:
    """{token name: log-probability}, most likely first (of two tokens with one name, which
    token_form makes rare, the likelier)."""
    out: dict[str, float] = {}
    for form, lp in alternatives:
        out.setdefault(form.name, lp)
    return out


class TokenForm(NamedTuple):
    text: str  # the token decoded alone (what it adds to the text; offsets count it)
    name: str  # how logprobs name it: `text`, or OpenAI's "bytes:\\xNN..." (see token_form)
    raw: bytes  # its bytes (chat's `bytes`)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable stand-in character -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {chr(b): b for b in keep}
    shifted = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return chars


_BYTE_LEVEL = _byte_level_chars()


def token_form(tokenizer, token_id: int) -> TokenForm:
    """A token's text, name and bytes. A token that is part of a character (a byte of a
    multi-byte UTF-8 sequence) decodes alone to U+FFFD, the same as every other such token:
    it is named as OpenAI names it, "bytes:\\xe2\\x80", from its exact bytes, when the
    tokenizer's piece gives them (byte-level BPE, SentencePiece byte fallback)."""
    text = tokenizer.decode([token_id])
    raw = text.encode()
    if "\ufffd" in text:
        exact = _piece_bytes(tokenizer.convert_ids_to_tokens(token_id))
        if exact is not None and exact != raw:
            return TokenForm(text, "bytes:" + "".join(f"\\x{b:02x}" for b in exact), exact)
    return TokenForm(text, text, raw)


def _piece_bytes(piece) -> bytes | None:
    if not isinstance(piece, str) or not piece:
        return None
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return None


def _floor(lp: float) -> float:
    return max(float(lp), LOGPROB_FLOOR) if not math.isnan(lp) else LOGPROB_FLOOR


def _error_body(e: BaseException, param: str | None = None) -> dict:
    st = status_of(e)
    return {"error": {"message": st.message, "type": _ERROR_TYPES.get(st.http, "server_error"),
                      "param": param, "code": st.code.lower()}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_field(loc) -> str:
    """A pydantic error location as a field name: ("body", "messages", 0, "role") ->
    "messages[0].role" (union member tags such as "list[int]" dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out or "body"


# ---------------------------------------------------------------------------- the app


def build_app(door: HttpDoor) -> FastAPI:
    app = FastAPI(title="ttmm-vllm (OpenAI-compatible)", docs_url=None, redoc_url=None)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, e: ServiceError):
        return door.error(request, e)  # e.g. authentication, raised in a dependency

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception):
        return door.error(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError):
        # the most specific error: with a union (a string or a list of parts) the deepest
        errs = e.errors() or [{"loc": ("body",), "msg": "invalid request"}]
        err = max(errs, key=lambda x: len(_loc_field(x.get("loc", ("body",)))))
        name = _loc_field(err.get("loc", ("body",)))
        if err.get("type") == "json_invalid":
            name = "body"
        return door.error(request, InvalidArgument(name, str(err.get("msg"))))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 401: "UNAUTHENTICATED"}.get(
            e.status_code, "INVALID_ARGUMENT")
        return JSONResponse({"error": {"message": str(e.detail), "type": _ERROR_TYPES.get(
            e.status_code, "invalid_request_error"), "param": None, "code": code.lower()}},
            status_code=e.status_code)

    def handled(fn):
        """Route bodies' errors -> OpenAI error JSON (errors in dependencies reach on_error)."""
        async def call(request: Request, *args):
            try:
                return await fn(request, *args)
            except asyncio.CancelledError:
                door.count(request, "CANCELLED")
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, never a crash
                return door.error(request, e)
        return call

    @app.get("/v1/models")
    async def models(request: Request, client: Client = Depends(door.authenticate)):
        return await handled(door.models)(request, client)

    @app.get("/v1/models/{model}")
    async def model(model: str, request: Request,
                    client: Client = Depends(door.authenticate)):
        async def one(request, client):
            resp = json.loads((await door.models(request, client)).body)
            for card in resp["data"]:
                if card["id"] == model:
                    return JSONResponse(card)
            raise UnknownModel(model)
        return await handled(one)(request, client)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          client: Client = Depends(door.authenticate)):
        return await handled(lambda r, b, c: door.completions(r, b, c))(request, body, client)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request,
                   client: Client = Depends(door.authenticate)):
        return await handled(lambda r, b, c: door.chat(r, b, c))(request, body, client)

    @app.get("/health")
    async def health():
        return door.health()

    @app.get("/metrics")
    async def metrics():
        return door.metrics_text()

    return BodyLimit(app, door.config.max_body_bytes)


class BodyLimit:
    """ASGI middleware: bodies above the limit get a 400 before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            body = _error_body(InvalidArgument("body", "x"), "body")
            body["error"]["message"] = (f"body: {int(length)} bytes exceed the limit of "
                                        f"{self.limit} bytes")
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return None
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise InvalidArgument("body", f"exceeds the limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


# ---------------------------------------------------------------------------- the server


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """Signals belong to the process's owner (`ttmm serve` drains on SIGTERM)."""
        yield


# The key, in a request's scope["state"], of its client certificate's common name (mTLS)
PEER_STATE = "ttmm_tls_peer"


def _peer_name(transport) -> str | None:
    """The verified client certificate's common name on a TLS connection (None: no
    certificate, or not TLS)."""
    ssl_object = transport.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _peer_protocol() -> type:
    """uvicorn's HTTP protocol, each connection's requests carrying its client certificate's
    common name in scope["state"][PEER_STATE] (uvicorn copies the protocol's app_state into
    every request's state), so mutual TLS names the client as at the gRPC door."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class PeerProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            name = _peer_name(transport)
            if name is not None:
                self.app_state = {**self.app_state, PEER_STATE: name}

    return PeerProtocol


def _tls_options(config: HttpConfig) -> dict:
    """uvicorn.Config's TLS arguments for the config (none without a certificate)."""
    if not config.tls_cert:
        return {}
    out = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        out |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED,
                "http": _peer_protocol()}
    return out


class HttpServer:
    """A running HTTP door: `await HttpServer.start(service, config, access)`; `port` is the
    bound port (config.port 0: any free one)."""

    def __init__(self, service: TTMMService, config: HttpConfig, access: Access):
        self.service = service
        self.config = config
        self.access = access
        self.door = HttpDoor(service, access, config)
        self.port = 0
        self.server: _Uvicorn | None = None
        self.task: asyncio.Task | None = None

    @classmethod
    async def start(cls, service: TTMMService, config: HttpConfig | None = None,
                    access: Access | None = None) -> HttpServer:
        """Listen on config.host:config.port. `access`: the gRPC server's (one auth, one
        admission bound); None: no authentication, its own bound of 256 requests."""
        config = config or HttpConfig()
        self = cls(service, config, access or Access(service))
        family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.host, config.port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on {config.host}:{config.port} for HTTP: "
                          f"{e.strerror}") from e
        self.port = sock.getsockname()[1]
        uc = uvicorn.Config(build_app(self.door), lifespan="off", log_level="warning",
                            access_log=False, timeout_graceful_shutdown=config.grace_s,
                            **_tls_options(config))
        try:
            uc.load()  # reads the TLS files: a bad one fails here, not in the serving task
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise OSError(f"cannot serve HTTPS on {config.host}:{self.port} with --tls-cert "
                          f"{config.tls_cert}, --tls-key {config.tls_key}"
                          + (f", --tls-client-ca {config.tls_client_ca}"
                             if config.tls_client_ca else "") + f": {e}") from e
        self.server = _Uvicorn(uc)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                sock.close()
                self.task.result()
                raise OSError(f"the HTTP server on {config.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        log.info("ttmm OpenAI-compatible HTTP API on %s://%s:%d/v1%s", config.scheme,
                 config.host, self.port, " (mutual TLS)" if config.tls_client_ca else "")
        return self

    async def stop(self) -> None:
        if self.server is None or self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.task), self.config.grace_s + 5)
        if not self.task.done():
            self.task.cancel()
