"""The TTMM service without the transport: validate -> embed -> route -> engine.

`grpc_server.py` (gRPC) and the Ray Serve deployment both drive this class; it knows neither gRPC
nor vLLM. Errors are domain errors (`InvalidArgument` names the field) that the transport maps
to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ttmm_vllm.library import Library, LibraryError
from ttmm_vllm.routing.embed import Embedder, MicroBatcher
from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, Routing, RoutingParams, Variant
from ttmm_vllm.serve import chat
from ttmm_vllm.serve.chat import ChatMessage
from ttmm_vllm.serve.engine_api import MAX_TOP_LOGPROBS, EngineLike, Sampling, Step
from ttmm_vllm.serve.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
)
from ttmm_vllm.serve.metrics import Metrics, Timings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    default_max_tokens: int = 64
    max_explicit_experts: int = 64
    max_active_cap: int = 64
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_prompt_chars: int = 1_000_000
    # Weights equal after rounding to this many decimals share one merged adapter.
    weight_decimals: int = 6
    embed_window_ms: float = 2.0
    embed_max_batch: int = 64
    # Re-route routed requests after every N generated tokens unless they say otherwise (0: no)
    default_reroute_every: int = 0
    # Each re-route window is one engine request over the whole context so far (a prefill;
    # in Score a full one, as vLLM skips the prefix cache when prompt logprobs are asked), so
    # a request's windows are at least `min_reroute_every` tokens and at most
    # `max_reroute_windows` (the server's default window is widened to fit instead).
    min_reroute_every: int = 8
    max_reroute_windows: int = 64
    # Score's continuation: characters (checked first, before any tokenization) and tokens.
    max_continuation_chars: int = 200_000
    max_continuation_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("min_reroute_every", "max_reroute_windows", "max_continuation_chars",
                     "max_continuation_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_reroute_every and self.default_reroute_every < self.min_reroute_every:
            raise ValueError(f"default_reroute_every must be 0 (never) or >= "
                             f"min_reroute_every ({self.min_reroute_every}), got "
                             f"{self.default_reroute_every}")


@dataclass
class RoutingRequest:
    """Per-request routing overrides (None: the library's default)."""

    mode: Mode | None = None
    beta: float | None = None
    tau: float | None = None
    max_active: int | None = None
    experts: tuple[int, ...] = ()
    expert_weights: tuple[float, ...] = ()
    reroute_every: int | None = None  # None: the server's default; 0: never


@dataclass
class GenerateInput:
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens_set: bool = False
    routing: RoutingRequest = field(default_factory=RoutingRequest)
    request_id: str = ""
    # Alternative to prompt: a conversation (chat.py: templated; routing embeds the last
    # user turn)
    messages: tuple[ChatMessage, ...] = ()


@dataclass
class Client:
    """Who is calling: an identity and the experts it may use.

    groups: the expert groups it may use, looked up in the live manifest at each request (an
    expert added later under one of them is usable, one re-added under another group is not);
    None: every group. allowed: a fixed set of expert ids on top of that (None: no limit)."""

    identity: str = "anonymous"
    allowed: frozenset[int] | None = None
    groups: frozenset[str] | None = None
    # The identity was proven (a token or a client certificate): admission gives each such
    # identity its own share of the slots.
    authenticated: bool = False

    @property
    def restricted(self) -> bool:
        return self.allowed is not None or self.groups is not None


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    routing: Routing
    sampling: Sampling
    timings: Timings
    params: RoutingParams | None = None
    client: Client | None = None
    reroute_every: int = 0  # 0: the prompt's routing for the whole generation


class TTMMService:
    def __init__(self, library: Library, engine: EngineLike, embedder: Embedder,
                 config: ServiceConfig | None = None, metrics: Metrics | None = None):
        self.library = library
        self.engine = engine
        self.config = config or ServiceConfig()
        self.metrics = metrics or Metrics()
        self.embedder = embedder
        self.batcher = MicroBatcher(embedder, max_batch=self.config.embed_max_batch,
                                    window_ms=self.config.embed_window_ms)
        r = library.manifest.router
        self.defaults = RoutingParams(
            beta=r.beta, tau=r.tau, max_active=r.max_active, variant=Variant(r.sparse_softmax),
            top_m=r.top_m, ood_threshold=r.ood_threshold)
        self.query_tokens = r.query_tokens
        self.index = CentroidIndex(library.centroids,
                                   ids=[e.id for e in library.manifest.active_experts])
        self.router = Router(self.index, self.defaults)
        self._admin_lock = asyncio.Lock()
        self._admin_tasks: set[asyncio.Task] = set()
        # (manifest, {groups: expert ids}): group members, recomputed when the manifest changes
        self._members: tuple[object, dict[frozenset[str], frozenset[int]]] = (None, {})
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.max_model_len

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # an admin change finishes before the engine goes
            await asyncio.wait_for(self.wait_admin(), 60)
        self.batcher.close()
        await self.engine.shutdown()

    # ------------------------------------------------------------------ validation

    def params_for(self, r: RoutingRequest, client: Client) -> RoutingParams:
        c = self.config
        if r.beta is not None and not (math.isfinite(r.beta) and r.beta > 0):
            raise InvalidArgument("routing.beta", f"must be a finite number > 0, got {r.beta}")
        if r.tau is not None and not (math.isfinite(r.tau) and 0 <= r.tau < 1):
            raise InvalidArgument("routing.tau", f"must be in [0, 1), got {r.tau}")
        if r.max_active is not None and not 1 <= r.max_active <= c.max_active_cap:
            raise InvalidArgument("routing.max_active",
                                  f"must be in [1, {c.max_active_cap}], got {r.max_active}")
        if len(r.experts) > c.max_explicit_experts:
            raise InvalidArgument("routing.experts", f"at most {c.max_explicit_experts} experts "
                                  f"may be named, got {len(r.experts)}")
        if len(set(r.experts)) != len(r.experts):
            raise InvalidArgument("routing.experts", "an expert id is listed twice")
        permitted = self.permitted(client)
        if permitted is not None:
            # One answer for "does not exist" and "not yours": no oracle of which ids exist.
            hidden = [e for e in r.experts if e not in permitted or e not in self.index]
            if hidden:
                raise PermissionDenied(f"routing.experts: experts {hidden} are unknown or not "
                                       f"permitted for {client.identity}")
        else:
            unknown = [e for e in r.experts if e not in self.index]
            if unknown:
                raise InvalidArgument("routing.experts", f"unknown expert ids {unknown}")
        if r.expert_weights:
            if len(r.expert_weights) != len(r.experts):
                raise InvalidArgument("routing.expert_weights",
                                      f"{len(r.expert_weights)} weights for "
                                      f"{len(r.experts)} experts")
            ws = np.asarray(r.expert_weights, dtype=np.float64)
            if not np.all(np.isfinite(ws)):
                raise InvalidArgument("routing.expert_weights", "NaN or infinite weight")
            if np.any(ws < 0):
                raise InvalidArgument("routing.expert_weights", "negative weight")
            if ws.sum() <= 0:
                raise InvalidArgument("routing.expert_weights", "all weights are zero")
        if r.reroute_every is not None and r.reroute_every < 0:
            raise InvalidArgument("routing.reroute_every", "must be >= 0")
        try:
            return self.defaults.with_overrides(
                mode=r.mode, beta=r.beta, tau=r.tau, max_active=r.max_active,
                experts=tuple(r.experts) or None,
                expert_weights=tuple(r.expert_weights) or None)
        except ValueError as e:
            raise InvalidArgument("routing", str(e)) from e

    def validate_sampling(self, s: Sampling, prompt_len: int, max_tokens_set: bool) -> Sampling:
        c = self.config
        room = self.max_model_len - prompt_len
        if max_tokens_set:
            if s.max_tokens < 1:
                raise InvalidArgument("sampling.max_tokens", f"must be >= 1, got {s.max_tokens}")
            if s.max_tokens > room:
                raise InvalidArgument(
                    "sampling.max_tokens",
                    f"{s.max_tokens} exceeds the context: the prompt has {prompt_len} tokens "
                    f"and the model's context is {self.max_model_len}")
        else:
            s = _replace(s, max_tokens=max(1, min(c.default_max_tokens, room)))
        if not (math.isfinite(s.temperature) and 0 <= s.temperature <= 2):
            raise InvalidArgument("sampling.temperature",
                                  f"must be in [0, 2], got {s.temperature}")
        if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
        if s.top_k < -1:
            raise InvalidArgument("sampling.top_k", f"must be -1, 0 or positive, got {s.top_k}")
        if not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("sampling.top_logprobs",
                                  f"must be in [0, {MAX_TOP_LOGPROBS}], got {s.top_logprobs}")
        if len(s.stop) > c.max_stop_strings:
            raise InvalidArgument("sampling.stop", f"at most {c.max_stop_strings} stop strings")
        if any(not x or len(x) > c.max_stop_length for x in s.stop):
            raise InvalidArgument("sampling.stop",
                                  f"stop strings must have 1..{c.max_stop_length} characters")
        return s

    def check_sizes(self, text: str, token_ids: Sequence[int], field_name: str) -> None:
        """The cheap caps (characters, token count), before anything tokenizes or scans."""
        c = self.config
        chars, tokens = ((c.max_continuation_chars, c.max_continuation_tokens)
                         if field_name == "continuation" else (c.max_prompt_chars, None))
        if len(text) > chars:
            raise InvalidArgument(field_name, f"has {len(text)} characters; at most {chars}")
        limit = min(tokens or self.max_model_len, self.max_model_len)
        if len(token_ids) > limit:
            raise InvalidArgument(f"{field_name}_token_ids",
                                  f"has {len(token_ids)} tokens; at most {limit}")

    def tokenize_continuation(self, text: str, token_ids: Sequence[int]) -> list[int]:
        """Score's continuation as token ids, within `max_continuation_tokens`."""
        self.check_sizes(text, token_ids, "continuation")
        if token_ids:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in token_ids):
                raise InvalidArgument("continuation_token_ids", "token id outside the vocabulary")
            return list(token_ids)
        if not text:
            raise InvalidArgument("continuation", "is empty")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.config.max_continuation_tokens:
            raise InvalidArgument("continuation", f"has {len(ids)} tokens; at most "
                                  f"{self.config.max_continuation_tokens}")
        return ids

    def tokenize_prompt(self, prompt: str, token_ids: Sequence[int], field_name: str = "prompt"
                        ) -> list[int]:
        if len(token_ids) >= self.max_model_len:  # before scanning them
            raise InvalidArgument(f"{field_name}_token_ids", f"has {len(token_ids)} tokens; the "
                                  f"model's context is {self.max_model_len}")
        if token_ids:
            vocab = len(self.tokenizer)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidArgument(f"{field_name}_token_ids",
                                      f"token ids {bad[:5]} outside the vocabulary ({vocab})")
            ids = list(token_ids)
        else:
            if len(prompt) > self.config.max_prompt_chars:
                raise InvalidArgument(field_name, f"longer than {self.config.max_prompt_chars} "
                                      "characters")
            if not prompt.strip():
                raise InvalidArgument(field_name, "is empty")
            if "\x00" in prompt:
                raise InvalidArgument(field_name, "contains a NUL character")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidArgument(field_name, "has no tokens")
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(field_name, f"has {len(ids)} tokens; the model's context is "
                                  f"{self.max_model_len}")
        return ids

    # ------------------------------------------------------------------ routing

    def permitted(self, client: Client) -> frozenset[int] | None:
        """The expert ids a client may use now (None: all): its groups' members in the live
        manifest, within its fixed `allowed` set."""
        ids = None if client.groups is None else self._group_members(client.groups)
        if client.allowed is not None:
            ids = client.allowed if ids is None else ids & client.allowed
        return ids

    def _group_members(self, groups: frozenset[str]) -> frozenset[int]:
        manifest = self.library.manifest
        if self._members[0] is not manifest:  # a live change wrote a new manifest
            self._members = (manifest, {})
        cache = self._members[1]
        got = cache.get(groups)
        if got is None:
            got = frozenset(e.id for e in manifest.active_experts if e.group in groups)
            if len(cache) < 4096:
                cache[groups] = got
        return got

    def _allowed(self, client: Client) -> Callable[[int], bool] | None:
        permitted = self.permitted(client)
        if permitted is None:
            return None
        return lambda i: i in permitted

    def reroute_every(self, r: RoutingRequest, params: RoutingParams,
                      tokens: int | None = None) -> int:
        """How often this request re-routes: its own ask, else the server's default.

        Re-routing needs routed experts: a request that asks for it in base mode or with an
        explicit expert list is refused (silently ignoring it would mislead the client). Each
        window costs a prefill of the context: a request's own window is at least
        `min_reroute_every` tokens and, over its `tokens` (generated or scored), makes at most
        `max_reroute_windows` windows; the server's default is widened to fit instead."""
        c = self.config
        fixed = params.mode == Mode.BASE or bool(params.experts)
        if r.reroute_every:
            if fixed:
                raise InvalidArgument("routing.reroute_every", "re-routing needs routed experts "
                                      "(mode ttmm, top1 or uniform, no explicit expert list)")
            every = int(r.reroute_every)
            if every < c.min_reroute_every:
                raise InvalidArgument("routing.reroute_every", f"must be 0 (never) or >= "
                                      f"{c.min_reroute_every} tokens, got {every}")
            if tokens is not None and -(-tokens // every) > c.max_reroute_windows:
                raise InvalidArgument(
                    "routing.reroute_every", f"{tokens} tokens in windows of {every} make "
                    f"{-(-tokens // every)} re-routed windows; at most {c.max_reroute_windows} "
                    f"per request (use reroute_every >= {-(-tokens // c.max_reroute_windows)})")
            return every
        if r.reroute_every is None and not fixed and c.default_reroute_every:
            every = c.default_reroute_every
            if tokens is not None:
                every = max(every, -(-tokens // c.max_reroute_windows))
            return every
        return 0

    async def route_ids(self, prompt_ids: Sequence[int], params: RoutingParams, client: Client,
                        timings: Timings, *, tail: bool = False) -> Routing:
        """Embed the first query tokens (the last ones when re-routing: `tail`), search the
        index, compute the weights."""
        if params.mode == Mode.BASE and not params.experts:
            return Routing(Mode.BASE)
        t0 = time.perf_counter()
        window = prompt_ids[-self.query_tokens:] if tail else prompt_ids[: self.query_tokens]
        text = self.tokenizer.decode(list(window))
        q = await self.batcher.embed(text)
        t1 = time.perf_counter()
        timings.embed_ms = (t1 - t0) * 1e3
        routing = await asyncio.to_thread(self.router.route, q, params, self._allowed(client))
        timings.search_ms = (time.perf_counter() - t1) * 1e3
        return routing.canonical(self.config.weight_decimals)

    async def prepare(self, req: GenerateInput, client: Client) -> Prepared:
        timings = Timings()
        t0 = time.perf_counter()
        params = self.params_for(req.routing, client)
        ids, query_ids = await asyncio.to_thread(self.input_ids, req)
        sampling = self.validate_sampling(req.sampling, len(ids), req.max_tokens_set)
        reroute = self.reroute_every(req.routing, params, sampling.max_tokens)
        routing = await self.route_ids(query_ids, params, client, timings)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        rid = req.request_id or uuid.uuid4().hex
        return Prepared(rid, ids, routing, sampling, timings, params, client, reroute)

    def input_ids(self, req: GenerateInput) -> tuple[list[int], list[int]]:
        """(prompt tokens, tokens routing embeds): the prompt's, or for a conversation its
        chat-templated tokens and its last user turn's."""
        if not req.messages:
            ids = self.tokenize_prompt(req.prompt, req.prompt_token_ids)
            return ids, ids
        if req.prompt or req.prompt_token_ids:
            raise InvalidArgument("messages", "send either a prompt or messages, not both")
        chat.check_messages(req.messages, self.config.max_prompt_chars)
        ids = self.tokenize_prompt(chat.render(self.tokenizer, req.messages), (), "messages")
        query = self.tokenizer(chat.routing_text(req.messages),
                               add_special_tokens=False)["input_ids"]
        return ids, query or ids

    async def route(self, prompt: str, r: RoutingRequest, client: Client
                    ) -> tuple[Routing, Timings]:
        timings = Timings()
        params = self.params_for(r, client)
        ids = await asyncio.to_thread(self.tokenize_prompt, prompt, ())
        routing = await self.route_ids(ids, params, client, timings)
        timings.total_ms = timings.embed_ms + timings.search_ms
        return routing, timings

    # ------------------------------------------------------------------ generation

    async def generate(self, p: Prepared) -> AsyncIterator[Step]:
        t0 = time.perf_counter()
        completion = 0
        self.metrics.active_experts.observe(len(p.routing.expert_ids))
        try:
            steps = (self._rerouted(p) if p.reroute_every else
                     self.engine.generate(p.request_id, p.prompt_ids, p.sampling, p.routing,
                                          p.timings))
            async for step in steps:
                completion = step.completion_tokens
                yield step
        finally:
            p.timings.total_ms += (time.perf_counter() - t0) * 1e3
            self.metrics.tokens.inc(completion)
            self.metrics.observe(p.timings)
            stats = self.engine.adapter_stats()
            self.metrics.set_adapter_stats(stats)
            self.metrics.expert_cache_bytes.set(stats.get("expert_cache_bytes", 0))

    async def _rerouted(self, p: Prepared) -> AsyncIterator[Step]:
        """Generate in segments of `reroute_every` tokens, each under the routing of the last
        query tokens before it (no look-ahead).

        Each segment is one engine request over prompt + tokens so far with that routing's
        merged adapter, so every token is computed exactly as with a merge fixed from the
        start of its segment (what the reference implementation checks). The price is a
        prefill of the context per switch; an in-place switch of a live adapter would avoid
        it, but an asynchronous engine gives no step on which such a switch is known to land.
        Greedy decoding is reproduced exactly; a seeded sampler is re-seeded per segment.
        """
        ids, routing, total = list(p.prompt_ids), p.routing, p.sampling.max_tokens
        done, seg = 0, 0
        while done < total:
            switches = []
            if seg:
                new = await self.route_ids(ids, p.params, p.client, Timings(), tail=True)
                if new.key() != routing.key():
                    switches.append((done, new))
                routing = new
            sampling = _replace(p.sampling, max_tokens=min(p.reroute_every, total - done))
            last = None
            async for step in self.engine.generate(f"{p.request_id}-{seg}", ids, sampling,
                                                   routing, p.timings if seg == 0 else None):
                ids += step.token_ids
                step.completion_tokens += done
                step.prompt_tokens = len(p.prompt_ids)
                step.switches, switches = switches, []
                last = step
                if step.finished and step.finish_reason == "length" \
                        and step.completion_tokens < total:
                    step.finished, step.finish_reason = False, None
                yield step
            if last is None or last.finished:
                return
            done, seg = last.completion_tokens, seg + 1

    async def score(self, prompt: str, continuation: str, r: RoutingRequest, client: Client, *,
                    prompt_token_ids: Sequence[int] = (),
                    continuation_token_ids: Sequence[int] = (),
                    routing_token_ids: Sequence[int] = ()
                    ) -> tuple[list[float], list[int], Routing, Timings, list]:
        """(log-probabilities of the continuation's tokens, its token ids, the routing, the
        timings, the re-routing switches)."""
        lps, _, cont, routing, timings, switches = await self.score_top(
            prompt, continuation, r, client, prompt_token_ids=prompt_token_ids,
            continuation_token_ids=continuation_token_ids,
            routing_token_ids=routing_token_ids)
        return lps, cont, routing, timings, switches

    async def score_top(self, prompt: str, continuation: str, r: RoutingRequest,
                        client: Client, *, top_logprobs: int = 0,
                        prompt_token_ids: Sequence[int] = (),
                        continuation_token_ids: Sequence[int] = (),
                        routing_token_ids: Sequence[int] = ()
                        ) -> tuple[list[float], list[dict[int, float]], list[int], Routing,
                                   Timings, list]:
        """`score`, with per continuation token its alternatives (second): token id ->
        log-probability of the `top_logprobs` most likely tokens and the token itself, most
        likely first. An engine without `score_top` (the Ray replicas) gives each token's
        own log-probability only."""
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got "
                                  f"{top_logprobs}")
        timings = Timings()
        t0 = time.perf_counter()
        params = self.params_for(r, client)
        # Cheap size checks first, on the loop; tokenization off it (a long text would stall
        # every other RPC and the health checks).
        self.check_sizes(prompt, prompt_token_ids, "prompt")
        self.check_sizes(continuation, continuation_token_ids, "continuation")
        ids = await asyncio.to_thread(self.tokenize_prompt, prompt, prompt_token_ids)
        cont = await asyncio.to_thread(self.tokenize_continuation, continuation,
                                       continuation_token_ids)
        if len(ids) + len(cont) > self.max_model_len:
            raise InvalidArgument("continuation", f"prompt + continuation have "
                                  f"{len(ids) + len(cont)} tokens; the context is "
                                  f"{self.max_model_len}")
        every = self.reroute_every(r, params, len(cont))
        # routing_token_ids: route as a generation from those tokens would (the HTTP door's
        # echo scores a whole prompt after its first token)
        routing = await self.route_ids(list(routing_token_ids) or ids, params, client, timings)
        if not every:
            lps, tops = await self._engine_score(ids, cont, routing, top_logprobs, timings)
            switches = []
        else:
            lps, tops, switches = await self._score_rerouted(ids, cont, routing, params,
                                                             client, every, timings,
                                                             top_logprobs)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        self.metrics.observe(timings)
        return lps, tops, cont, routing, timings, switches

    async def _engine_score(self, ids: Sequence[int], cont: Sequence[int], routing: Routing,
                            top_logprobs: int, timings: Timings | None
                            ) -> tuple[list[float], list[dict[int, float]]]:
        rid = uuid.uuid4().hex
        score_top = getattr(self.engine, "score_top", None)
        if top_logprobs and score_top is not None:
            return await score_top(rid, ids, cont, routing, top_logprobs, timings)
        lps = await self.engine.score(rid, ids, cont, routing, timings)
        return lps, [{t: lp} for t, lp in zip(cont, lps, strict=False)]

    async def _score_rerouted(self, ids: list[int], cont: list[int], routing: Routing,
                              params: RoutingParams, client: Client, every: int,
                              timings: Timings, top_logprobs: int = 0
                              ) -> tuple[list[float], list[dict[int, float]], list]:
        """Score the continuation in windows of `every` tokens, each under the routing of the
        last query tokens before it: what re-routed generation would have computed."""
        lps: list[float] = []
        tops: list[dict[int, float]] = []
        switches = []
        for j in range(0, len(cont), every):
            if j:
                new = await self.route_ids(ids + cont[:j], params, client, Timings(), tail=True)
                if new.key() != routing.key():
                    switches.append((j, new))
                routing = new
            window_lps, window_tops = await self._engine_score(
                ids + cont[:j], cont[j:j + every], routing, top_logprobs,
                timings if j == 0 else None)
            lps += window_lps
            tops += window_tops
        return lps, tops, switches

    # ------------------------------------------------------------------ live library changes

    # Each is one transaction over the manifest (and centroid table), the engine and the index:
    # it runs to its end under the admin lock even if the caller cancels or its deadline
    # passes, and a failure at any step puts back what the earlier steps changed.

    async def add_expert(self, expert_id: int):
        """Serve an expert placed in the library directory, without a restart.

        Order: validate (id, metadata, tensors, rank <= the engine's max_lora_rank), record it
        on disk (the worker reads the manifest from there; a crash after this point serves it
        on restart), make the engine able to serve it, then let routing see it.
        """
        self._check_live_changes()
        self._check_expert_id(expert_id)
        return await self._transaction(self._add_expert, expert_id)

    async def remove_expert(self, expert_id: int) -> None:
        """Stop routing to an expert now; requests in flight keep the weights they started
        with; its tensors are freed once unused; the manifest marks it deleted."""
        self._check_live_changes()
        self._check_expert_id(expert_id)
        return await self._transaction(self._remove_expert, expert_id)

    async def _add_expert(self, expert_id: int):
        if expert_id in self.index:
            raise AlreadyExists(f"expert {expert_id} is already served")
        try:
            info, centroid = await asyncio.to_thread(
                self.library.pending_expert, expert_id,
                getattr(self.engine, "max_expert_rank", None))
        except LibraryError as e:
            raise InvalidArgument("expert_id", str(e)) from e
        before = self.library.snapshot()
        await asyncio.to_thread(self.library.commit_added, info, centroid)
        try:
            await self.engine.add_expert(expert_id)
            self.index.add(expert_id, centroid)
        except BaseException:
            await self._undo(lambda: asyncio.to_thread(self.library.restore, before),
                             lambda: self.engine.remove_expert(expert_id))
            raise
        return info

    async def _remove_expert(self, expert_id: int) -> None:
        if expert_id not in self.index:
            raise NotFound(f"expert {expert_id} is not served")
        centroid = self.index.centroids[expert_id].copy()
        before = self.library.snapshot()
        self.index.remove(expert_id)  # no new request routes to it from here on
        try:
            await asyncio.to_thread(self.library.commit_removed, expert_id)
            await self.engine.remove_expert(expert_id)
        except BaseException:
            await self._undo(lambda: asyncio.to_thread(self.library.restore, before),
                             lambda: self.engine.add_expert(expert_id))
            self.index.add(expert_id, centroid)
            raise

    async def _transaction(self, fn, *args):
        """Run an admin change to its end under the admin lock, shielded from the caller."""
        async def run():
            async with self._admin_lock:
                return await fn(*args)

        task = asyncio.get_running_loop().create_task(run())
        self._admin_tasks.add(task)
        task.add_done_callback(_admin_done(self._admin_tasks))
        return await asyncio.shield(task)

    @staticmethod
    async def _undo(*steps) -> None:
        """Roll back: every step is tried; a failing one is logged, never hides the cause."""
        for step in steps:
            try:
                await step()
            except Exception:  # noqa: BLE001
                log.exception("rolling back a live library change failed")

    def _check_live_changes(self) -> None:
        engine = self.engine
        if not (callable(getattr(engine, "add_expert", None))
                and callable(getattr(engine, "remove_expert", None))):
            raise Unimplemented("live library changes are not supported by this deployment "
                                "(Ray Serve: change the library and redeploy)")

    def _check_expert_id(self, expert_id: int) -> None:
        limit = self.library.limits.max_expert_id
        if not 0 <= expert_id < limit:
            raise InvalidArgument("expert_id", f"must be in [0, {limit}), got {expert_id}")

    async def wait_admin(self) -> None:
        """Wait for admin changes in progress (even those whose callers went away)."""
        while self._admin_tasks:
            await asyncio.wait(set(self._admin_tasks))

    def experts_for(self, client: Client) -> list:
        permitted = self.permitted(client)
        return [e for e in self.library.manifest.experts
                if e.id in self.index and (permitted is None or e.id in permitted)]

    def adapter_info(self, p: Prepared) -> dict:
        """Rank and compression error of what served a prepared request."""
        if p.routing.is_base:
            return {}
        return self.engine.adapter_info(p.routing, p.request_id) or {
            "rank": sum(self.library.manifest.expert(i).rank for i in p.routing.expert_ids)}

    @property
    def engine_running(self) -> bool:
        return self.engine.is_running

    async def engine_healthy(self, timeout: float) -> bool:
        """Does the engine answer its health check within `timeout` seconds? (An engine
        without one: whether it runs.)"""
        check = getattr(self.engine, "check_health", None)
        if check is None:
            return self.engine.is_running
        try:
            await asyncio.wait_for(check(), timeout)
            return True
        except Exception:  # noqa: BLE001 - any failure, a timeout included, is "no"
            return False

    def title(self, expert_id: int) -> str:
        try:
            return self.library.manifest.expert(expert_id).title
        except Exception:  # noqa: BLE001
            return ""


def _admin_done(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: the caller
            log.debug("admin change failed: %r", task.exception())  # may have gone away
    return done


def _replace(s: Sampling, **kw) -> Sampling:
    from dataclasses import replace

    return replace(s, **kw)
