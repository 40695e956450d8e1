"""`ttmm demo` (what `make demo` runs): the whole product on embedded defaults.

1. fetch the offline sources (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, Wikipedia extracts);
2. build a small Wikipedia expert library: 1000 articles spread over the corpus clustered
   into K=6 experts of 24 articles (at most 128 tokens) each, the paper's routing defaults
   instead of a tuning grid, no quality table (about two minutes on 2 idle CPU cores; the
   time of each stage is printed). Cached: a second run starts serving at once;
3. start the gRPC server on 127.0.0.1 and send the prompts all at once, each routed to its own
   experts and generated with its own merge, batched together by vLLM; print each prompt's
   experts (the titles of the Wikipedia articles nearest each expert's centroid, then its
   distinctive words; merge weights) and its text beside the base model's;
4. send the same batch to the base model (mode "base") and print both batches' tokens/s;
5. stop the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import BuildConfig

# Broad topics, as six experts over all of Wikipedia are (built with the defaults: countries,
# emperors, chemical elements, composers, life, the arts): most prompts find one expert of
# their own, the last two merge two or three.
PROMPTS = [
    "The Nile is a major river in northeastern Africa that flows",
    "Genghis Khan was the founder and first khan of the Mongol Empire, which",
    "Iron is a chemical element that",
    "Ludwig van Beethoven was a German composer and pianist who",
    "Photosynthesis is the process by which green plants",
    "Impressionism is a 19th-century art movement characterised by",
    "The French Revolution was a period of political and societal change in France that",
    "Tuberculosis is an infectious disease caused by",
]

# The demo library: small enough to build in about two minutes on 2 CPU cores (LoRA training
# of SmolLM2-135M runs at about 270 tokens/s there; 6 x 24 documents of <= 128 tokens are
# about 15k tokens), large enough that each expert has a topic of its own.
K = 6
DOCS_PER_EXPERT = 24
MAX_TOKENS = 128
LIMIT = 1000  # Wikipedia articles clustered (about 800 keep >= MIN_TOKENS), spread evenly
MIN_TOKENS = 64
MAX_ACTIVE = 3  # experts merged per prompt at most (the paper's beta 0.05 and tau 0.01)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fetch, build a small Wikipedia library, serve, query")
    p.add_argument("--home", help="TTMM_HOME (default: $TTMM_HOME, else ~/.cache/ttmm)")
    p.add_argument("-K", dest="k", type=int, default=K, help="experts in the demo library")
    p.add_argument("--docs-per-expert", type=int, default=DOCS_PER_EXPERT,
                   help="training documents per expert")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help="tokens kept per document")
    p.add_argument("--limit", type=int, default=LIMIT,
                   help="Wikipedia articles clustered (spread evenly over the 10,033)")
    p.add_argument("--generate-tokens", type=int, default=40, help="tokens per generation")
    p.add_argument("--merge-path", choices=("worker", "disk"), default="worker",
                   help="merge inside vLLM's worker (plugin) or write rank-expanded adapters "
                   "(as `ttmm serve --merge-path`)")
    p.add_argument("prompts", nargs="*", help="prompts to send at once (default: eight on "
                   "different topics)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ the library

def demo_corpus(wiki: Path, n: int) -> Path:
    """`n` articles spread evenly over the Wikipedia extracts (sorted by title: the first `n`
    would all start with 'A'), as wiki-demo-N.jsonl beside them; written once."""
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    out = wiki.with_name(f"wiki-demo-{n}.jsonl")
    if not out.exists():
        lines = wiki.read_text(encoding="utf-8").splitlines(keepends=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(lines[::max(1, len(lines) // n)][:n]), encoding="utf-8")
        os.replace(tmp, out)
    return out


def demo_config(home: Path, base: Path, embedder: Path, corpus: Path,
                args: argparse.Namespace) -> BuildConfig:
    """The demo's BuildConfig: a serving demo, so no tuning grid (the paper's beta 0.05,
    tau 0.01), no test documents or heat map, no second (base-hidden) routing embedding."""
    from training.config import BuildConfig

    return BuildConfig(
        corpus=str(corpus), home=home, out=home / "libraries" / f"demo-wiki-k{args.k}",
        base_model=base, embedder=embedder, embedder_kind="sentence-transformers",
        k=args.k, max_tokens=args.max_tokens, min_tokens=MIN_TOKENS,
        max_docs_per_expert=args.docs_per_expert, rank=16, alpha=16.0, lr=1e-3,
        query_tokens=48, max_active=MAX_ACTIVE, tune=False, tune_docs=32, test_docs=0,
        heatmap=False)


def library_is_current(cfg: BuildConfig) -> bool:
    """Whether cfg.out holds a finished library built with exactly these settings (its
    manifest records them; the manifest is written last, so it means a complete build)."""
    from ttmm_vllm.library import MANIFEST

    try:
        raw = json.loads((Path(cfg.out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return raw.get("extras", {}).get("build") == json.loads(json.dumps(cfg.to_json()))


def stage_summary(timings: dict[str, dict[str, Any]]) -> str:
    """'documents 4 s, embeddings 38 s, ..., train 70 s (6 trained); total 121 s' from a
    build's timings (report.json); a cached stage says so."""
    parts, total = [], None
    for name, t in timings.items():
        if name == "this run (wall)":
            total = t.get("seconds")
            continue
        if name.startswith("train: "):  # the sum of per-adapter times; "train" is the wall
            continue
        s = t.get("seconds")
        text = f"{name} {_secs(s)}" if s is not None else name
        if t.get("cached"):
            text += " (cached)"
        elif "trained" in t:
            text += f" ({t['trained']} trained)"
        parts.append(text)
    line = ", ".join(parts)
    return f"{line}; total {_secs(total)}" if total is not None else line


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def build_demo_library(home: Path, args: argparse.Namespace) -> Path:
    from training.pipeline import build
    from training.publish import REPORT
    from training.sources.corpora import fetch_wiki
    from training.sources.models import fetch_base_model, fetch_embedder

    t0 = time.perf_counter()
    base = fetch_base_model(home)
    t1 = time.perf_counter()
    embedder = fetch_embedder(home)
    t2 = time.perf_counter()
    corpus = demo_corpus(fetch_wiki(home), args.limit)
    t3 = time.perf_counter()
    print(f"[demo] sources ready in {_secs(t3 - t0)} (base model {_secs(t1 - t0)}, embedder "
          f"{_secs(t2 - t1)}, corpus {_secs(t3 - t2)}) under {home}", flush=True)
    cfg = demo_config(home, base, embedder, corpus, args)
    if library_is_current(cfg):
        print(f"[demo] library {cfg.out} is already built (delete it to rebuild)", flush=True)
        return Path(cfg.out)
    print(f"[demo] building {cfg.k} experts of {cfg.max_docs_per_expert} Wikipedia articles "
          f"(<= {cfg.max_tokens} tokens each) from {args.limit} clustered ...", flush=True)
    t0 = time.perf_counter()
    build(cfg)
    report = json.loads((Path(cfg.out) / REPORT).read_text())
    print(f"[demo] library {cfg.out} built in {_secs(time.perf_counter() - t0)}\n"
          f"[demo] build stages: {stage_summary(report['timings'])}", flush=True)
    acc = report.get("tuning", {}).get("routing_accuracy_top1")
    if acc is not None:
        print(f"[demo] held-out documents routed to their own expert (top-1): {acc:.0%}",
              flush=True)
    return Path(cfg.out)


# ------------------------------------------------------------------ the batches

@dataclass(frozen=True)
class Batch:
    """A batch of requests sent at once: the responses (in prompt order) and its wall time."""

    responses: list[Any]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.responses)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def send_batch(client, prompts: Sequence[str], **options: Any) -> Batch:
    """Every prompt sent at once (`client.generate` is a coroutine: AsyncClient); the batch's
    wall time runs from the first send to the last response."""
    t0 = time.perf_counter()
    responses = await asyncio.gather(*(client.generate(p, **options) for p in prompts))
    return Batch(list(responses), time.perf_counter() - t0)


def throughput_summary(routed: Batch, base: Batch) -> str:
    """Both batches' aggregate tokens/s and their ratio (the cost of a merge per prompt)."""
    n = len(routed.responses)
    ratio = routed.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
    return (f"{n} prompts at once, each with its own merged experts: {routed.tokens} tokens "
            f"in {routed.seconds:.1f} s = {routed.tokens_per_s:.1f} tokens/s\n"
            f"the same {len(base.responses)} prompts on the base model:        {base.tokens} "
            f"tokens in {base.seconds:.1f} s = {base.tokens_per_s:.1f} tokens/s\n"
            f"routed / base throughput: {ratio:.2f}")


def format_experts(routing) -> list[str]:
    """One line per expert a prompt was merged from, heaviest first: weight, id, title."""
    if not routing.experts:
        return ["(no expert: the base model)"]
    lines = [f"{e.weight:.2f}  #{e.expert_id}  {e.title}"
             for e in sorted(routing.experts, key=lambda e: -e.weight)]
    if routing.out_of_reach:
        lines.append("(out of reach: no expert is close to this prompt)")
    return lines


def format_result(i: int, prompt: str, routed, base, *, bold: bool = False,
                  width: int = 100) -> str:
    """A prompt's block: its experts, its routed continuation and the base model's."""
    def wrap(label: str, text: str, strong: bool = False) -> str:
        body = textwrap.fill(" ".join(text.split()), width=width, initial_indent=label,
                             subsequent_indent=" " * len(label))
        return f"\033[1m{body}\033[0m" if strong else body

    t = routed.timings
    lines = [f"[{i}] {prompt}", "    experts:"]
    lines += [f"      {x}" for x in format_experts(routed.routing)]
    lines.append(wrap("    ttmm: ", f"...{routed.text}", bold))
    lines.append(wrap("    base: ", f"...{base.text}"))
    lines.append(f"    [{routed.completion_tokens} tokens; route {t.embed_ms + t.search_ms:.0f} "
                 f"ms, merge {t.merge_ms + t.register_ms:.0f} ms, generate "
                 f"{t.generate_ms / 1000:.1f} s]")
    return "\n".join(lines)


async def query(target: str, prompts: Sequence[str], max_tokens: int) -> tuple[Batch, Batch]:
    """The routed batch, then the same prompts on the base model, each batch sent at once."""
    from ttmm_vllm.client import AsyncClient

    async with AsyncClient(target, timeout=900) as client:
        await client.wait_ready()
        # one short base request first, so neither batch pays the engine's first step
        await client.generate(prompts[0], mode="base", max_tokens=2, temperature=0.0)
        routed = await send_batch(client, prompts, max_tokens=max_tokens, temperature=0.0)
        base = await send_batch(client, prompts, mode="base", max_tokens=max_tokens,
                                temperature=0.0)
    return routed, base


def run(args: argparse.Namespace) -> int:
    from ttmm_vllm.home import ttmm_home
    from ttmm_vllm.loop import LoopThread
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    t_demo = time.perf_counter()
    home = ttmm_home(args.home)
    lib_dir = build_demo_library(home, args)
    prompts = args.prompts or PROMPTS
    loop = LoopThread()
    t0 = time.perf_counter()
    server = loop.run(start(ServeConfig(
        library=str(lib_dir),
        engine=EngineConfig(merge_path=args.merge_path, max_model_len=1024,
                            max_num_seqs=max(16, len(prompts)), max_loras=8),
        server=ServerConfig(port=0, grace_s=10))), timeout=900)
    target = f"127.0.0.1:{server.port}"
    print(f"[demo] server on {target} (started in {_secs(time.perf_counter() - t0)}; "
          f"{_secs(time.perf_counter() - t_demo)} since the demo began)", flush=True)
    try:
        print(f"[demo] sending {len(prompts)} prompts at once ...\n", flush=True)
        routed, base = loop.run(query(target, prompts, args.generate_tokens), timeout=1800)
        bold = sys.stdout.isatty()
        for i, (p, r, b) in enumerate(zip(prompts, routed.responses, base.responses,
                                          strict=True), 1):
            print(format_result(i, p, r, b, bold=bold) + "\n", flush=True)
        print(throughput_summary(routed, base), flush=True)
    finally:
        loop.run(server.stop(grace=5))
        loop.close()
    print("[demo] server stopped", file=sys.stderr)
    return 0
