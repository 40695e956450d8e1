"""`ttmm demo` (what `make demo` runs): the whole product on embedded defaults.

1. fetch the offline sources (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, Wikipedia extracts);
2. build a small Wikipedia expert library (a few minutes on 2 CPU cores; cached, so a second
   run starts serving at once);
3. start the gRPC server on 127.0.0.1, send prompts on different topics from the gRPC client,
   print the experts each prompt was routed to (titles, weights) and the generation;
4. stop the server.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROMPTS = [
    "The French Revolution was a period of political and societal change in France that",
    "Photosynthesis is the process by which green plants",
    "The Premier League is the top level of the English football league system, and",
    "Jazz is a music genre that originated in the African-American communities of",
    "Jupiter is the fifth planet from the Sun and",
    "The Roman Empire was the post-Republican state of ancient Rome, which",
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fetch, build a small Wikipedia library, serve, query")
    p.add_argument("--home", help="TTMM_HOME (default: $TTMM_HOME, else ~/.cache/ttmm)")
    p.add_argument("-K", dest="k", type=int, default=8, help="experts in the demo library")
    p.add_argument("--docs-per-expert", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=160, help="tokens kept per document")
    p.add_argument("--limit", type=int, default=3000, help="Wikipedia documents read")
    p.add_argument("--generate-tokens", type=int, default=40)
    p.add_argument("--merge-path", choices=("worker", "disk"), default="worker")
    p.add_argument("prompts", nargs="*", help="prompts to send (default: six on different "
                   "topics)")
    p.set_defaults(func=run)


def build_demo_library(home: Path, args: argparse.Namespace) -> Path:
    from training.config import BuildConfig
    from training.pipeline import build
    from training.sources.corpora import fetch_wiki
    from training.sources.models import fetch_base_model, fetch_embedder

    t0 = time.time()
    base = fetch_base_model(home)
    embedder = fetch_embedder(home)
    fetch_wiki(home)
    print(f"[demo] sources ready in {time.time() - t0:.0f} s: {base}, {embedder}", flush=True)
    out = home / "libraries" / f"demo-wiki-k{args.k}"
    cfg = BuildConfig(
        corpus="wiki", home=home, out=out, base_model=base, embedder=embedder, k=args.k,
        limit=args.limit, max_tokens=args.max_tokens, max_docs_per_expert=args.docs_per_expert,
        rank=16, alpha=16.0, lr=1e-3, query_tokens=48, max_active=4, tune_docs=32,
        betas=(0.02, 0.05, 0.1, 1.0), taus=(0.0, 0.01), variants=("paper",), min_tokens=64,
        # a demo shows serving: no second routing embedding, no quality table or heat map
        # (a full build's report has them; `ttmm build --help`)
        embedder_kind="sentence-transformers", test_docs=0, heatmap=False)
    t0 = time.time()
    build(cfg)
    print(f"[demo] library {out} ready in {time.time() - t0:.0f} s", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    from ttmm_vllm.cli.generate import format_routing
    from ttmm_vllm.client import TTMMClient
    from ttmm_vllm.home import ttmm_home
    from ttmm_vllm.loop import LoopThread
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    home = ttmm_home(args.home)
    lib_dir = build_demo_library(home, args)
    loop = LoopThread()
    t0 = time.time()
    server = loop.run(start(ServeConfig(
        library=str(lib_dir),
        engine=EngineConfig(merge_path=args.merge_path, max_model_len=1024, max_num_seqs=16,
                            max_loras=8),
        server=ServerConfig(port=0, grace_s=10))))
    target = f"127.0.0.1:{server.port}"
    print(f"[demo] server on {target} (started in {time.time() - t0:.0f} s)\n", flush=True)
    try:
        with TTMMClient(target) as client:
            for prompt in args.prompts or PROMPTS:
                r = client.generate(prompt, max_tokens=args.generate_tokens, timeout=300)
                t = r.timings
                print(f">>> {prompt}")
                print(format_routing(r.routing))
                print(f"    {prompt}\033[1m{r.text}\033[0m")
                print(f"    [{r.completion_tokens} tokens; embed {t.embed_ms:.1f} ms, search "
                      f"{t.search_ms:.2f} ms, merge {t.merge_ms:.1f} ms, register "
                      f"{t.register_ms:.1f} ms, generate {t.generate_ms:.0f} ms]\n", flush=True)
            base = client.generate(PROMPTS[0], max_tokens=args.generate_tokens,
                                   mode="base", timeout=300)
            print(f">>> (base model, no experts) {PROMPTS[0]}\n    {base.text}\n")
    finally:
        loop.run(server.stop(grace=5))
        loop.close()
    print("[demo] server stopped", file=sys.stderr)
    return 0
