"""One merge, no engine: how long admitting a request's merge takes, per compression method.

A SmolLM2-135M-shaped merge: 30 layers x 7 projections = 210 modules (hidden 576,
intermediate 1536, kv 192), 10 random rank-16 experts with random routing weights, so the
rank-expanded merge has R = 160 and a rank budget b (16) forces compression of every module.
Rows: the exact rank-expanded merge (no compression), `merge.compress` (float64 reference,
one module at a time), and `merge.compress_many`'s "gram" (exact, float32, batched) and
"randomized" methods; then the same experts with one shared A per module (exact at rank 16,
`merge_experts(shared_a=True)`) and the `shares_a` check. Each time is the median of
`--repeats` runs after one warm-up, with 1 thread and with all threads.

Why: admission should cost about one generated token (~100 ms on this CPU); `compress` takes
seconds. Random experts have flat spectra, so rank-16 errors are large (~0.75-0.85); real
libraries, whose experts share directions, lose far less (NOTES.md).

    .venv/bin/python -m benchmarks.merge_micro [--budget 16] [--repeats 5] [--ref-repeats 3]
        [--threads 1,all] [--methods expand,reference,gram,randomized,shared,shares_a]

Writes benchmarks/results/merge_micro/results.json and results.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, markdown_table, write_json
from ttmm_vllm.library import ExpertWeights
from ttmm_vllm.merge import merge_experts, shares_a

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30
# projection -> (in, out), SmolLM2-135M
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV),
        "self_attn.v_proj": (HIDDEN, KV), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
        "mlp.down_proj": (INTER, HIDDEN)}
OUT = Path(__file__).resolve().parent / "results" / "merge_micro"


def make_experts(n: int, rank: int, *, shared: bool, seed: int = 0) -> list[ExpertWeights]:
    """n random float32 experts of one rank over all 210 modules (Kaiming-like A, small B);
    shared=True: every expert uses the same A per module (LoraSpec.shared_a)."""
    g = torch.Generator().manual_seed(seed)
    shared_as = {}
    experts = []
    for k in range(n):
        mods = {}
        for layer in range(LAYERS):
            for proj, (din, dout) in PROJ.items():
                name = f"model.layers.{layer}.{proj}"
                if shared:
                    if name not in shared_as:
                        shared_as[name] = torch.randn(rank, din, generator=g) / din**0.5
                    a = shared_as[name].clone()  # distinct tensors, as read from disk
                else:
                    a = torch.randn(rank, din, generator=g) / din**0.5
                mods[name] = (a, 0.01 * torch.randn(dout, rank, generator=g))
        experts.append(ExpertWeights(k, mods, scaling=32.0 / rank, rank=rank))
    return experts


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of `repeats` calls after `warmup` ones, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ref-repeats", type=int, default=3,
                   help="repeats of the float64 reference (seconds a request; no warm-up)")
    p.add_argument("--threads", default="1,all", help="comma list of counts or 'all'")
    p.add_argument("--methods", default="all",
                   help="comma list of expand,reference,gram,randomized,shared,shares_a")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    all_threads = torch.get_num_threads()
    threads = [all_threads if t == "all" else int(t) for t in args.threads.split(",")]
    experts = make_experts(args.experts, args.rank, shared=False)
    shared = make_experts(args.experts, args.rank, shared=True)
    w = np.random.default_rng(0).dirichlet(np.ones(args.experts)).tolist()
    b = args.budget
    cases = {  # key: (row, callable, repeats, warm-ups)
        "expand": ("exact-expand (no compression)", lambda: merge_experts(experts, w),
                   args.repeats, 1),
        "reference": ("compress (float64 reference)",
                      lambda: merge_experts(experts, w, b, method="reference"),
                      args.ref_repeats, 0),
        "gram": ("gram (float32, batched)",
                 lambda: merge_experts(experts, w, b, method="gram"), args.repeats, 1),
        "randomized": ("randomized (p=8, q=2)",
                       lambda: merge_experts(experts, w, b, method="randomized"),
                       args.repeats, 1),
        "shared": ("shared-A exact", lambda: merge_experts(shared, w, b, shared_a=True),
                   args.repeats, 1),
        "shares_a": ("shares_a check", lambda: shares_a(shared), args.repeats, 1),
    }
    keys = list(cases) if args.methods == "all" else args.methods.split(",")
    rows = []
    for key in keys:
        name, fn, repeats, warmup = cases[key]
        row = {"method": name, "ms": {}}
        for t in threads:
            torch.set_num_threads(t)
            sec, res = timed(fn, repeats, warmup)
            row["ms"][str(t)] = sec * 1e3
            if hasattr(res, "rank"):
                row["rank"], row["rel_error"] = res.rank, res.rel_error
        row["repeats"] = repeats
        rows.append(row)
        ms = " / ".join(f"{row['ms'][str(t)]:.1f}" for t in threads)
        err = f"{row['rel_error']:.4f}" if "rel_error" in row else "-"
        print(f"{name:32s} ms per request ({'/'.join(map(str, threads))} threads): {ms:>16s}"
              f"   rank {row.get('rank', '-')}  rel_error {err}", flush=True)
    torch.set_num_threads(all_threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"experts": args.experts, "rank": args.rank, "budget": b, "modules": len(PROJ) *
              LAYERS, "R": args.experts * args.rank, "threads": threads,
              "repeats": args.repeats, "ref_repeats": args.ref_repeats, "dtype": "float32"}
    write_json(out / "results.json", {"config": config, "env": environment(), "rows": rows})
    ref = next((r["ms"] for r in rows if r["method"].startswith("compress")), None)
    header = ["method", *[f"ms, {t} thread{'s' if t > 1 else ''}" for t in threads],
              *(["x faster than compress"] if ref else []), "rank", "rel_error (worst module)"]
    table = [[r["method"], *[r["ms"][str(t)] for t in threads],
              *([f"{ref[str(threads[0])] / r['ms'][str(threads[0])]:.1f}"] if ref else []),
              r.get("rank", "-"), f"{r['rel_error']:.4f}" if "rel_error" in r else "-"]
             for r in rows]
    md = (f"# One merge's admission cost (SmolLM2-135M shapes)\n\n"
          f"`python -m benchmarks.merge_micro`\n\n"
          f"One `merge_experts` call over {config['modules']} modules: {args.experts} random "
          f"rank-{args.rank} float32 experts (R = {config['R']}), Dirichlet routing weights, "
          f"budget b = {b}. Median of {args.repeats} after a warm-up ({args.ref_repeats}, no "
          f"warm-up, for the float64 reference); {os.cpu_count()} CPUs shared with other work, "
          f"so the all-threads column is noisy. Random experts share no directions: the "
          f"rank-{b} error is large by construction (real libraries lose less). The shared-A "
          f"rows use other random experts that share one A per module (exact at rank "
          f"{args.rank}).\n\n"
          + markdown_table(header, table))
    (out / "results.md").write_text(md)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
