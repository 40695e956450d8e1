"""LoRA serving throughput on vLLM-CPU: vLLM's stock ops vs the ttmm plugin (issue 6, item 3).

Side by side in one run, 32 concurrent requests per row (random prompts, greedy, fixed length):

    base, LoRA disabled                                   <- every ratio is to this row
    LoRA enabled, no adapter                              stock | plugin
    one static rank-16 adapter for all requests           stock | plugin
    each request its own merge of n = 1, 3, 10 experts:
        disk: the exact rank-expanded merge written as a PEFT folder
                                                          stock | plugin (grouped op)
        in-worker "expand": built from resident experts   plugin
        in-worker "mix": resident experts mixed per token plugin

Experts are random rank-16 LoRAs on the model's shapes (throughput does not depend on what
they learned), K = 16 in one library; each request's routing is n random experts with random
weights. Engines are grouped by the settings a row needs (`ENGINES`); `max_lora_rank` is the
smallest vLLM accepts for the rows' merged rank, since the stock op's cost grows with it.

    .venv/bin/python -m benchmarks.lora_throughput            # SmolLM2-135M (~10 min)
    .venv/bin/python -m benchmarks.lora_throughput --smoke    # tiny model, ~3 min

Writes results.json (config + rows), results.md (the table) and throughput.png into
--out (default benchmarks/results/lora_throughput[-smoke]).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.engines import EngineSpec, start_engine
from ttmm_vllm.home import offline_env

DEFAULT_MODEL = Path("~/.cache/ttmm/models/SmolLM2-135M-Instruct").expanduser()
NUM_EXPERTS = 16
RANK = 16


@dataclass(frozen=True)
class Row:
    name: str
    engine: str  # key of ENGINES
    kind: str  # "none" | "static" | "disk" | "expand" | "mix"
    active: int = 0  # experts merged per request


# Rank-expanded merges of 10 rank-16 experts need max_lora_rank 256: vLLM keeps every slot's
# buffers at that rank (about 312 MB per slot on SmolLM2-135M, fp32), so those engines get 8
# slots (vLLM then runs at most 8 distinct adapters per step) and keep 8 adapters in memory.
ENGINES = {
    "base": EngineSpec(lora=False, plugin=False),
    "stock-r16": EngineSpec(plugin=False),
    "stock-r64": EngineSpec(plugin=False, max_lora_rank=64),
    "stock-r256": EngineSpec(plugin=False, max_loras=8, max_lora_rank=256, max_cpu_loras=8),
    "plugin-r16": EngineSpec(),
    "plugin-r64": EngineSpec(max_lora_rank=64),
    "plugin-r256": EngineSpec(max_loras=8, max_lora_rank=256, max_cpu_loras=8),
}
ROWS = [
    Row("base, LoRA disabled", "base", "none"),
    Row("stock: LoRA on, no adapter", "stock-r16", "none"),
    Row("stock: static rank-16 adapter", "stock-r16", "static"),
    Row("stock: 32 x disk merge of 1", "stock-r16", "disk", 1),
    Row("stock: 32 x disk merge of 3", "stock-r64", "disk", 3),
    Row("stock: 32 x disk merge of 10", "stock-r256", "disk", 10),
    Row("plugin: LoRA on, no adapter", "plugin-r16", "none"),
    Row("plugin: static rank-16 adapter", "plugin-r16", "static"),
    Row("plugin: 32 x disk merge of 1", "plugin-r16", "disk", 1),
    Row("plugin: 32 x expand of 1", "plugin-r16", "expand", 1),
    Row("plugin: 32 x mix of 1", "plugin-r16", "mix", 1),
    Row("plugin: 32 x mix of 3", "plugin-r16", "mix", 3),
    Row("plugin: 32 x mix of 10", "plugin-r16", "mix", 10),
    Row("plugin: 32 x disk merge of 3", "plugin-r64", "disk", 3),
    Row("plugin: 32 x expand of 3", "plugin-r64", "expand", 3),
    Row("plugin: 32 x disk merge of 10", "plugin-r256", "disk", 10),
    Row("plugin: 32 x expand of 10", "plugin-r256", "expand", 10),
]


@dataclass
class Workload:
    requests: int = 32
    prompt_tokens: int = 64
    new_tokens: int = 32
    seed: int = 0


@dataclass
class Result:
    row: Row
    output_tokens: int
    wall_s: float
    tok_per_s: float
    p50_ms: float
    p99_ms: float
    prep_s: float  # registering the row's adapters (disk: + merge and write)
    ratio: float = float("nan")
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def build_library(root: Path, model_dir: Path, seed: int = 0) -> Path:
    """K random rank-16 experts on the model's seven projections, as a ttmm library."""
    import numpy as np

    from ttmm_vllm.testing import write_random_library

    rng = np.random.default_rng(seed)
    return write_random_library(root, model_dir, rng.normal(size=(NUM_EXPERTS, 8)), rank=RANK,
                                seed=seed)


def routings(n: int, count: int, seed: int) -> list[tuple[list[int], list[float]]]:
    """`count` routings of n random experts with random weights summing to 1."""
    rng = random.Random(seed * 1000 + n)
    out = []
    for _ in range(count):
        ids = sorted(rng.sample(range(NUM_EXPERTS), n))
        ws = [rng.random() + 0.05 for _ in ids]
        out.append((ids, [w / sum(ws) for w in ws]))
    return out


def write_disk_merges(lib_root: Path, out: Path, rts) -> tuple[list[str], float]:
    """The exact rank-expanded merge of each routing as a PEFT folder; (paths, seconds)."""
    from ttmm_vllm.library import Library, write_adapter
    from ttmm_vllm.merge import merge_experts

    lib = Library.open(lib_root, verify_checksums=False)
    cache = {}
    paths, t0 = [], time.perf_counter()
    for j, (ids, ws) in enumerate(rts):
        experts = [cache.setdefault(i, lib.read_expert(i)) for i in ids]
        merged = merge_experts(experts, ws)
        path = out / f"merge-{len(ids)}-{j}"
        write_adapter(path, merged.modules, rank=merged.rank, alpha=merged.alpha)
        paths.append(str(path))
    return paths, time.perf_counter() - t0


# --------------------------------------------------------------------------- engine


async def generate(llm, prompt: list[int], new_tokens: int, lora) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    t0 = time.perf_counter()
    final = None
    async for out in llm.generate({"prompt_token_ids": prompt}, params, uuid.uuid4().hex,
                                  lora_request=lora):
        final = out
    return len(final.outputs[0].token_ids), time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_row(llm, row: Row, prompts, loras, w: Workload, prep_s: float,
                  profile_dir: Path | None = None) -> Result:
    t0 = time.perf_counter()
    for lora in {id(x): x for x in loras if x is not None}.values():
        await llm.add_lora(lora)  # loads now (disk: file read; in-worker: from the bank)
    prep_s += time.perf_counter() - t0
    # Warm-up: a few short requests with the row's first adapters.
    await asyncio.gather(*(generate(llm, prompts[i], 2, loras[i]) for i in range(4)))
    slug = "".join(c if c.isalnum() else "-" for c in row.name)
    profiler = Profiler(profile_dir, slug) if profile_dir else contextlib.nullcontext()
    with profiler:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(generate(llm, p, w.new_tokens, lora)
                                      for p, lora in zip(prompts, loras, strict=True)))
        wall = time.perf_counter() - t0
    toks = sum(n for n, _ in outs)
    lat = [s * 1e3 for _, s in outs]
    return Result(row, toks, wall, toks / wall, percentile(lat, 0.5), percentile(lat, 0.99),
                  prep_s)


def loras_for(row: Row, lib_root: Path, w: Workload, disk: dict, next_id: list[int]):
    """One LoRARequest per request (None: base), and the seconds spent preparing them."""
    from vllm.lora.request import LoRARequest

    from ttmm_vllm.vllm_plugin.config import routing_request

    def new_id() -> int:
        next_id[0] += 1
        return next_id[0]

    if row.kind == "none":
        return [None] * w.requests, 0.0
    if row.kind == "static":
        lora = LoRARequest("static-expert-0", new_id(), str(lib_root / "experts/0000"))
        return [lora] * w.requests, 0.0
    rts = routings(row.active, w.requests, w.seed)
    if row.kind == "disk":
        paths, secs = disk[row.active]
        return [LoRARequest(f"disk-{row.active}-{j}-{uuid.uuid4().hex[:6]}", new_id(), p)
                for j, p in enumerate(paths)], secs
    return [routing_request(new_id(), str(lib_root), ids, ws, strategy=row.kind)
            for ids, ws in rts], 0.0


# --------------------------------------------------------------------------- profile

# Python frames whose inclusive share of the worker's samples says where a step's time goes.
PROFILE_FRAMES = {
    "model forward": "forward (vllm/model_executor/models/llama.py",
    "LoRA layers (base + LoRA)": "_apply_lora_to_output",
    "base projections": "apply (vllm/model_executor/layers/linear.py",
    "plugin add_lora_linear": "add_lora_linear (ttmm_vllm",
    "  mix op": "mix_lora_linear",
    "  grouped op": "grouped_lora_linear",
    "stock add_lora_linear": "add_lora_linear (vllm/lora/punica_wrapper/punica_cpu.py",
    "LoRA metadata (update_metadata)": "update_metadata",
    "adapter loading (_load_adapter)": "_load_adapter",
    "attention": "forward (vllm/model_executor/layers/attention",
    "sampling": "sample (vllm/v1/sample/sampler.py",
}


def worker_pid() -> int | None:
    """vLLM's worker: a child of the EngineCore process, itself our child."""
    import psutil

    me = psutil.Process()
    for core in me.children():
        for child in core.children():
            return child.pid
    return None


class Profiler:
    """py-spy on the worker while one row runs; summarised into shares of the samples."""

    def __init__(self, out: Path, name: str):
        self.out, self.name, self.proc = out, name, None

    def __enter__(self):
        import subprocess

        pid = worker_pid()
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw = self.out / f"profile-{self.name}.txt"
        if pid is not None:
            self.proc = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
                 "--output", str(self.raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        import signal

        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        print(summarise_profile(self.raw))

    def __bool__(self) -> bool:
        return self.proc is not None


def summarise_profile(raw: Path) -> str:
    """Inclusive share of the worker's samples in each of PROFILE_FRAMES (collapsed stacks)."""
    total, hits = 0, dict.fromkeys(PROFILE_FRAMES, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for label, needle in PROFILE_FRAMES.items():
            if needle in stack:
                hits[label] += int(count)
    busy = sum(int(line.rpartition(" ")[2]) for line in raw.read_text().splitlines()
               if "execute_model" in line)
    lines = [f"profile {raw.name}: {total} samples, {busy / max(total, 1):.0%} in execute_model",
             "| where | share of samples |", "| --- | ---: |"]
    lines += [f"| {k} | {v / max(total, 1):.1%} |" for k, v in hits.items() if v]
    text = "\n".join(lines)
    raw.with_suffix(".md").write_text(text + "\n")
    return text


# --------------------------------------------------------------------------- report


def write_report(out: Path, results: list[Result], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = next((r.tok_per_s for r in results if r.row.engine == "base"), float("nan"))
    for r in results:
        r.ratio = r.tok_per_s / base
    rows = [dict(asdict(r), **{"row": asdict(r.row)}) for r in results]
    (out / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    lines = [
        "| setting | engine | output tok/s | ratio to base | p50 ms | p99 ms | prep s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.row.name} | {r.row.engine} | {r.tok_per_s:.1f} | {r.ratio:.2f} | "
                     f"{r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.prep_s:.2f} |")
    cmd = config["command"]
    (out / "results.md").write_text(
        f"# LoRA throughput ({config['model_name']})\n\n`{cmd}`\n\n"
        f"{config['workload']['requests']} concurrent requests x "
        f"{config['workload']['new_tokens']} new tokens, prompts of "
        f"{config['workload']['prompt_tokens']} tokens; fp32, enforce_eager; "
        f"{config['cpus']} CPUs.\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.38 * len(results) + 1.2))
    names = [r.row.name for r in results][::-1]
    ratios = [r.ratio for r in results][::-1]
    colors = ["#888888" if r.row.engine == "base" else
              "#d62728" if r.row.engine.startswith("stock") else "#1f77b4"
              for r in results][::-1]
    ax.barh(names, ratios, color=colors)
    for target in (0.8, 0.97):
        ax.axvline(target, color="k", lw=0.6, ls="--")
    ax.set_xlabel("output tokens/s, ratio to base with LoRA disabled")
    ax.set_title(f"{config['model_name']}: stock (red) vs ttmm plugin (blue)")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)


# --------------------------------------------------------------------------- main


async def amain(args) -> None:
    w = Workload(new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens)
    work = Path(tempfile.mkdtemp(prefix="ttmm-bench-", dir=args.scratch))
    try:
        if args.smoke:
            from ttmm_vllm.testing import (
                build_tiny_llama,  # the tests' tiny model, built in seconds
            )

            model_dir = build_tiny_llama(work / "tiny-llama")
        else:
            model_dir = Path(args.model).expanduser()
        if args.library_size:
            from benchmarks.lora_scale import run_scale, write_scale_report

            rows = await run_scale(args, model_dir, work, w)
            write_scale_report(Path(args.out), rows, run_config(args, model_dir, w))
            print((Path(args.out) / "scale.md").read_text())
            return
        lib_root = build_library(work / "library", model_dir)
        rows = [r for r in ROWS if not args.rows or any(s in r.name for s in args.rows)]
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        rng = random.Random(w.seed)
        prompts = [[rng.randrange(3, vocab) for _ in range(w.prompt_tokens)]
                   for _ in range(w.requests)]
        disk = {}
        for n in sorted({r.active for r in rows if r.kind == "disk"}):
            disk[n] = write_disk_merges(lib_root, work / "merges",
                                        routings(n, w.requests, w.seed))
            print(f"wrote {w.requests} disk merges of {n}: {disk[n][1]:.1f} s", flush=True)
        results, next_id = [], [0]
        for engine_name in dict.fromkeys(r.engine for r in rows):
            spec = ENGINES[engine_name]
            t0 = time.perf_counter()
            llm = start_engine(model_dir, spec, lib_root, args.kv_bytes)
            print(f"engine {engine_name}: started in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            try:
                await asyncio.gather(*(generate(llm, p, 4, None) for p in prompts[:4]))
                for row in (r for r in rows if r.engine == engine_name):
                    loras, prep = loras_for(row, lib_root, w, disk, next_id)
                    profile = Path(args.out) if any(x in row.name for x in args.profile) \
                        else None
                    res = await run_row(llm, row, prompts, loras, w, prep, profile)
                    results.append(res)
                    print(f"  {row.name}: {res.tok_per_s:.1f} tok/s, p50 {res.p50_ms:.0f} ms, "
                          f"p99 {res.p99_ms:.0f} ms, prep {res.prep_s:.1f} s", flush=True)
            finally:
                llm.shutdown()
                await asyncio.sleep(1.0)
        config = dict(run_config(args, model_dir, w), engines={
            k: asdict(v) for k, v in ENGINES.items()}, experts={
            "library_size": NUM_EXPERTS, "rank": RANK})
        write_report(Path(args.out), results, config)
        print((Path(args.out) / "results.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_config(args, model_dir: Path, w: Workload) -> dict:
    """What a results file records about its run."""
    import torch
    import vllm

    return {
        "command": "python -m benchmarks.lora_throughput " + " ".join(args.argv),
        "model": str(model_dir), "model_name": "tiny-llama" if args.smoke else
        Path(model_dir).name, "workload": asdict(w),
        "vllm": vllm.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_layout": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND",
                                                   "VLLM_CPU_NUM_OF_RESERVED_CPU")
                       if k in os.environ} or "vLLM's defaults",
        "repeats": args.repeats,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a Llama-architecture folder")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny model, few tokens")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--rows", nargs="*", default=[],
                   help="run only rows whose name contains one of these strings")
    p.add_argument("--out", default=None)
    p.add_argument("--scratch", default=None, help="where merges are written (default /tmp)")
    p.add_argument("--kv-bytes", type=int, default=256 << 20)
    p.add_argument("--library-size", nargs="*", type=int, default=[],
                   help="instead of the rows above: decode throughput against library size "
                   "(benchmarks/lora_scale.py), e.g. --library-size 16 64 256")
    p.add_argument("--distinct-experts", type=int, default=256,
                   help="with --library-size: experts drawn at random; larger libraries reuse "
                   "their files by hard links (default: %(default)s)")
    p.add_argument("--mix-max-rank", type=int, default=4096,
                   help="with --library-size: skip 'mix' when K x rank exceeds this (its bank "
                   "holds every expert; default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="with --library-size: paired (base, path) rounds per path; the ratio "
                   "is their median (default: %(default)s)")
    p.add_argument("--cpu-layout", choices=("serve", "vllm"), default="serve",
                   help="the worker's thread layout: 'serve' applies what `ttmm serve` picks "
                   "for this machine (serve/cpu_layout.py), 'vllm' leaves vLLM's default")
    p.add_argument("--profile", nargs="*", default=[],
                   help="py-spy the worker during rows whose name contains one of these "
                        "(timings of those rows include the sampler's overhead)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.new_tokens is None:
        args.new_tokens = 8 if args.smoke else 32
    if args.prompt_tokens is None:
        args.prompt_tokens = 16 if args.smoke else 64
    if args.out is None:
        args.out = f"benchmarks/results/lora_throughput{'-smoke' if args.smoke else ''}"
    offline_env()
    if args.cpu_layout == "serve":  # what `ttmm serve` runs with, so "default" rows are its
        from ttmm_vllm.serve.cpu_layout import apply_cpu_layout

        apply_cpu_layout()
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
