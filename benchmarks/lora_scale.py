"""Does serving stay near base speed however many experts the library holds? (issue 18)

`python -m benchmarks.lora_throughput --library-size 16 64 256` runs this: for each library
size K, a library of K random rank-16 experts (and a shared-A one: the same B's, one A per
module shared by every expert), then, with 32 concurrent requests each with its own routing
of 10 random experts (random weights), greedy, fixed length:

    base: LoRA disabled                                   <- every ratio is to this, per K
    mix: the resident library mixed per token             (cost grows with the batch's union)
    expand: each request's merge in a vLLM slot, rank 16  (compressed from rank 160)
    shared-A expand: the exact merge at rank 16           (shared-A library)
    default: the row `ttmm serve` would pick (serve/serving_path.py), marked, not rerun

Decode and prefill are timed apart from per-token timestamps (DELTA outputs): decode tokens/s
counts the tokens produced after every request has its first token, over that window.
Admission is the time vLLM takes to build and register one request's adapter (in-worker: read
the request's experts, merge), in ms and in base token times (one token for every request in
flight: the base's step time at this concurrency), measured twice: cold (each expert's first
use: read from disk and checksummed, once per worker) and in steady state (the same routings
again). Ratios are medians of `--repeats` paired rounds (base, then the path). Memory is the
worker's resident set after the row.

One base engine and one plugin engine serve every K (a routing adapter names its library;
the worker loads a library's bank on first use and drops the previous size's when done).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTIVE = 10
RANK = 16
PATHS = ("mix", "expand", "shared-A expand")


@dataclass
class ScaleRow:
    path: str  # "base" | "mix" | "expand" | "shared-A expand" | "default"
    library_size: int
    decode_tok_s: float
    prefill_tok_s: float
    total_tok_s: float
    admission_ms: float = float("nan")
    admission_base_tokens: float = float("nan")
    admission_cold_ms: float = float("nan")  # experts' first use: read and checksum
    worker_rss_gb: float = float("nan")
    decode_ratio: float = float("nan")
    total_ratio: float = float("nan")
    resolved: str = ""  # for "default": the path the cost model picked
    extra: dict[str, Any] = field(default_factory=dict)


def routings(k: int, count: int, seed: int) -> list[tuple[list[int], list[float]]]:
    """`count` routings of ACTIVE distinct random experts out of k, random weights (sum 1)."""
    rng = random.Random(seed * 7919 + k)
    out = []
    for _ in range(count):
        ids = rng.sample(range(k), min(ACTIVE, k))
        ws = [rng.random() + 0.05 for _ in ids]
        out.append((ids, [w / sum(ws) for w in ws]))
    return out


def build_libraries(work: Path, model_dir: Path, k: int, distinct: int,
                    seed: int = 0) -> dict[str, Path]:
    """K random rank-16 experts, and the same with one shared A per module (shared_a).

    Only `distinct` experts are drawn; expert j's files are hard links to expert
    j mod distinct's (a rank-16 SmolLM2 expert is 19.5 MB in fp32: K = 1024 distinct would be
    20 GB per library). Decode cost does not depend on what experts hold, only on how many
    distinct ones a batch touches, which the routings fix; admission then reads from the page
    cache, which the report says. Each library is opened with its checksums verified, as
    `ttmm serve` does at start, so admission reads verified experts (no hashing)."""
    import dataclasses
    import os

    import numpy as np

    from ttmm_vllm.library import Library, expert_dirname
    from ttmm_vllm.testing import write_random_library

    out = {}
    for name, shared in (("plain", False), ("shared", True)):
        root = work / f"k{k}-{name}"
        cent = np.random.default_rng(seed).normal(size=(k, 8))
        write_random_library(root, model_dir, cent[: min(k, distinct)], rank=RANK, seed=seed,
                             shared_a=shared)
        if k > distinct:
            lib = Library.open(root, verify_checksums=False)
            experts = list(lib.manifest.experts)
            for j in range(distinct, k):
                src, dst = root / expert_dirname(j % distinct), root / expert_dirname(j)
                dst.mkdir(parents=True)
                for f in src.iterdir():
                    os.link(f, dst / f.name)
                experts.append(dataclasses.replace(experts[j % distinct], id=j,
                                                   file=expert_dirname(j),
                                                   title=f"random-{j}"))
            from ttmm_vllm.library import write_library

            write_library(root, dataclasses.replace(lib.manifest, experts=tuple(experts)),
                          np.asarray(cent, np.float32) / np.linalg.norm(cent, axis=1)[:, None])
        Library.open(root)  # verified as `ttmm serve` verifies at start (checksums remembered)
        out[name] = root
    return out


async def timed_generate(llm, prompt: list[int], new_tokens: int, lora) -> list[float]:
    """Timestamps (perf_counter) of each generated token of one request."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    stamps: list[float] = []
    async for out in llm.generate({"prompt_token_ids": prompt}, params, uuid.uuid4().hex,
                                  lora_request=lora):
        now = time.perf_counter()
        stamps += [now] * len(out.outputs[0].token_ids)
    return stamps


async def measure(llm, prompts, loras, new_tokens: int) -> dict[str, float]:
    """Decode/prefill/total tokens per second of one batch of concurrent requests."""
    await asyncio.gather(*(timed_generate(llm, prompts[i], 2, loras[i]) for i in range(4)))
    t0 = time.perf_counter()
    stamps = await asyncio.gather(*(timed_generate(llm, p, new_tokens, lora)
                                    for p, lora in zip(prompts, loras, strict=True)))
    end = time.perf_counter()
    first = max(s[0] for s in stamps)  # every request is decoding from here on
    decode = sum(1 for s in stamps for t in s if t > first)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"decode_tok_s": decode / max(end - first, 1e-9),
            "prefill_tok_s": prompt_tokens / max(first - t0, 1e-9),
            "total_tok_s": sum(len(s) for s in stamps) / (end - t0)}


async def admit_all(llm, rts, lib: Path, strategy: str, first_id: int) -> tuple[list, list]:
    """Register one routing adapter per routing (ids first_id + 1, ...): (ms each, requests)."""
    from ttmm_vllm.vllm_plugin.config import routing_request

    times, reqs = [], []
    for i, (ids, ws) in enumerate(rts, start=first_id + 1):
        req = routing_request(i, str(lib), ids, ws, strategy=strategy)
        t0 = time.perf_counter()
        await llm.add_lora(req)  # the worker builds the merge now
        times.append((time.perf_counter() - t0) * 1e3)
        reqs.append(req)
    return times, reqs


def step_ms(base_runs: list[dict[str, float]], requests: int) -> float:
    """The base's decode step time (median over runs): one token for every request in flight."""
    return 1e3 * requests / statistics.median(r["decode_tok_s"] for r in base_runs)


def worker_rss_gb() -> float:
    """Resident memory of the largest vLLM worker (the plugin engine's: it holds the experts)."""
    import psutil

    workers = [c for core in psutil.Process().children() for c in core.children()]
    return max((w.memory_info().rss for w in workers), default=float("nan")) / 1e9


async def run_scale(args, model_dir: Path, work: Path, w) -> list[ScaleRow]:
    from transformers import AutoConfig

    from benchmarks.engines import EngineSpec, start_engine
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.serving_path import choose

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(w.seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(w.prompt_tokens)]
               for _ in range(w.requests)]
    base = start_engine(model_dir, EngineSpec(lora=False, plugin=False), None, args.kv_bytes)
    plugin = start_engine(model_dir, EngineSpec(max_loras=w.requests, max_lora_rank=RANK,
                                                max_cpu_loras=2 * w.requests), None,
                          args.kv_bytes)
    rows: list[ScaleRow] = []
    next_id = 0
    try:
        for k in args.library_size:
            t0 = time.perf_counter()
            libs = build_libraries(work / "libraries", model_dir, k, args.distinct_experts)
            print(f"K={k}: libraries written in {time.perf_counter() - t0:.0f} s", flush=True)
            first = await measure(base, prompts, [None] * w.requests, w.new_tokens)  # warm
            print(f"  base: decode {first['decode_tok_s']:.1f} tok/s", flush=True)
            base_runs = []  # the rounds' (a base run paired with each path run)
            rts = routings(k, w.requests, w.seed)
            path_rows = []
            for path in PATHS:
                if path == "mix" and k * RANK > args.mix_max_rank:
                    print(f"  mix: skipped (its resident bank would hold {k} x {RANK} ranks "
                          f"of every layer; --mix-max-rank {args.mix_max_rank})", flush=True)
                    continue
                lib = libs["shared" if path.startswith("shared") else "plain"]
                strategy = "mix" if path == "mix" else "expand"
                # Twice: cold (the worker reads and checksums each expert on its first use),
                # then the same routings again as new adapters: steady state (experts verified,
                # and cached while the LRU holds them).
                cold, loras = await admit_all(plugin, rts, lib, strategy, next_id)
                next_id += len(rts)
                for req in loras:
                    await plugin.remove_lora(req.lora_int_id)
                admit, loras = await admit_all(plugin, rts, lib, strategy, next_id)
                next_id += len(rts)
                admit_ms = statistics.median(admit)
                cold_ms = statistics.median(cold[1:] or cold)  # the first loads the bank
                info = await plugin.collective_rpc("ttmm_adapter_info", args=(next_id,))
                # Paired rounds, base then path, back to back: the ratio is the median of the
                # rounds' ratios, so drift on a shared machine cancels within a pair.
                runs, ratios, totals = [], [], []
                for _ in range(args.repeats):
                    b = await measure(base, prompts, [None] * w.requests, w.new_tokens)
                    base_runs.append(b)
                    m = await measure(plugin, prompts, loras, w.new_tokens)
                    runs.append(m)
                    ratios.append(m["decode_tok_s"] / b["decode_tok_s"])
                    totals.append(m["total_tok_s"] / b["total_tok_s"])
                m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                row = ScaleRow(path, k, **m, admission_ms=admit_ms,
                               admission_base_tokens=admit_ms / step_ms(
                                   base_runs[-args.repeats:], w.requests),
                               worker_rss_gb=worker_rss_gb(),
                               decode_ratio=statistics.median(ratios),
                               total_ratio=statistics.median(totals),
                               admission_cold_ms=cold_ms,
                               extra={"built": info[0] if info else None,
                                      "decode_ratios": ratios})
                path_rows.append(row)
                print(f"  {path}: decode {m['decode_tok_s']:.1f} tok/s ({row.decode_ratio:.2f}x,"
                      f" rounds {', '.join(f'{x:.2f}' for x in ratios)}), admission "
                      f"{admit_ms:.1f} ms ({row.admission_base_tokens:.2f} base tokens; cold "
                      f"{cold_ms:.1f} ms), "
                      f"worker {row.worker_rss_gb:.1f} GB", flush=True)
                for req in loras:
                    await plugin.remove_lora(req.lora_int_id)
            b = {key: statistics.median(r[key] for r in base_runs) for key in base_runs[0]}
            rows.append(ScaleRow("base", k, **b, decode_ratio=1.0, total_ratio=1.0,
                                 extra={"rounds": len(base_runs)}))
            rows += path_rows
            defaults = EngineConfig()
            for shared, label in ((False, "default"), (True, "default, shared-A library")):
                picked = choose(requested=defaults.worker_merge, shared_a=shared,
                                num_experts=k, expert_rank=RANK,
                                rank_budget=defaults.rank_budget, on_cpu=True)
                name = ("shared-A expand" if shared else picked.worker_merge)
                src = next((r for r in rows if r.library_size == k and r.path == name), None)
                if src is not None:
                    rows.append(ScaleRow(**dict(asdict(src), path=label, resolved=src.path,
                                                extra={"why": picked.why})))
            for lib in libs.values():
                await plugin.collective_rpc("ttmm_forget_library", args=(str(lib),))
    finally:
        base.shutdown()
        plugin.shutdown()
        await asyncio.sleep(1.0)
    return rows


def write_scale_report(out: Path, rows: list[ScaleRow], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(
        {"config": config, "rows": [asdict(r) for r in rows]}, indent=2))
    lines = ["| library size K | path | decode tok/s | decode ratio | total ratio | "
             "admission ms | admission (base tokens) | admission, cold ms | worker GB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        path = f"{r.path} (= {r.resolved})" if r.path.startswith("default") else r.path
        lines.append(f"| {r.library_size} | {path} | {r.decode_tok_s:.1f} | "
                     f"{r.decode_ratio:.2f} | {r.total_ratio:.2f} | {r.admission_ms:.1f} | "
                     f"{r.admission_base_tokens:.2f} | {r.admission_cold_ms:.1f} | "
                     f"{r.worker_rss_gb:.1f} |")
    w = config["workload"]
    (out / "scale.md").write_text(
        f"# Decode throughput against library size ({config['model_name']})\n\n"
        f"`{config['command']}`\n\n{w['requests']} concurrent requests, each its own routing "
        f"of {ACTIVE} random rank-{RANK} experts, {w['new_tokens']} new tokens after "
        f"{w['prompt_tokens']}-token prompts; fp32, {config['cpus']} CPUs, thread layout "
        f"{config.get('cpu_layout')}. Ratios to the base model (LoRA disabled): the median "
        f"of {config.get('repeats', 1)} paired rounds (base then path, back to back) per row; "
        "tok/s columns are medians of the rounds. Admission: the median time to build one "
        "request's adapter in the worker, and that over the base's step time (one token for "
        "every request in flight), in steady state: the same routings registered a second "
        "time, so every expert has been read and checksummed once (cold: their first use, "
        "which `ttmm serve`'s worker pays once per expert).\n\n"
        + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path in (*PATHS, "default"):
        pts = sorted((r.library_size, r.decode_ratio) for r in rows if r.path == path)
        if pts:
            style = dict(lw=3, color="k", alpha=0.35) if path == "default" else {}  # plain lib
            ax.plot(*zip(*pts, strict=True), marker="o", label=path, **style)
    ax.axhline(0.7, color="k", lw=0.6, ls="--")
    ax.axhline(0.8, color="k", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("library size K (experts)")
    ax.set_ylabel("decode tokens/s, ratio to base")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{config['model_name']}: {w['requests']} requests x {ACTIVE} active experts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)
