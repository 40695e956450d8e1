"""Re-routing during generation (issue 11): does following a drifting text help, and what
does it cost?

Quality: for each test document (holdout, round-robin over clusters, never tuned on), the
first `--prefix-tokens` tokens are the prompt and the rest of the document (up to the build's
`max_tokens`) is the continuation, scored through the gRPC `Score` RPC with routing fixed
from the prompt ("once") and re-computed every N tokens from the tokens before each window
(`routing.reroute_every`, no look-ahead). Perplexity with a 95% bootstrap interval over
documents, and the paired difference to "once".

Cost: `--clients` closed-loop gRPC clients generate `--new-tokens` tokens per request, with
routing once and re-routing every N tokens: output tokens/s and latency, ratio to "once".
Re-routing runs a request as one engine request per window (each a prefill of the context
under the window's merge), which is what it costs.

    python -m benchmarks.rerouting --library ~/.cache/ttmm/libraries/wiki-k16 --prefix-tokens 50
    python -m benchmarks.rerouting --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.common import BenchLibrary, log


def score_all(served: common.Served, docs, prefix: int, every: int, concurrency: int):
    """(nll, tokens, switches) per document with routing re-computed every `every` tokens."""
    from ttmm_vllm.client import routing_options

    opts = routing_options(reroute_every=every) if every else routing_options()
    client = served.client()

    def one(doc):
        r = client.score("", "", routing=opts, prompt_token_ids=doc.prefix(prefix),
                         continuation_token_ids=doc.suffix(prefix), timeout=900)
        return -float(np.sum(np.asarray(r.logprobs, np.float64))), len(r.logprobs), \
            len(r.switches)

    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, docs))
    client.close()
    return (np.array([o[0] for o in out]), np.array([o[1] for o in out]),
            np.array([o[2] for o in out]))


def throughput(served: common.Served, prompts: list[str], every: int, clients: int,
               new_tokens: int) -> dict:
    from ttmm_vllm.client import routing_options

    opts = routing_options(reroute_every=every) if every else routing_options()
    todo = list(prompts)
    lat, tokens, switches = [], [], []

    def worker():
        c = served.client()
        while todo:
            try:
                p = todo.pop()
            except IndexError:
                break
            t0 = time.perf_counter()
            r = c.generate(p, max_tokens=new_tokens, routing=opts, timeout=900)
            lat.append(time.perf_counter() - t0)
            tokens.append(r.completion_tokens)
            switches.append(len(r.switches))
        c.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "tokens": int(sum(tokens)), "wall_s": wall,
            "tok_per_s": sum(tokens) / wall, "p50_ms": common.percentile(lat, 50) * 1e3,
            "p99_ms": common.percentile(lat, 99) * 1e3,
            "switches_per_request": float(np.mean(switches)) if switches else 0.0}


def plot(out: Path, rows: list[dict], title: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["name"] for r in rows]
    ppl = np.array([r["perplexity"] for r in rows])
    ci = np.array([r["ci95"] for r in rows])
    ax.errorbar(names, ppl, yerr=[ppl - ci[:, 0], ci[:, 1] - ppl], fmt="o", capsize=4)
    ax.set_ylabel("continuation perplexity (95% CI)")
    ax.set_title(f"Re-routing during the continuation: {title}")
    fig.tight_layout()
    fig.savefig(out / "rerouting.png", dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerouting", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library")
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="prompt tokens (default: the library's query_tokens)")
    p.add_argument("--every", type=int, nargs="+", default=[16, 64],
                   help="re-routing intervals compared with routing once")
    p.add_argument("--test-docs", type=int, default=48)
    p.add_argument("--min-suffix", type=int, default=64,
                   help="skip documents with a shorter continuation (re-routing needs room)")
    p.add_argument("--concurrency", type=int, default=4, help="Score requests in flight")
    p.add_argument("--clients", type=int, default=8, help="throughput: concurrent clients")
    p.add_argument("--requests", type=int, default=16, help="throughput: requests per row")
    p.add_argument("--new-tokens", type=int, default=64, help="throughput: tokens per request")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    common.add_run_args(p, "rerouting")
    return p


def main(argv: list[str] | None = None) -> Path:
    from ttmm_vllm.serve.engine_api import EngineConfig

    args = common.parse_run_args(parser(), argv)
    if args.smoke:
        # every 8: the smallest window the service allows (ServiceConfig.min_reroute_every)
        args.test_docs, args.min_suffix, args.every = min(args.test_docs, 6), 8, [8]
        args.requests, args.clients, args.new_tokens = 4, 2, 16
        args.resamples, args.kv_cache_mb = 200, 64
    if not args.library:
        raise SystemExit("--library is required (or --smoke)")
    common.seed_everything(args.seed)
    bench = BenchLibrary.open(args.library)
    prefix = args.prefix_tokens or bench.query_tokens
    docs = bench.test_documents(args.test_docs, prefix, min_suffix=args.min_suffix,
                                seed=args.seed)
    prompts = common.prompts(bench, args.requests, prefix, seed=args.seed)
    out = common.results_dir(f"rerouting-{bench.root.name}", args.out, args.smoke)
    log(f"rerouting: {bench.root}, {len(docs)} documents, prefix {prefix}, every {args.every}")
    engine = EngineConfig(max_model_len=bench.max_tokens + 16, max_num_seqs=32, max_loras=16,
                          idle_adapters=16, kv_cache_bytes=args.kv_cache_mb << 20)
    intervals = [0, *args.every]
    scores, speed = {}, {}
    t0 = time.perf_counter()
    with common.serve(bench, engine) as served:
        for every in intervals:
            log(f"rerouting: scoring, every {every or 'never'}")
            scores[every] = score_all(served, docs, prefix, every, args.concurrency)
        for every in intervals:
            log(f"rerouting: throughput, every {every or 'never'}")
            speed[every] = throughput(served, prompts, every, args.clients, args.new_tokens)
    idx = common.bootstrap_indices(len(docs), args.resamples, args.seed)
    rows = []
    for every in intervals:
        nll, tok, sw = scores[every]
        row = {"every": every, "name": f"every {every}" if every else "once",
               "perplexity": common.perplexity(nll, tok),
               "ci95": common.bootstrap_perplexity(nll, tok, idx),
               "switches_per_doc": float(sw.mean()), **{f"gen_{k}": v
                                                       for k, v in speed[every].items()}}
        if every:
            row["minus_once"] = common.paired_difference((nll, tok), scores[0][:2], idx)
        row["gen_ratio"] = speed[every]["tok_per_s"] / speed[0]["tok_per_s"]
        rows.append(row)
    md = [f"# Re-routing during generation: {bench.root.name}\n",
          f"`python -m benchmarks.rerouting {' '.join(sys.argv[1:] if argv is None else argv)}`\n",
          f"{len(docs)} test documents, prompt {prefix} tokens, continuation the rest "
          f"(up to {bench.max_tokens} tokens in all), {int(sum(scores[0][1]))} scored tokens; "
          f"throughput: {args.clients} clients, {args.requests} requests of "
          f"{args.new_tokens} tokens.\n",
          common.markdown_table(
              ["routing", "perplexity", "95% CI", "minus once (95% CI)", "switches / doc",
               "gen tok/s", "ratio to once", "p50 ms"],
              [[r["name"], r["perplexity"], f"{r['ci95'][0]:.2f}..{r['ci95'][1]:.2f}",
                (f"{r['minus_once']['difference']:+.3f} ({r['minus_once']['lo']:+.3f}.."
                 f"{r['minus_once']['hi']:+.3f})" if "minus_once" in r else "-"),
                r["switches_per_doc"], r["gen_tok_per_s"], r["gen_ratio"], r["gen_p50_ms"]]
               for r in rows])]
    (out / "results.md").write_text("\n".join(md))
    common.write_json(out / "results.json", {"config": vars(args) | {"prefix": prefix},
                                             "environment": common.environment(), "rows": rows,
                                             "seconds": time.perf_counter() - t0})
    plot(out, rows, bench.root.name)
    print((out / "results.md").read_text())
    return out


if __name__ == "__main__":
    main()
