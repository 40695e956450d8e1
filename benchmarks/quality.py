"""Quality: perplexity of held-out suffixes, TTMM against base, multitask fine-tuning,
ensembling and test-time training (the paper's Table 1 and Figures 1 and 5, on this machine).

Protocol (the paper's Appendix E): each test document is a holdout document of the library,
cut to the build's first `max_tokens` tokens; its first `--prefix-tokens` tokens are the prompt
(they route, or TTT trains on their neighbours) and only the tokens after it are scored.
Test documents are spread round-robin over the clusters (the paper takes one per cluster) and
never include the holdout documents the build tuned beta/tau on; beta and tau are the library's
tuned defaults, never chosen here.

Rows are a list of named methods (`METHODS`); adding a row is one entry. Two paths score them:
- product: the real gRPC server in this process, `Score` RPC (base, TTMM merges, uniform);
- reference: transformers + PEFT (`benchmarks/baselines.py`): multitask, ensembling, TTT.
The base row is scored on both, and the largest per-document difference of mean NLL is
reported, so the two columns are known to be comparable (TTMM(10) is checked the same way).

Every row gets a 95% bootstrap interval over documents (the same resamples for every row), and
TTMM(10) minus multitask a paired interval. Equal token budgets: the library's multitask
adapter is trained on the union of the experts' training documents; TTT retrieves from the
same documents. A library that also trained branched experts has the compute-matched adapter
(`multitask-matched/`: twice the epochs, as many tokens as a branched library), and gets its
row (`MATCHED`) and TTMM(10) minus it.

    python -m benchmarks.quality --library ~/.cache/ttmm/libraries/wiki-k16 --prefix-tokens 50
    python -m benchmarks.quality --smoke        # tiny model and library, about a minute
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import BenchLibrary, TestDoc, log


@dataclass(frozen=True)
class Method:
    """One row of the table.

    kind: "score" (product Score RPC with `routing`), "multitask", "matched" (the
    compute-matched multitask adapter), "ensemble" (reference,
    mixing the experts `routing` selects) or "ttt" (reference). routing: (mode, max_active)
    as a client would ask for it; the experts' weights are the server's, from the library's
    tuned beta/tau.
    """

    key: str
    name: str
    kind: str
    routing: tuple[str, int] | None = None

    @property
    def path(self) -> str:
        return "product (gRPC Score)" if self.kind == "score" else "reference (transformers)"


METHODS: list[Method] = [
    Method("base", "base model", "score", ("base", 0)),
    Method("multitask", "multitask fine-tuning (equal tokens)", "multitask"),
    Method("ttmm1", "TTMM, 1 active", "score", ("ttmm", 1)),
    Method("ttmm3", "TTMM, 3 active", "score", ("ttmm", 3)),
    Method("ttmm10", "TTMM, 10 active", "score", ("ttmm", 10)),
    Method("uniform3", "TTMM, uniform top-3", "score", ("uniform", 3)),
    Method("uniform10", "TTMM, uniform top-10", "score", ("uniform", 10)),
    Method("ens3", "ensembling, 3", "ensemble", ("ttmm", 3)),
    Method("ens10", "ensembling, 10", "ensemble", ("ttmm", 10)),
    Method("ttt", "TTT (N nearest, 1 step each)", "ttt"),
]
# Only for libraries with a compute-matched adapter (manifest extras `multitask_matched`).
MATCHED = Method("matched", "multitask fine-tuning, compute-matched (2x tokens)", "matched")
# Paired differences reported below the table (a - b: negative means a is better).
PAIRS = [("ttmm10", "multitask"), ("ttmm10", "base"), ("ttmm10", "ttt"), ("ttmm10", "ens10"),
         ("ttmm10", "uniform10"), ("ttt", "multitask"), ("ttmm10", "matched")]
# Figure 5's shape: perplexity against active experts, one line per way of combining them.
SERIES = {"merge, softmax weights (TTMM)": ["ttmm1", "ttmm3", "ttmm10"],
          "merge, uniform weights": ["ttmm1", "uniform3", "uniform10"],
          "ensembling, softmax weights": ["ttmm1", "ens3", "ens10"]}
LEVELS = ["base", "multitask", "ttt"]


@dataclass
class Scores:
    """Per-document results of one row."""

    nll: np.ndarray  # summed suffix NLL
    tokens: np.ndarray  # suffix tokens scored
    active: np.ndarray  # experts (or adapters) used
    overhead_ms: np.ndarray  # test-time work before scoring could start (route/merge/train)
    seconds: float = 0.0  # wall time of the whole row
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything a method needs: the library, the test documents and the settings."""

    bench: BenchLibrary
    docs: list[TestDoc]
    prefix: int
    args: argparse.Namespace
    routings: dict[tuple[str, int], list[tuple[tuple[int, ...], tuple[float, ...]]]] = \
        field(default_factory=dict)
    product: dict[tuple[str, int], Scores] = field(default_factory=dict)
    reference: Any = None  # baselines.Reference, created after the server has stopped
    reference_base_ms: float = 0.0  # one reference forward pass per document (ensembling cost)

    @property
    def query_tokens(self) -> int:
        return min(self.prefix, self.bench.query_tokens)

    def query_text(self, doc: TestDoc) -> str:
        """What the router embeds for this prompt (the service's cut), for TTT's retrieval."""
        return self.bench.tokenizer.decode(doc.prefix(self.query_tokens))


# --------------------------------------------------------------------------- product path


def score_on_server(run: Run, served: common.Served, routing: tuple[str, int]) -> Scores:
    """Score every document's suffix through the gRPC `Score` RPC with this routing."""
    from ttmm_vllm.client import routing_options

    mode, k = routing
    opts = routing_options(mode) if mode == "base" else routing_options(mode, max_active=k)
    client = served.client()

    def one(doc: TestDoc):
        r = client.score("", "", routing=opts, prompt_token_ids=doc.prefix(run.prefix),
                         continuation_token_ids=doc.suffix(run.prefix), timeout=600)
        t = r.timings
        return (-float(np.sum(np.asarray(r.logprobs, dtype=np.float64))), len(r.logprobs),
                common.routing_of(r.routing),
                t.embed_ms + t.search_ms + t.merge_ms + t.register_ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(run.args.concurrency) as pool:
        out = list(pool.map(one, run.docs))
    client.close()
    run.routings[routing] = [o[2] for o in out]
    return Scores(np.array([o[0] for o in out]), np.array([o[1] for o in out]),
                  np.array([len(o[2][0]) for o in out]), np.array([o[3] for o in out]),
                  time.perf_counter() - t0)


def product_phase(run: Run, methods: Sequence[Method]) -> None:
    """Start the server once, score every routing a row needs, stop it (so the reference
    phase has the cores to itself)."""
    from ttmm_vllm.serve.engine_api import EngineConfig

    needed: list[tuple[str, int]] = []
    for m in methods:
        if m.routing and m.routing not in needed:
            needed.append(m.routing)
    if ("base", 0) not in needed:
        needed.insert(0, ("base", 0))  # the agreement check needs it
    a = run.args
    engine = EngineConfig(merge_path=a.merge_path, max_model_len=run.bench.max_tokens + 8,
                          max_num_seqs=max(8, a.concurrency), kv_cache_bytes=a.kv_cache_mb << 20,
                          seed=a.seed)
    with common.serve(run.bench, engine) as served:
        warm = Run(run.bench, run.docs[:2], run.prefix, a)
        score_on_server(warm, served, ("ttmm", 3))  # warm-up, not counted
        for routing in needed:
            s = score_on_server(run, served, routing)
            run.product[routing] = s
            log(f"product {routing}: ppl {common.perplexity(s.nll, s.tokens):.3f} "
                f"in {s.seconds:.0f}s")


# --------------------------------------------------------------------------- reference path


def run_multitask(run: Run, m: Method) -> Scores:
    t0 = time.perf_counter()
    nll, cnt = run.reference.multitask_nll(run.docs, run.prefix)
    n = len(run.docs)
    return Scores(nll, cnt, np.ones(n), np.zeros(n), time.perf_counter() - t0)


def run_matched(run: Run, m: Method) -> Scores:
    """The compute-matched adapter alone on the reference model, hooked in for this row."""
    from training.evaluate import AdapterMixer, suffix_nll
    from ttmm_vllm.library import read_adapter

    lib = run.bench.library
    adapter = read_adapter(lib.resolve(run.bench.manifest.extras["multitask_matched"]["file"]))
    n = len(run.docs)
    t0 = time.perf_counter()
    mixer = AdapterMixer(run.reference.model, [adapter])
    try:
        nll, cnt = suffix_nll(run.reference.model, run.reference.tokenizer,
                              [d.text for d in run.docs], run.prefix,
                              max_tokens=run.bench.max_tokens, batch_size=run.args.batch_size,
                              mixer=mixer, weights=np.ones((n, 1)))
    finally:
        mixer.remove()
    return Scores(nll, cnt, np.ones(n), np.zeros(n), time.perf_counter() - t0)


def run_ensemble(run: Run, m: Method) -> Scores:
    """Mix the experts' next-token probabilities with the routing weights TTMM used."""
    routings = run.routings[m.routing]
    nll, cnt, cost = [], [], []
    base_ms = run.reference_base_ms  # one forward pass per document, measured on this path
    t0 = time.perf_counter()
    for doc, (ids, ws) in zip(run.docs, routings, strict=True):
        t = time.perf_counter()
        a, b = run.reference.ensemble_nll(doc, run.prefix, ids, ws)
        nll.append(a)
        cnt.append(b)
        cost.append(max((time.perf_counter() - t) * 1e3 - base_ms, 0.0))
    return Scores(np.array(nll), np.array(cnt), np.array([len(r[0]) for r in routings]),
                  np.array(cost), time.perf_counter() - t0)


def run_ttt(run: Run, m: Method) -> Scores:
    from benchmarks.baselines import TTT

    ttt = TTT(run.bench, run.args.ttt_neighbours, lr=run.args.ttt_lr, seed=run.args.seed)
    nll, cnt, cost, train_s = [], [], [], []
    t0 = time.perf_counter()
    for i, doc in enumerate(run.docs):
        step = ttt.train(run.query_text(doc), seed=i)
        a, b = run.reference.adapter_nll(doc, run.prefix, step.adapter)
        nll.append(a)
        cnt.append(b)
        cost.append(step.retrieve_ms + step.train_s * 1e3)
        train_s.append(step.train_s)
        if (i + 1) % 8 == 0 or i + 1 == len(run.docs):
            log(f"TTT {i + 1}/{len(run.docs)}: {np.mean(train_s):.1f}s per prompt")
    n = len(run.docs)
    return Scores(np.array(nll), np.array(cnt), np.ones(n), np.array(cost),
                  time.perf_counter() - t0, {"neighbours": ttt.n, "lr": ttt.lr,
                                             "training_documents": len(ttt.texts)})


RUNNERS: dict[str, Callable[[Run, Method], Scores]] = {
    "multitask": run_multitask, "matched": run_matched, "ensemble": run_ensemble,
    "ttt": run_ttt}


def reference_phase(run: Run, methods: Sequence[Method]) -> tuple[dict[str, Scores], dict]:
    """Reference rows, plus the base (and TTMM(10)) rows re-scored here for the check."""
    from benchmarks.baselines import Reference

    run.reference = Reference(run.bench, batch_size=run.args.batch_size)
    t0 = time.perf_counter()
    base = run.reference.nll(run.docs, run.prefix)
    run.reference_base_ms = (time.perf_counter() - t0) * 1e3 / len(run.docs)
    checks = {"base": agreement(run.product[("base", 0)], base)}
    if ("ttmm", 10) in run.product:
        w = run.reference.weights(run.routings[("ttmm", 10)])
        checks["ttmm10"] = agreement(run.product[("ttmm", 10)], run.reference.nll(
            run.docs, run.prefix, w))
    for name, c in checks.items():
        log(f"check {name}: product vs reference, max |mean NLL difference| per document "
            f"{c['max_abs_mean_nll_diff']:.2e}")
    rows: dict[str, Scores] = {}
    for m in methods:
        if m.kind in RUNNERS:
            log(f"reference: {m.name}")
            rows[m.key] = RUNNERS[m.kind](run, m)
            s = rows[m.key]
            log(f"reference {m.key}: ppl {common.perplexity(s.nll, s.tokens):.3f} "
                f"in {s.seconds:.0f}s")
    run.reference.close()
    return rows, checks


def agreement(product: Scores, reference: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    nll, cnt = reference
    if not np.array_equal(product.tokens, cnt):
        raise AssertionError("product and reference scored different numbers of tokens")
    diff = np.abs(product.nll / product.tokens - nll / cnt)
    return {"max_abs_mean_nll_diff": float(diff.max()), "mean_abs_mean_nll_diff":
            float(diff.mean()), "perplexity_product": common.perplexity(product.nll,
                                                                        product.tokens),
            "perplexity_reference": common.perplexity(nll, cnt)}


# --------------------------------------------------------------------------- report


def summarise(run: Run, methods: Sequence[Method], rows: dict[str, Scores]) -> dict[str, Any]:
    idx = common.bootstrap_indices(len(run.docs), run.args.resamples, run.args.seed)
    table = []
    for m in methods:
        s = rows[m.key]
        lo, hi = common.bootstrap_perplexity(s.nll, s.tokens, idx)
        table.append({"key": m.key, "name": m.name, "path": m.path,
                      "routing": list(m.routing) if m.routing else None,
                      "perplexity": common.perplexity(s.nll, s.tokens), "ci95": [lo, hi],
                      "mean_active": float(np.mean(s.active)),
                      "overhead_ms_p50": common.percentile(s.overhead_ms, 50),
                      "seconds": s.seconds, **s.extra,
                      "per_document": {"nll": s.nll, "tokens": s.tokens, "active": s.active,
                                       "overhead_ms": s.overhead_ms}})
    pairs = []
    for a, b in PAIRS:
        if a in rows and b in rows:
            d = common.paired_difference((rows[a].nll, rows[a].tokens),
                                         (rows[b].nll, rows[b].tokens), idx)
            pairs.append({"a": a, "b": b, **d})
    return {"rows": table, "pairs": pairs}


def write_report(out: Path, run: Run, methods: Sequence[Method], summary: dict, checks: dict,
                 config: dict) -> None:
    names = {m.key: m.name for m in methods}
    header = ["method", "path", "perplexity", "95% CI", "mean active", "overhead p50 (ms)"]
    body = [[r["name"], r["path"].split(" ")[0], r["perplexity"],
             f"{common.fmt(r['ci95'][0])}-{common.fmt(r['ci95'][1])}", r["mean_active"],
             r["overhead_ms_p50"]]
            for r in summary["rows"]]
    lib = run.bench
    md = [f"# Quality: {lib.root.name}\n",
          f"{len(run.docs)} test documents ({len({d.cluster for d in run.docs})} clusters), "
          f"prefix {run.prefix} tokens, suffix up to {lib.max_tokens - run.prefix} tokens "
          f"({int(summary['rows'][0]['per_document']['tokens'].sum())} scored); K = "
          f"{lib.num_experts}; beta {lib.manifest.router.beta:g}, tau "
          f"{lib.manifest.router.tau:g} ({lib.manifest.router.sparse_softmax}) from the "
          f"library's holdout tuning; TTT: {run.args.ttt_neighbours} nearest training documents,"
          f" one step each, lr {run.args.ttt_lr:g}.\n",
          common.markdown_table(header, body),
          "\nPaired differences of perplexity (a - b; negative: a is better), 95% bootstrap "
          "over the same documents:\n",
          common.markdown_table(["a - b", "difference", "95% CI"], [
              [f"{names[p['a']]} - {names[p['b']]}", f"{p['difference']:+.3f}",
               f"{p['lo']:+.3f} to {p['hi']:+.3f}"] for p in summary["pairs"]]),
          "\nProduct path vs reference implementation (same documents, same routing):\n",
          common.markdown_table(["row", "max abs diff of mean NLL", "ppl product",
                                 "ppl reference"], [
              [k, f"{c['max_abs_mean_nll_diff']:.2e}", c["perplexity_product"],
               c["perplexity_reference"]] for k, c in checks.items()]),
          f"\nOverhead: per prompt, before scoring (product rows: embed + search + merge + "
          f"register from the response's timings; ensembling: its extra forward passes; TTT: "
          f"retrieval + training). Merge path: {run.args.merge_path}; Score requests ran "
          f"{run.args.concurrency} at a time, so these include some queueing (the overhead "
          "benchmark times requests alone).\n"]
    (out / "results.md").write_text("\n".join(md))
    common.write_json(out / "results.json", {
        "benchmark": "quality", "config": config, "environment": common.environment(),
        "library": str(lib.root), "test_documents": [d.id for d in run.docs],
        "checks": checks, **summary})
    plot(out, summary, lib.root.name)


def plot(out: Path, summary: dict, title: str) -> None:
    plt = common.pyplot()
    rows = {r["key"]: r for r in summary["rows"]}
    # 1. every row with its interval
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["name"] for r in summary["rows"]][::-1]
    ppl = np.array([r["perplexity"] for r in summary["rows"]][::-1])
    ci = np.array([r["ci95"] for r in summary["rows"]][::-1])
    ax.barh(names, ppl, xerr=[ppl - ci[:, 0], ci[:, 1] - ppl], color="#7aa6c2", capsize=3)
    ax.set_xlim(min(ci[:, 0]) * 0.95, max(ci[:, 1]) * 1.02)
    ax.set_xlabel("suffix perplexity (95% bootstrap CI)")
    ax.set_title(f"Quality: {title}")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)
    # 2. Figure 5's shape: active experts vs perplexity
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, keys in SERIES.items():
        pts = [(rows[k]["routing"][1], rows[k]["perplexity"]) for k in keys if k in rows]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    for k, style in zip(LEVELS, (":", "--", "-."), strict=True):
        if k in rows:
            ax.axhline(rows[k]["perplexity"], ls=style, color="grey", label=rows[k]["name"])
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 10], ["1", "3", "10"])
    ax.set_xlabel("active experts (at most)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Active experts: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=120)
    plt.close(fig)
    # 3. Figure 1's shape: perplexity against test-time overhead per prompt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["rows"]:
        ax.scatter(max(r["overhead_ms_p50"], 0.0), r["perplexity"])
        ax.annotate(r["key"], (max(r["overhead_ms_p50"], 0.0), r["perplexity"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("test-time overhead per prompt, median (ms)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity vs test-time cost: {title}")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", help="library directory (built with --multitask)")
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="prompt tokens (routing / TTT query); default: the library's "
                        "query_tokens (wiki 50, code 200 in the paper)")
    p.add_argument("--test-docs", type=int, default=64,
                   help="test documents, round-robin over clusters (default 64)")
    p.add_argument("--min-suffix", type=int, default=16,
                   help="skip documents with fewer suffix tokens (default 16)")
    p.add_argument("--ttt-neighbours", type=int, default=16,
                   help="TTT: nearest training documents, one gradient step each (the paper: "
                        "100; default 16 to fit this machine)")
    p.add_argument("--ttt-lr", type=float, default=5e-4, help="TTT learning rate (paper 5e-4)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"rows to run (default all): {' '.join(m.key for m in METHODS)} "
                        f"({MATCHED.key}: when the library has a compute-matched adapter)")
    p.add_argument("--merge-path", choices=("worker", "disk"), default="worker")
    p.add_argument("--concurrency", type=int, default=4, help="Score requests in flight")
    p.add_argument("--batch-size", type=int, default=8, help="reference forward batch")
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="override the manifest's base model path")
    p.add_argument("--embedder", default=None, help="override the manifest's embedder path")
    common.add_run_args(p, "quality")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = common.parse_run_args(parser(), argv)
    if args.smoke:
        args.test_docs = min(args.test_docs, 6)
        args.ttt_neighbours = min(args.ttt_neighbours, 2)
        args.resamples = min(args.resamples, 200)
        args.kv_cache_mb = min(args.kv_cache_mb, 64)
    if not args.library:
        raise SystemExit("--library is required (or --smoke)")
    common.seed_everything(args.seed)
    bench = BenchLibrary.open(args.library, args.model_dir, args.embedder)
    if bench.manifest.serving_base is not None:
        # Served on the base with the multitask adapter folded in: the server's base row would
        # be the multitask model and the multitask row would apply the adapter twice.
        raise SystemExit(f"{bench.root} is branched from the multitask model; this benchmark "
                         "compares against the plain base. The build's report.md has the "
                         "branched table (base, multitask, TTMM from the base and branched).")
    prefix = args.prefix_tokens or bench.query_tokens
    every = METHODS + ([MATCHED] if bench.manifest.extras.get("multitask_matched") else [])
    methods = every if not args.methods else [m for m in every if m.key in args.methods]
    unknown = set(args.methods or ()) - {m.key for m in every}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}")
    docs = bench.test_documents(args.test_docs, prefix, min_suffix=args.min_suffix,
                                seed=args.seed)
    out = common.results_dir(f"quality-{bench.root.name}", args.out, args.smoke)
    log(f"quality: {bench.root} ({bench.num_experts} experts), {len(docs)} test documents, "
        f"prefix {prefix}, rows {[m.key for m in methods]} -> {out}")
    run = Run(bench, docs, prefix, args)
    t0 = time.perf_counter()
    product_phase(run, methods)
    rows, checks = reference_phase(run, methods)
    rows.update({m.key: run.product[m.routing] for m in methods if m.kind == "score"})
    summary = summarise(run, methods, rows)
    config = {k: v for k, v in vars(args).items()} | {
        "prefix_tokens": prefix, "max_tokens": bench.max_tokens, "experts": bench.num_experts,
        "router": dict(vars(bench.manifest.router)), "seconds": time.perf_counter() - t0}
    write_report(out, run, methods, summary, checks, config)
    print((out / "results.md").read_text())
    log(f"quality: wrote {out}/results.json, results.md, perplexity.png, experts.png, cost.png "
        f"in {time.perf_counter() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main()
