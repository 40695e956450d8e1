"""The GPU smoke check: start, route, generate, compare with the PEFT reference, throughput.

For a machine with a GPU and upstream vLLM (`pip install 'ttmm-vllm[cuda]'`):

    python -m benchmarks.gpu_smoke --library LIB [--base-model DIR]

What `ttmm serve` does there by default (serve/serving_path.py): bfloat16, every routed
request's merge built in the worker as one ordinary adapter and served by vLLM's own LoRA
kernels (exact at rank r for shared-A libraries, compressed to the rank budget otherwise).
The check:

1. starts the server the way `ttmm serve` does (`serve.start`), with the default path;
2. routes and generates each prompt (greedy), and scores a continuation;
3. scores the same tokens with transformers + PEFT on the same merged weights
   (`ttmm_vllm.testing.Reference`: PEFT's own `cat` merge), and reports the largest
   log-probability difference (bf16 on a GPU: expect ~1e-2; fp32 on a CPU: ~1e-4) and the
   compression error the server reported;
4. runs 16 concurrent routed requests and 16 concurrent base requests, and reports the
   tokens/s ratio.

On a CPU-only machine, `--no-plugin-ops` runs the same code through vLLM's stock CPU LoRA ops:
the proxy for the GPU path (no plugin op is involved). `--smoke` does so on a tiny model and a
tiny shared-A library (seconds to build; its numbers mean nothing):

    python -m benchmarks.gpu_smoke --smoke --no-plugin-ops

Exit status 1 when the served log-probabilities disagree with the reference beyond --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import log, offline_env

PROMPTS = [
    "The French Revolution was a period of political and societal change in France that",
    "Photosynthesis is the process by which green plants",
    "Jazz is a music genre that originated in the African-American communities of",
    "Jupiter is the fifth planet from the Sun and",
]
SMOKE_PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
    "striker goal keeper league the match referee penalty",
]


def smoke_library(work: Path) -> tuple[Path, Path]:
    """A tiny Llama and a tiny shared-A library over it (ttmm_vllm.testing)."""
    from ttmm_vllm import testing

    docs = testing.synthetic_corpus()
    texts = [d["text"] for d in docs]
    model = testing.build_tiny_llama(work / "tiny-llama", texts)
    embedder = testing.build_tiny_embedder(work / "tiny-embedder", texts)
    lib = testing.build_random_library(work / "library", model, embedder, docs=docs,
                                       shared_a=True)
    return lib, model


def run(args: argparse.Namespace) -> dict:
    from ttmm_vllm.client import TTMMClient
    from ttmm_vllm.library import Library
    from ttmm_vllm.loop import LoopThread
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig
    from ttmm_vllm.testing import Reference

    work = Path(tempfile.mkdtemp(prefix="ttmm-gpu-smoke-"))
    if args.smoke:
        lib_dir, model_dir = smoke_library(work)
        prompts = SMOKE_PROMPTS
    else:
        lib_dir = Path(args.library).expanduser()
        model_dir = Path(args.base_model).expanduser() if args.base_model else None
        prompts = PROMPTS
    lib = Library.open(lib_dir)
    model_dir = model_dir or lib.served_model_dir()
    engine = EngineConfig(max_model_len=512, max_num_seqs=32, max_loras=16,
                          plugin_ops=not args.no_plugin_ops, dtype=args.dtype,
                          kv_cache_bytes=256 << 20)
    loop = LoopThread()
    t0 = time.perf_counter()
    server = loop.run(start(ServeConfig(library=str(lib_dir), engine=engine,
                                        server=ServerConfig(port=0, max_inflight=512),
                                        base_model=str(model_dir))), timeout=1200)
    path = server.service.engine.path
    log(f"server up in {time.perf_counter() - t0:.0f} s: worker_merge={path.worker_merge} "
        f"max_lora_rank={path.max_lora_rank} dtype={path.dtype} ({path.why})")
    reference = Reference(model_dir, lib)
    out: dict = {"serving_path": vars(path), "prompts": []}
    try:
        with TTMMClient(f"127.0.0.1:{server.port}", timeout=None) as client:
            client.wait_ready(60)
            worst = 0.0
            for prompt in prompts:
                over = {"beta": args.beta, "tau": args.tau} if args.beta else {}
                r = client.generate(prompt, max_tokens=args.tokens, timeout=600, **over)
                ids = [e.expert_id for e in r.routing.experts]
                ws = [e.weight for e in r.routing.experts]
                prompt_ids = reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                s = client.score("", "", prompt_token_ids=prompt_ids,
                                 continuation_token_ids=list(r.token_ids), timeout=600,
                                 routing=_explicit(ids, ws))
                want = reference.logprobs(prompt_ids + list(r.token_ids), len(prompt_ids),
                                          ids, ws)
                diff = max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True))
                worst = max(worst, diff)
                out["prompts"].append({"prompt": prompt, "experts": ids, "weights": ws,
                                       "text": r.text, "max_logprob_diff": diff,
                                       "merged_rank": r.routing.merged_rank,
                                       "compression_error": r.routing.compression_error})
                log(f"{prompt[:40]!r}: experts {ids}, rank {r.routing.merged_rank}, "
                    f"compression error {r.routing.compression_error:.3g}, "
                    f"max |logprob - PEFT| {diff:.2e}")
            out["max_logprob_diff"] = worst
            out["throughput"] = throughput(client, prompts, args.tokens)
            log(f"throughput: routed {out['throughput']['routed_tok_s']:.1f} tok/s, base "
                f"{out['throughput']['base_tok_s']:.1f} tok/s, ratio "
                f"{out['throughput']['ratio']:.2f}")
    finally:
        loop.run(server.stop(grace=2), timeout=300)
        loop.close()
    if args.tol is None:
        args.tol = 1e-3 if path.dtype == "float32" else 5e-2
    out["tolerance"] = args.tol
    out["passed"] = out["max_logprob_diff"] <= args.tol
    return out


def _explicit(ids, ws):
    from ttmm_vllm.client import routing_options

    return routing_options(experts=ids, expert_weights=ws)


def throughput(client, prompts, tokens: int, n: int = 16) -> dict:
    """n concurrent greedy requests, routed vs base mode, tokens/s over the same prompts."""
    def batch(mode):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            outs = list(pool.map(lambda i: client.generate(
                prompts[i % len(prompts)] + f" ({i})", max_tokens=tokens, mode=mode,
                timeout=900), range(n)))
        return sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0)

    batch(None)  # warm-up: adapters registered, caches filled
    routed, base = batch(None), batch("base")
    return {"routed_tok_s": routed, "base_tok_s": base, "ratio": routed / base,
            "concurrency": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", help="an expert library (not with --smoke)")
    p.add_argument("--base-model", help="served model folder (default: the library's)")
    p.add_argument("--smoke", action="store_true", help="tiny model and shared-A library")
    p.add_argument("--no-plugin-ops", action="store_true",
                   help="vLLM's stock LoRA ops (the GPU path's proxy on a CPU)")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPUs, float32 on CPUs")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=None,
                   help="routing temperature override (--smoke: 1.0 with tau 0, so every "
                   "prompt merges several experts)")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--tol", type=float, default=None,
                   help="largest allowed |logprob - PEFT| (default 5e-2 bf16/fp16, 1e-3 fp32)")
    p.add_argument("--out", default="results/gpu_smoke")
    args = p.parse_args(argv)
    if not args.smoke and not args.library:
        p.error("--library is required (or --smoke)")
    if args.smoke and args.beta is None:
        args.beta, args.tau = 1.0, 0.0
    offline_env()
    out = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(out, indent=2))
    log(f"{'PASSED' if out['passed'] else 'FAILED'}: max |logprob - PEFT| "
        f"{out['max_logprob_diff']:.2e} (tolerance {args.tol}); results in {args.out}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
