"""What every benchmark shares: the library and its test documents, an in-process server,
statistics (bootstrap intervals, percentiles), writers (JSON, markdown, plots) and the tiny
assets of `--smoke`.

Why one place: the three benchmarks must pick test documents, start the product and report
uncertainty the same way, or their tables are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttmm_vllm.home import offline_env  # noqa: F401  (re-exported: the benchmarks own their env)

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("results")  # relative to the working directory (the repo root, git-ignored)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)


# --------------------------------------------------------------------------- statistics


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    """Token-level perplexity over documents: exp(sum nll / sum tokens) (the paper's)."""
    total = float(np.sum(tokens))
    return float(np.exp(np.sum(nll) / total)) if total else math.nan


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) document indices drawn with replacement. Every row of a table uses the
    same draws (same seed), so any two rows can also be compared pairwise."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_perplexity(nll: np.ndarray, tokens: np.ndarray, idx: np.ndarray,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the perplexity when the test documents are resampled."""
    ppl = np.exp(nll[idx].sum(1) / np.maximum(tokens[idx].sum(1), 1))
    a = (1 - level) / 2
    lo, hi = np.quantile(ppl, [a, 1 - a])
    return float(lo), float(hi)


def paired_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                      idx: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """perplexity(a) - perplexity(b) and its paired interval: both rows are recomputed on the
    same resampled documents, so document difficulty (most of the spread) cancels."""
    pa = np.exp(a[0][idx].sum(1) / np.maximum(a[1][idx].sum(1), 1))
    pb = np.exp(b[0][idx].sum(1) / np.maximum(b[1][idx].sum(1), 1))
    d = pa - pb
    q = (1 - level) / 2
    lo, hi = np.quantile(d, [q, 1 - q])
    return {"difference": perplexity(*a) - perplexity(*b), "lo": float(lo), "hi": float(hi),
            "p_a_better": float(np.mean(d < 0))}


# --------------------------------------------------------------------------- writers


def results_dir(name: str, out: str | os.PathLike | None, smoke: bool) -> Path:
    path = Path(out) if out else RESULTS / (f"{name}-smoke" if smoke else name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            return "-"
        if abs(x) >= 1e5:
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "platform": platform.platform(),
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for mod in ("torch", "vllm", "transformers", "peft"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                     capture_output=True, text=True).stdout.strip()
    return info


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_run_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options every library benchmark shares: where results go, and the smoke setting."""
    p.add_argument("--out", default=None, help=f"results folder (default results/{name}-NAME)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model and tiny library, few documents: checks the pipeline only")
    p.add_argument("--assets", default=None, help="--smoke: where the tiny assets live")


def parse_run_args(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with the offline environment set; --smoke points --library at the tiny assets."""
    offline_env()
    args = p.parse_args(argv)
    if args.smoke:
        args.library = args.library or str(smoke_assets(args.assets).library)
    return args


# --------------------------------------------------------------------------- the library


@dataclass(frozen=True)
class TestDoc:
    """A held-out document cut as at test time: the prefix routes (or trains), the suffix is
    scored. `ids` are the base tokenizer's ids of its first `max_tokens` tokens."""

    id: str
    cluster: int
    text: str
    ids: tuple[int, ...]

    def prefix(self, n: int) -> list[int]:
        return list(self.ids[:n])

    def suffix(self, n: int) -> list[int]:
        return list(self.ids[n:])


@dataclass
class BenchLibrary:
    """An opened library plus what the benchmarks need beside it: where its base model and
    embedder are, the build's settings, the holdout and the documents tuning already used."""

    root: Path
    library: Any  # ttmm_vllm.library.Library
    model_dir: Path
    embedder_path: Path
    build: dict[str, Any] = field(default_factory=dict)
    _tokenizer: Any = None

    @classmethod
    def open(cls, root: str | os.PathLike, model_dir: str | os.PathLike | None = None,
             embedder: str | os.PathLike | None = None) -> BenchLibrary:
        from ttmm_vllm.library import Library

        lib = Library.open(root)
        mdir = Path(model_dir).expanduser() if model_dir else lib.served_model_dir()
        lib.check_base_model(mdir)
        emb = Path(embedder).expanduser() if embedder else Path(lib.manifest.embedder.path)
        return cls(lib.root, lib, mdir, emb, dict(lib.manifest.extras.get("build") or {}))

    @property
    def manifest(self):
        return self.library.manifest

    @property
    def num_experts(self) -> int:
        return self.library.num_experts

    @property
    def max_tokens(self) -> int:
        return int(self.build.get("max_tokens", 1024))

    @property
    def query_tokens(self) -> int:
        return int(self.manifest.router.query_tokens)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    def holdout(self) -> list[dict]:
        from ttmm_vllm.library import HOLDOUT

        path = self.root / self.manifest.extras.get("holdout", HOLDOUT)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the library has no holdout documents (built by "
                                    "`ttmm build`, which holds out a share of each cluster)")
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]

    def tuning_documents(self) -> set[str]:
        """Holdout documents the build tuned beta/tau on: never used as test documents."""
        path = self.root / self.manifest.extras.get("report", "report.json")
        with contextlib.suppress(OSError, ValueError):
            tuning = json.loads(path.read_text()).get("tuning") or {}
            return set(tuning.get("eval_documents") or ())
        return set()

    def test_documents(self, n: int, prefix_tokens: int, *, min_suffix: int = 16,
                       seed: int = 0) -> list[TestDoc]:
        """Up to `n` holdout documents, round-robin over clusters (each cluster's pool in a
        seeded order), so every cluster is represented as the paper's one-per-cluster test set
        is; documents the build tuned on and documents too short for the prefix are left out."""
        from training.evaluate import tokenize

        tuned = self.tuning_documents()
        docs = [d for d in self.holdout() if d["id"] not in tuned]
        ids = tokenize(self.tokenizer, [d["text"] for d in docs], self.max_tokens)
        by_cluster: dict[int, list[TestDoc]] = {}
        for d, t in zip(docs, ids, strict=True):
            if len(t) >= prefix_tokens + min_suffix:
                by_cluster.setdefault(int(d["cluster"]), []).append(
                    TestDoc(d["id"], int(d["cluster"]), d["text"], tuple(t)))
        rng = np.random.default_rng(seed)
        pools = [[pool[i] for i in rng.permutation(len(pool))]
                 for _, pool in sorted(by_cluster.items())]
        picked: list[TestDoc] = []
        while len(picked) < n and any(pools):
            for pool in pools:
                if pool and len(picked) < n:
                    picked.append(pool.pop(0))
        if not picked:
            raise ValueError(f"no holdout document has {prefix_tokens} + {min_suffix} tokens "
                             "(lower --prefix-tokens)")
        return picked


def prompts(bench: BenchLibrary, n: int, tokens: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts of `tokens` tokens cut from holdout documents (windows further into
    each document once every document has been used), for the cost benchmarks: distinct
    prompts route differently, so no request reuses another's merged adapter by accident."""
    from training.evaluate import tokenize

    docs = bench.holdout()
    order = np.random.default_rng(seed).permutation(len(docs))
    ids = tokenize(bench.tokenizer, [docs[i]["text"] for i in order], bench.max_tokens)
    out: list[str] = []
    seen: set[str] = set()
    shift = 0
    while len(out) < n and shift < bench.max_tokens:
        for t in ids:
            window = t[shift:shift + tokens]
            if len(window) < max(4, tokens // 2):
                continue
            text = bench.tokenizer.decode(window)
            if text.strip() and text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
        shift += max(1, tokens // 3)
    if len(out) < n:
        raise ValueError(f"could cut only {len(out)} distinct prompts from the holdout")
    return out


# --------------------------------------------------------------------------- the product


@dataclass
class Served:
    """The real gRPC server, in this process, on a free local port."""

    loop: Any  # ttmm_vllm.loop.LoopThread
    server: Any  # ttmm_vllm.serve.grpc_server.Server
    target: str
    startup_s: float

    def client(self):
        from ttmm_vllm.client import TTMMClient

        # no default deadline: a benchmark's requests queue behind each other by design
        c = TTMMClient(self.target, max_message_bytes=64 << 20, timeout=None)
        c.wait_ready(60)
        return c


@contextlib.contextmanager
def serve(bench: BenchLibrary, engine: Any, *, max_inflight: int = 4096) -> Iterator[Served]:
    """TTMMService + Server started the way `ttmm serve` starts them; stopped on exit.

    engine: a ttmm_vllm.serve.engine.EngineConfig. max_inflight is raised above the server's
    default because the throughput benchmark may hold 32 x 10 requests at once.
    """
    from ttmm_vllm.loop import LoopThread
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.grpc_server import ServerConfig

    loop = LoopThread()
    t0 = time.perf_counter()
    config = ServeConfig(library=str(bench.library.root), engine=engine,
                         server=ServerConfig(port=0, max_inflight=max_inflight, grace_s=5),
                         base_model=str(bench.model_dir) if bench.model_dir else None,
                         embedder=str(bench.embedder_path) if bench.embedder_path else None)
    server = loop.run(start(config), timeout=900)
    served = Served(loop, server, f"127.0.0.1:{server.port}", time.perf_counter() - t0)
    log(f"server up on {served.target} in {served.startup_s:.0f}s "
        f"(merge_path={engine.merge_path})")
    try:
        yield served
    finally:
        with contextlib.suppress(Exception):
            loop.run(server.stop(grace=2), timeout=120)
        loop.close()


def routing_of(pb_routing) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(expert ids, weights) of a response's Routing message."""
    return (tuple(int(e.expert_id) for e in pb_routing.experts),
            tuple(float(e.weight) for e in pb_routing.experts))


# --------------------------------------------------------------------------- smoke assets


@dataclass(frozen=True)
class SmokeAssets:
    model_dir: Path
    embedder_dir: Path
    library: Path


def smoke_assets(root: str | os.PathLike | None = None) -> SmokeAssets:
    """A tiny model, a tiny embedder and a tiny library built by the real `ttmm build`
    (K=4 experts, a multitask adapter, tuned defaults, holdout, cached embeddings) in under a
    minute, so `--smoke` exercises every path the real runs take. Reused when present."""
    from training.config import BuildConfig
    from training.documents import save_jsonl
    from training.pipeline import build
    from ttmm_vllm import testing as tiny
    from ttmm_vllm.library import MANIFEST

    root = Path(root) if root else RESULTS / "smoke-assets"
    root.mkdir(parents=True, exist_ok=True)
    model, emb, lib = root / "tiny-llama", root / "tiny-embedder", root / "library"
    corpus = tiny.synthetic_corpus(docs_per_topic=24)
    if not (model / "config.json").exists():
        tiny.build_tiny_llama(model, [d["text"] for d in corpus])
    if not (emb / "modules.json").exists():
        tiny.build_tiny_embedder(emb, [d["text"] for d in corpus])
    if not (lib / MANIFEST).exists():
        src = root / "corpus.jsonl"
        save_jsonl(src, corpus)
        log(f"building the smoke library in {lib}")
        build(BuildConfig(corpus=str(src), out=lib, base_model=model, embedder=emb, k=4,
                          max_tokens=96, query_tokens=16, holdout_fraction=0.2, lr=1e-3,
                          multitask=True, tune_docs=4, betas=(0.05, 0.5), taus=(0.0,),
                          variants=("paper",), max_active=3, threads=1,
                          # the plain library the benchmarks compare (issue 12's options off)
                          branch_from_multitask="off", embedder_kind="sentence-transformers",
                          test_docs=8, heatmap=False))
    return SmokeAssets(model, emb, lib)
