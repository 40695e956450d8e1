"""Overhead: what TTMM adds to one request before its first token (the paper's Figure 4,
middle), against what TTT adds (its N gradient steps; the paper: TTMM is ~125x cheaper).

For each merge path of the engine ("worker": the routing travels to vLLM's worker, which mixes
resident experts; "disk": the exact rank-expanded merge written as a PEFT folder and
registered) and for 1, 3, 10 and 30 active experts (capped at the library's K), `--requests`
requests through the real gRPC server, one at a time, each with its own experts and random
weights (so every request builds a new merged adapter: nothing is served from the adapter
cache), and one generated token. Each response carries its timings:

    route = embed (the prompt's first query tokens) + search (centroid index, weights)
    merge (disk path: the rank-expanded adapter, SVD-compressed above the rank budget)
    register (vLLM add_lora; on the worker path this is where the worker builds the mix)

A last row routes with the library's defaults (search over every centroid). The overhead is
also given in generated-token times: one token's decode time is measured in the same run, on
the same server (`--decode-tokens` tokens minus one, per token, median). TTT's overhead is
measured on the reference implementation (`benchmarks/baselines.py`) after the server stops.

    python -m benchmarks.overhead --library ~/.cache/ttmm/libraries/python-k32
    python -m benchmarks.overhead --smoke
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import BenchLibrary, log

STAGES = ("embed_ms", "search_ms", "merge_ms", "register_ms")


@dataclass(frozen=True)
class Row:
    """Requests with `active` explicit experts (random ids and weights), or, when active is
    None, the library's default routing of distinct prompts."""

    name: str
    active: int | None


def rows_for(active: list[int], k: int) -> list[Row]:
    out, seen = [], set()
    for n in active:
        m = min(n, k)
        if m in seen:
            continue
        seen.add(m)
        label = f"{m} expert" + ("s" if m > 1 else "")
        out.append(Row(label + (f" ({n} asked, K={k})" if m != n else ""), m))
    out.append(Row("routed (library defaults)", None))
    return out


def token_time(client, prompt: str, reps: int, tokens: int, routing) -> float:
    """Milliseconds per generated token: (generate(T + 1) - generate(1)) / T, median over reps
    (the server's generate_ms, which excludes routing and merging)."""
    per = []
    for _ in range(reps):
        one = client.generate(prompt, max_tokens=1, temperature=0.0, routing=routing)
        many = client.generate(prompt, max_tokens=tokens + 1, temperature=0.0, routing=routing)
        n = many.completion_tokens - 1
        if n > 0:
            per.append((many.timings.generate_ms - one.timings.generate_ms) / n)
    return float(np.median(per)) if per else float("nan")


def measure_path(bench: BenchLibrary, path: str, rows: list[Row], prompts: list[str],
                 args: argparse.Namespace) -> dict[str, Any]:
    from ttmm_vllm.client import routing_options
    from ttmm_vllm.serve.engine_api import EngineConfig

    k = bench.num_experts
    ids = [e.id for e in bench.manifest.active_experts]
    engine = EngineConfig(merge_path=path, max_model_len=bench.query_tokens + args.decode_tokens
                          + 16, max_num_seqs=8, max_loras=8, idle_adapters=8,
                          kv_cache_bytes=args.kv_cache_mb << 20, enable_prefix_caching=False,
                          seed=args.seed)
    rng = np.random.default_rng(args.seed)

    def explicit(n: int):
        chosen = rng.choice(ids, size=n, replace=False).tolist()
        return routing_options(experts=chosen, expert_weights=rng.dirichlet(np.ones(n)).tolist())

    result: dict[str, Any] = {"merge_path": path, "rows": []}
    with common.serve(bench, engine) as served:
        client = served.client()
        for p in prompts[:3]:  # warm-up: embedder, first adapters, vLLM's first steps
            client.generate(p, max_tokens=4, routing=routing_options("base"))
            client.generate(p, max_tokens=4, routing=explicit(min(3, k)))
        tenk = explicit(min(10, k))
        result["token_ms_base"] = token_time(client, prompts[0], args.token_reps,
                                             args.decode_tokens, routing_options("base"))
        result["token_ms_merged"] = token_time(client, prompts[0], args.token_reps,
                                               args.decode_tokens, tenk)
        log(f"{path}: one token {result['token_ms_base']:.1f} ms (base), "
            f"{result['token_ms_merged']:.1f} ms ({min(10, k)} experts merged)")
        cursor = 3
        for row in rows:
            stages = {s: [] for s in STAGES}
            overhead, ranks, errors, active = [], [], [], []
            for _ in range(args.requests):
                prompt = prompts[cursor % len(prompts)]
                cursor += 1
                routing = explicit(row.active) if row.active else routing_options("ttmm")
                r = client.generate(prompt, max_tokens=1, temperature=0.0, routing=routing)
                for s in STAGES:
                    stages[s].append(getattr(r.timings, s))
                overhead.append(sum(getattr(r.timings, s) for s in STAGES))
                ranks.append(r.routing.merged_rank)
                errors.append(r.routing.compression_error)
                active.append(len(r.routing.experts))
            res = {"name": row.name, "active": row.active, "requests": args.requests,
                   **{f"{s}_p50": common.percentile(v, 50) for s, v in stages.items()},
                   "overhead_ms_p50": common.percentile(overhead, 50),
                   "overhead_ms_p90": common.percentile(overhead, 90),
                   "overhead_tokens": common.percentile(overhead, 50) / result["token_ms_base"],
                   "merged_rank_p50": common.percentile(ranks, 50),
                   "compression_error_max": float(np.max(errors)),
                   "mean_active": float(np.mean(active)), "overhead_ms": overhead}
            result["rows"].append(res)
            log(f"{path} {row.name}: overhead p50 {res['overhead_ms_p50']:.1f} ms = "
                f"{res['overhead_tokens']:.2f} tokens")
        client.close()
    return result


def measure_ttt(bench: BenchLibrary, prompts: list[str], args: argparse.Namespace) -> dict:
    from benchmarks.baselines import TTT, ttt_cost

    ttt = TTT(bench, args.ttt_neighbours, seed=args.seed)
    cost = ttt_cost(ttt, prompts[: args.ttt_prompts])
    log(f"TTT: {cost['neighbours']} steps of {cost['step_ms']:.0f} ms + retrieval "
        f"{cost['retrieve_ms']:.1f} ms = {cost['overhead_s']:.2f} s per prompt "
        f"({cost['with_model_load_s']:.2f} s with the model load)")
    return cost


def write_report(out: Path, paths: list[dict], ttt: dict, config: dict, bench: BenchLibrary
                 ) -> dict:
    ref = next((r for p in paths if p["merge_path"] == "worker" for r in p["rows"]
                if r["active"] == min(10, bench.num_experts)), None)
    ref = ref or next(r for p in paths for r in p["rows"] if r["active"])
    ttt_ms = ttt["overhead_s"] * 1e3
    token_ms = paths[0]["token_ms_base"]
    summary = {"ttt_over_ttmm": ttt_ms / ref["overhead_ms_p50"],
               "ttt100_over_ttmm": ttt["overhead_100_steps_s"] * 1e3 / ref["overhead_ms_p50"],
               "ttmm_reference_row": f"{ref['name']}, {paths[0]['merge_path']}",
               "ttt_tokens": ttt_ms / token_ms}
    header = ["merge path", "active experts", "embed", "search", "merge", "register",
              "overhead p50 (ms)", "p90 (ms)", "in tokens", "merged rank"]
    body = []
    for p in paths:
        for r in p["rows"]:
            name = r["name"] if r["active"] else f"{r['name']}: {r['mean_active']:.1f} on average"
            body.append([p["merge_path"], name, r["embed_ms_p50"], r["search_ms_p50"],
                         r["merge_ms_p50"], r["register_ms_p50"], r["overhead_ms_p50"],
                         r["overhead_ms_p90"], r["overhead_tokens"], r["merged_rank_p50"]])
    md = [f"# Overhead: {bench.root.name} (K = {bench.num_experts}, rank "
          f"{bench.manifest.lora.rank})\n",
          f"Per request, median of {config['requests']} sequential requests per row, each with "
          "its own merged adapter (ms; 'in tokens' = overhead / one generated token of the "
          "base model on the same server).\n",
          common.markdown_table(header, body),
          "\nOne generated token (ms, median, measured in this run):\n",
          common.markdown_table(["merge path", "base", f"{min(10, bench.num_experts)} experts "
                                 "merged"], [[p["merge_path"], p["token_ms_base"],
                                              p["token_ms_merged"]] for p in paths]),
          f"\nTTT per prompt (reference implementation, {ttt['prompts']} prompts, median): "
          f"{ttt['neighbours']} gradient steps on the nearest training documents.\n",
          common.markdown_table(
              ["N", "retrieval (ms)", "one step (ms)", "overhead (s)", "with model load (s)",
               "in tokens", "TTT / TTMM", "N = 100 (s, extrapolated)", "TTT(100) / TTMM"],
              [[str(ttt["neighbours"]), ttt["retrieve_ms"], ttt["step_ms"], ttt["overhead_s"],
                ttt["with_model_load_s"], summary["ttt_tokens"],
                f"{summary['ttt_over_ttmm']:.0f}x", ttt["overhead_100_steps_s"],
                f"{summary['ttt100_over_ttmm']:.0f}x"]]),
          f"\nTTT / TTMM compares TTT's overhead (retrieval + N steps, no model load) with "
          f"TTMM's median overhead for {summary['ttmm_reference_row']} (the paper: ~125x with "
          "100 steps on Llama-3.2-1B).\n"]
    (out / "results.md").write_text("\n".join(md))
    common.write_json(out / "results.json", {"benchmark": "overhead", "config": config,
                                             "environment": common.environment(),
                                             "library": str(bench.root), "paths": paths,
                                             "ttt": ttt, "summary": summary})
    plot(out, paths, ttt, bench.root.name)
    return summary


def plot(out: Path, paths: list[dict], ttt: dict, title: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]  # stacked stages per row and path
    labels, bottoms = [], None
    bars = [(p["merge_path"], r) for p in paths for r in p["rows"]]
    labels = [f"{mp}\n{r['active'] or 'routed'}" for mp, r in bars]
    bottoms = np.zeros(len(bars))
    for s in STAGES:
        v = np.array([r[f"{s}_p50"] for _, r in bars])
        ax.bar(labels, v, bottom=bottoms, label=s.replace("_ms", ""))
        bottoms += v
    ax.set_ylabel("ms per request (median)")
    ax.set_title(f"TTMM overhead by stage: {title}")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    ax = axes[1]  # overhead vs active experts, TTT as a line
    for p in paths:
        pts = [(r["active"], r["overhead_ms_p50"]) for r in p["rows"] if r["active"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"TTMM, {p['merge_path']} merge")
    ax.axhline(ttt["overhead_s"] * 1e3, color="red", ls="--",
               label=f"TTT, {ttt['neighbours']} steps")
    ax.axhline(paths[0]["token_ms_base"], color="grey", ls=":", label="one generated token")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["active"] for p in paths for r in p["rows"] if r["active"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("active experts")
    ax.set_ylabel("ms per request (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", help="library directory")
    p.add_argument("--active", type=int, nargs="+", default=[1, 3, 10, 30],
                   help="active experts per request (capped at K)")
    p.add_argument("--paths", nargs="+", default=["worker", "disk"], choices=("worker", "disk"))
    p.add_argument("--requests", type=int, default=50, help="requests per row (>= 50)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens generated to time one token")
    p.add_argument("--token-reps", type=int, default=7)
    p.add_argument("--ttt-neighbours", type=int, default=16,
                   help="TTT gradient steps (nearest documents) per prompt")
    p.add_argument("--ttt-prompts", type=int, default=3, help="prompts TTT is timed on")
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--embedder", default=None)
    common.add_run_args(p, "overhead")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = common.parse_run_args(parser(), argv)
    if args.smoke:
        args.requests = min(args.requests, 5)
        args.decode_tokens = min(args.decode_tokens, 8)
        args.token_reps = min(args.token_reps, 2)
        args.ttt_neighbours = min(args.ttt_neighbours, 2)
        args.ttt_prompts = 1
        args.kv_cache_mb = min(args.kv_cache_mb, 64)
    if not args.library:
        raise SystemExit("--library is required (or --smoke)")
    common.seed_everything(args.seed)
    t0 = time.perf_counter()
    bench = BenchLibrary.open(args.library, args.model_dir, args.embedder)
    out = common.results_dir(f"overhead-{bench.root.name}", args.out, args.smoke)
    rows = rows_for(args.active, bench.num_experts)
    prompts = common.prompts(bench, args.requests * len(rows) + 3, bench.query_tokens,
                             seed=args.seed)
    log(f"overhead: {bench.root} (K={bench.num_experts}), rows {[r.name for r in rows]}, "
        f"paths {args.paths} -> {out}")
    paths = [measure_path(bench, p, rows, prompts, args) for p in args.paths]
    ttt = measure_ttt(bench, prompts, args)
    config = dict(vars(args)) | {"experts": bench.num_experts, "rank": bench.manifest.lora.rank,
                                 "seconds": time.perf_counter() - t0}
    write_report(out, paths, ttt, config, bench)
    print((out / "results.md").read_text())
    log(f"overhead: wrote {out}/results.json, results.md, overhead.png")
    return out


if __name__ == "__main__":
    main()
