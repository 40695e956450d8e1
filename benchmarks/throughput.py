"""Throughput: tokens/s and latency through the gRPC server with C concurrent clients, TTMM
against the base model, one static adapter, ensembling and TTT (the paper's Figure 4, left).

Each client sends its next request when the previous one returns (a closed loop), greedy,
`--max-tokens` new tokens; prompts are distinct holdout prefixes of the library's query length
(distinct prompts route differently, as real traffic would). Rows (`MODES`):

- base: no adapter.
- static adapter: one expert named explicitly (weight 1) for every request: what a server of
  one fine-tuned adapter (or multitask fine-tuning) costs.
- TTMM: the library's default routing: embed, search, merge per request.
- ensembling (10): the product has no ensembling path, so each prompt is served as 10
  concurrent single-expert requests (its 10 routed experts): the 10 forward passes an ensemble
  needs, without the per-token mixing and synchronisation a real one would add (a lower bound
  of its cost). Its tokens are counted once per prompt; its latency is the slowest of the 10.
- TTT: no serving path either. Modelled from measured parts: each request first trains its
  own LoRA (retrieval + N gradient steps, measured on the reference implementation in this
  run, model load excluded), then generates like the static-adapter row. On this 2-core
  machine trainings cannot overlap, so C clients' trainings run one after another:
  tokens/s = tokens / (requests x train + static wall), latency = C x train + static latency.

    python -m benchmarks.throughput --library ~/.cache/ttmm/libraries/wiki-k16 --concurrency 1 8 32
    python -m benchmarks.throughput --smoke
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import BenchLibrary, log


@dataclass(frozen=True)
class Mode:
    key: str
    name: str
    how: str  # "served" (measured through the server) or "modelled"


MODES = [Mode("base", "base model", "served"),
         Mode("static", "one static adapter", "served"),
         Mode("ttmm", "TTMM (library defaults)", "served"),
         Mode("ens10", "ensembling (10), as 10 requests", "served"),
         Mode("ttt", "TTT (modelled: train + static)", "modelled")]


def closed_loop(concurrency: int, prompts: list[str], request: Callable[[str], tuple[float, int]]
                ) -> dict[str, Any]:
    """C threads, each sending its next prompt when its last request is done."""
    work: queue.Queue[str] = queue.Queue()
    for p in prompts:
        work.put(p)
    lat: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                p = work.get_nowait()
            except queue.Empty:
                return
            try:
                seconds, n = request(p)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                return
            with lock:
                lat.append(seconds)
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"requests": len(lat), "tokens": int(sum(tokens)), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "latency_p50_s": common.percentile(lat, 50),
            "latency_p99_s": common.percentile(lat, 99), "latencies_s": lat}


def requester(mode: str, client, max_tokens: int, static_expert: int, pool: ThreadPoolExecutor
              ) -> Callable[[str], tuple[float, int]]:
    from ttmm_vllm.client import routing_options

    def timed(prompt: str, routing) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.generate(prompt, max_tokens=max_tokens, temperature=0.0, routing=routing)
        return time.perf_counter() - t0, r.completion_tokens

    if mode == "base":
        return lambda p: timed(p, routing_options("base"))
    if mode == "static":
        return lambda p: timed(p, routing_options(experts=[static_expert], expert_weights=[1.0]))
    if mode == "ttmm":
        return lambda p: timed(p, routing_options("ttmm"))

    def ensemble(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.route(prompt, routing_options("ttmm", max_active=10, tau=0.0))
        experts = [e.expert_id for e in r.routing.experts]
        futures = [pool.submit(client.generate, prompt, max_tokens=max_tokens, temperature=0.0,
                               routing=routing_options(experts=[e], expert_weights=[1.0]))
                   for e in experts]
        n = [f.result().completion_tokens for f in futures]
        return time.perf_counter() - t0, int(round(float(np.mean(n))))

    return ensemble


def measure(bench: BenchLibrary, args: argparse.Namespace, prompts: list[str]) -> list[dict]:
    from ttmm_vllm.serve.engine_api import EngineConfig

    engine = EngineConfig(merge_path=args.merge_path,
                          max_model_len=bench.query_tokens + args.max_tokens + 16,
                          max_num_seqs=args.max_num_seqs, max_loras=32, idle_adapters=32,
                          kv_cache_bytes=args.kv_cache_mb << 20, enable_prefix_caching=False,
                          seed=args.seed)
    static = bench.manifest.active_experts[0].id
    results = []
    cursor = 0
    served_modes = [m for m in MODES if m.how == "served" and m.key in args.modes]
    with common.serve(bench, engine) as served, \
            ThreadPoolExecutor(10 * max(args.concurrency)) as pool:
        client = served.client()
        for m in served_modes:  # warm-up: every path once, not counted
            closed_loop(2, prompts[cursor:cursor + 2],
                        requester(m.key, client, args.max_tokens, static, pool))
            cursor += 2
        for c in args.concurrency:
            for m in served_modes:
                n = max(args.min_requests, args.requests_per_client * c)
                if m.key == "ens10":
                    n = max(2, min(n, args.ensemble_prompts_per_client * c))
                batch = [prompts[(cursor + i) % len(prompts)] for i in range(n)]
                cursor += n
                r = closed_loop(c, batch, requester(m.key, client, args.max_tokens, static,
                                                    pool))
                results.append({"mode": m.key, "name": m.name, "how": m.how,
                                "concurrency": c, **r})
                log(f"C={c} {m.key}: {r['tokens_per_s']:.1f} tok/s, p50 "
                    f"{r['latency_p50_s']:.2f}s, p99 {r['latency_p99_s']:.2f}s "
                    f"({r['requests']} requests)")
        client.close()
    return results


def model_ttt(results: list[dict], train_s: float) -> list[dict]:
    """TTT rows from the static-adapter rows and the measured per-prompt training time."""
    out = []
    for r in results:
        if r["mode"] != "static":
            continue
        c, n = r["concurrency"], r["requests"]
        wall = n * train_s + r["wall_s"]
        out.append({"mode": "ttt", "name": MODES[-1].name, "how": "modelled", "concurrency": c,
                    "requests": n, "tokens": r["tokens"], "wall_s": wall,
                    "tokens_per_s": r["tokens"] / wall,
                    "latency_p50_s": c * train_s + r["latency_p50_s"],
                    "latency_p99_s": c * train_s + r["latency_p99_s"], "train_s": train_s})
    return out


def write_report(out: Path, rows: list[dict], config: dict, bench: BenchLibrary) -> None:
    base = {r["concurrency"]: r for r in rows if r["mode"] == "base"}
    for r in rows:
        b = base.get(r["concurrency"])
        r["ratio_to_base"] = r["tokens_per_s"] / b["tokens_per_s"] if b else float("nan")
    order = {m.key: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["concurrency"], order[r["mode"]]))
    header = ["C", "mode", "requests", "tokens/s", "x base", "p50 latency (s)",
              "p99 latency (s)"]
    body = [[str(r["concurrency"]), r["name"], str(r["requests"]), r["tokens_per_s"],
             r["ratio_to_base"], r["latency_p50_s"], r["latency_p99_s"]] for r in rows]
    md = [f"# Throughput: {bench.root.name} (K = {bench.num_experts})\n",
          f"Through the gRPC server, C closed-loop clients, greedy, {config['max_tokens']} new "
          f"tokens, prompts of {bench.query_tokens} tokens, merge path {config['merge_path']}. "
          "Ensembling = 10 single-expert requests per prompt (no mixing: a lower bound of its "
          "cost). TTT is modelled: measured training time per prompt "
          f"({config.get('ttt_train_s', float('nan')):.2f} s, {config['ttt_neighbours']} "
          "steps) + the static-adapter row, trainings one at a time.\n",
          common.markdown_table(header, body)]
    (out / "results.md").write_text("\n".join(md))
    common.write_json(out / "results.json", {"benchmark": "throughput", "config": config,
                                             "environment": common.environment(),
                                             "library": str(bench.root), "rows": rows})
    plot(out, rows, bench.root.name)


def plot(out: Path, rows: list[dict], title: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in MODES:
        pts = [r for r in rows if r["mode"] == m.key]
        if not pts:
            continue
        cs = [r["concurrency"] for r in pts]
        style = "--" if m.how == "modelled" else "-"
        axes[0].plot(cs, [r["tokens_per_s"] for r in pts], style, marker="o", label=m.name)
        axes[1].plot(cs, [r["latency_p50_s"] for r in pts], style, marker="o", label=m.name)
    axes[0].set_ylabel("generated tokens/s")
    axes[1].set_ylabel("p50 latency per request (s)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    axes[0].set_title(f"Throughput: {title}")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", help="library directory")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=[m.key for m in MODES],
                   choices=[m.key for m in MODES])
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=16, help="requests per row, at least")
    p.add_argument("--ensemble-prompts-per-client", type=int, default=1,
                   help="ensembling prompts per client (each is 10 requests)")
    p.add_argument("--merge-path", choices=("worker", "disk"), default="worker")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    p.add_argument("--ttt-neighbours", type=int, default=16)
    p.add_argument("--ttt-prompts", type=int, default=2, help="prompts TTT training is timed on")
    p.add_argument("--ttt-train-s", type=float, default=None,
                   help="reuse a measured TTT time per prompt (s) instead of measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--embedder", default=None)
    common.add_run_args(p, "throughput")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = common.parse_run_args(parser(), argv)
    if args.smoke:
        args.concurrency = [1, 4]
        args.max_tokens = min(args.max_tokens, 8)
        args.min_requests = min(args.min_requests, 4)
        args.requests_per_client = 1
        args.ttt_neighbours = min(args.ttt_neighbours, 2)
        args.ttt_prompts = 1
        args.kv_cache_mb = min(args.kv_cache_mb, 64)
        args.max_num_seqs = min(args.max_num_seqs, 32)
    if not args.library:
        raise SystemExit("--library is required (or --smoke)")
    common.seed_everything(args.seed)
    t0 = time.perf_counter()
    bench = BenchLibrary.open(args.library, args.model_dir, args.embedder)
    out = common.results_dir(f"throughput-{bench.root.name}", args.out, args.smoke)
    need = 20 + sum(max(args.min_requests, args.requests_per_client * c) for c in
                    args.concurrency) * len(MODES)
    prompts = common.prompts(bench, min(need, 400), bench.query_tokens, seed=args.seed)
    log(f"throughput: {bench.root}, C = {args.concurrency}, modes {args.modes} -> {out}")
    rows = measure(bench, args, prompts)
    config = dict(vars(args)) | {"experts": bench.num_experts}
    if "ttt" in args.modes:
        train_s = args.ttt_train_s
        if train_s is None:
            from benchmarks.baselines import TTT, ttt_cost

            cost = ttt_cost(TTT(bench, args.ttt_neighbours, seed=args.seed),
                            prompts[: args.ttt_prompts])
            train_s = cost["overhead_s"]
        config["ttt_train_s"] = train_s
        rows += model_ttt(rows, train_s)
    config["seconds"] = time.perf_counter() - t0
    write_report(out, rows, config, bench)
    print((out / "results.md").read_text())
    log(f"throughput: wrote {out}/results.json, results.md, throughput.png")
    return out


if __name__ == "__main__":
    main()
