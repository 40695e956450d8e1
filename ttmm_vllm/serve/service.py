"""The TTMM service without the transport: validate -> embed -> route -> engine.

`grpc_server.py` (gRPC) and the Ray Serve deployment both drive this class; it knows neither gRPC
nor vLLM. Errors are domain errors (`InvalidArgument` names the field) that the transport maps
to status codes.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ttmm_vllm.library import Library, LibraryError
from ttmm_vllm.routing.embed import Embedder, MicroBatcher
from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, Routing, RoutingParams, Variant
from ttmm_vllm.serve.engine_api import EngineLike, Sampling, Step
from ttmm_vllm.serve.errors import InvalidArgument, NotFound, PermissionDenied
from ttmm_vllm.serve.metrics import Metrics, Timings


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


@dataclass
class Client:
    """Who is calling: an identity and the experts it may use (None: all)."""

    identity: str = "anonymous"
    allowed: frozenset[int] | None = None


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
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.max_model_len

    async def shutdown(self) -> None:
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
        alive = set(self.index.ids)
        unknown = [e for e in r.experts if e not in alive]
        if unknown:
            raise InvalidArgument("routing.experts", f"unknown expert ids {unknown}")
        if client.allowed is not None:
            denied = [e for e in r.experts if e not in client.allowed]
            if denied:
                raise PermissionDenied(f"experts {denied} are not permitted for "
                                       f"{client.identity}")
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
        if len(s.stop) > c.max_stop_strings:
            raise InvalidArgument("sampling.stop", f"at most {c.max_stop_strings} stop strings")
        if any(not x or len(x) > c.max_stop_length for x in s.stop):
            raise InvalidArgument("sampling.stop",
                                  f"stop strings must have 1..{c.max_stop_length} characters")
        return s

    def tokenize_prompt(self, prompt: str, token_ids: Sequence[int], field_name: str = "prompt"
                        ) -> list[int]:
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

    def _allowed(self, client: Client) -> Callable[[int], bool] | None:
        if client.allowed is None:
            return None
        allowed = client.allowed
        return lambda i: i in allowed

    def reroute_every(self, r: RoutingRequest, params: RoutingParams) -> int:
        """How often this request re-routes: its own ask, else the server's default.

        Re-routing needs routed experts: a request that asks for it in base mode or with an
        explicit expert list is refused (silently ignoring it would mislead the client)."""
        fixed = params.mode == Mode.BASE or bool(params.experts)
        if r.reroute_every:
            if fixed:
                raise InvalidArgument("routing.reroute_every", "re-routing needs routed experts "
                                      "(mode ttmm, top1 or uniform, no explicit expert list)")
            return int(r.reroute_every)
        if r.reroute_every is None and not fixed:
            return self.config.default_reroute_every
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
        ids = await asyncio.to_thread(self.tokenize_prompt, req.prompt, req.prompt_token_ids)
        sampling = self.validate_sampling(req.sampling, len(ids), req.max_tokens_set)
        reroute = self.reroute_every(req.routing, params)
        routing = await self.route_ids(ids, params, client, timings)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        rid = req.request_id or uuid.uuid4().hex
        return Prepared(rid, ids, routing, sampling, timings, params, client, reroute)

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
                    continuation_token_ids: Sequence[int] = ()) -> tuple[list[float], list[int],
                                                                          Routing, Timings]:
        timings = Timings()
        t0 = time.perf_counter()
        params = self.params_for(r, client)
        ids = await asyncio.to_thread(self.tokenize_prompt, prompt, prompt_token_ids)
        if continuation_token_ids:
            cont = list(continuation_token_ids)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in cont):
                raise InvalidArgument("continuation_token_ids", "token id outside the vocabulary")
        else:
            if not continuation:
                raise InvalidArgument("continuation", "is empty")
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if len(ids) + len(cont) > self.max_model_len:
            raise InvalidArgument("continuation", f"prompt + continuation have "
                                  f"{len(ids) + len(cont)} tokens; the context is "
                                  f"{self.max_model_len}")
        every = self.reroute_every(r, params)
        routing = await self.route_ids(ids, params, client, timings)
        if not every:
            lps = await self.engine.score(uuid.uuid4().hex, ids, cont, routing, timings)
            switches = []
        else:
            lps, switches = await self._score_rerouted(ids, cont, routing, params, client,
                                                       every, timings)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        self.metrics.observe(timings)
        return lps, cont, routing, timings, switches

    async def _score_rerouted(self, ids: list[int], cont: list[int], routing: Routing,
                              params: RoutingParams, client: Client, every: int,
                              timings: Timings) -> tuple[list[float], list]:
        """Score the continuation in windows of `every` tokens, each under the routing of the
        last query tokens before it: what re-routed generation would have computed."""
        lps: list[float] = []
        switches = []
        for j in range(0, len(cont), every):
            if j:
                new = await self.route_ids(ids + cont[:j], params, client, Timings(), tail=True)
                if new.key() != routing.key():
                    switches.append((j, new))
                routing = new
            lps += await self.engine.score(uuid.uuid4().hex, ids + cont[:j],
                                           cont[j:j + every], routing,
                                           timings if j == 0 else None)
        return lps, switches

    # ------------------------------------------------------------------ live library changes

    async def add_expert(self, expert_id: int):
        """Serve an expert placed in the library directory, without a restart.

        Order matters: validate, make the engine able to serve it, then let routing see it,
        then record it on disk (so a restart sees the same library).
        """
        async with self._admin_lock:
            try:
                info, centroid = await asyncio.to_thread(self.library.pending_expert,
                                                         expert_id)
            except LibraryError as e:
                raise InvalidArgument("expert_id", str(e)) from e
            await asyncio.to_thread(self.library.commit_added, info, centroid)
            try:
                await self.engine.add_expert(expert_id)
            except BaseException:
                await asyncio.to_thread(self.library.commit_removed, expert_id)
                raise
            self.index.add(expert_id, centroid)
            return info

    async def remove_expert(self, expert_id: int) -> None:
        """Stop routing to an expert now; requests in flight keep the weights they started
        with; its tensors are freed once unused; the manifest marks it deleted."""
        async with self._admin_lock:
            if expert_id not in set(self.index.ids):
                raise NotFound(f"expert {expert_id} is not served")
            self.index.remove(expert_id)
            await asyncio.to_thread(self.library.commit_removed, expert_id)
            await self.engine.remove_expert(expert_id)

    def experts_for(self, client: Client) -> list:
        alive = set(self.index.ids)
        return [e for e in self.library.manifest.experts
                if e.id in alive and (client.allowed is None or e.id in client.allowed)]

    def adapter_info(self, p: Prepared) -> dict:
        """Rank and compression error of what served a prepared request."""
        if p.routing.is_base:
            return {}
        return self.engine.adapter_info(p.routing, p.request_id) or {
            "rank": sum(self.library.manifest.expert(i).rank for i in p.routing.expert_ids)}

    @property
    def engine_running(self) -> bool:
        return self.engine.is_running

    def title(self, expert_id: int) -> str:
        try:
            return self.library.manifest.expert(expert_id).title
        except Exception:  # noqa: BLE001
            return ""


def _replace(s: Sampling, **kw) -> Sampling:
    from dataclasses import replace

    return replace(s, **kw)
