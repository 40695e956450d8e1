"""One typed object for a library build: every knob of `ttmm build`, its default and its help.

The CLI builds the parser from these fields (ttmm_vllm/cli/build.py), so a knob is
declared once, here. Defaults follow the paper (Appendix E, Table 3) where they fit a CPU:
lr 2e-4, AdamW (0.9, 0.999, 1e-8, weight decay 0.01), batch 4, LoRA alpha 16, one epoch on the
first 1024 tokens of each document; rank 16 instead of 64, and K 16 instead of 100.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttmm_vllm.library import LLAMA_TARGETS

VARIANTS = ("paper", "threshold")
EMBEDDER_KINDS = ("sentence-transformers", "base-hidden")
ROUTING_EMBEDDINGS = (*EMBEDDER_KINDS, "auto")
BRANCH_MODES = ("auto", "on", "off")
BISECTING_STRATEGIES = ("biggest_inertia", "largest_cluster")


def knob(default: Any, help: str, *, flag: str | None = None, cli: bool = True,
         const: Any = None) -> Any:
    """A config field with its help text (and optionally its CLI flag) kept beside it.
    `const`: the value of the flag given without an argument (`--ray` alone)."""
    meta = {"help": help, "flag": flag, "cli": cli, "const": const}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process trains the experts whose id % n == i."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


@dataclass(frozen=True)
class BuildConfig:
    # ---- inputs and outputs
    corpus: str = knob("", "corpus spec: a JSONL file, a text folder, 'wiki', 'python', "
                           "'hf:<dataset>' (see training.sources)")
    out: Path = knob(Path(), "library directory to write")
    base_model: Path = knob(Path(), "base model folder (Hugging Face format, safetensors)")
    embedder: Path = knob(Path(), "sentence-transformers model folder: clusters the corpus "
                                  "and is one routing embedding (optional with "
                                  "--embedder-kind base-hidden)")
    embedder_kind: str = knob(
        "auto",
        "the query/centroid embedding the library routes with: 'sentence-transformers' "
        "(--embedder), 'base-hidden' (the base model's mean-pooled last hidden states; no "
        "embedder folder needed) or 'auto' (both are scored on the tuning documents by "
        "pass@1, is a document's own cluster the top centroid for its prefix, and the better "
        "is kept; a tie keeps sentence-transformers, the cheaper one to serve). The clusters "
        "always come from --embedder when it is given")
    work_dir: Path | None = knob(None, "stage cache (default: OUT/.build); delete it to redo "
                                       "every stage")
    home: Path | None = knob(None, "TTMM_HOME for named corpora", cli=False)
    limit: int | None = knob(None, "read at most this many documents from the corpus")
    # ---- documents and clusters
    max_tokens: int = knob(1024, "keep the first N tokens (base tokenizer) of each document")
    min_tokens: int = knob(8, "drop documents shorter than this many tokens")
    k: int = knob(16, "number of clusters = experts (K)", flag="-K")
    bisecting_strategy: str = knob(
        "biggest_inertia",
        "which cluster BisectingKMeans splits next. The paper splits the cluster with the "
        "largest diameter; scikit-learn offers 'biggest_inertia' (largest sum of squared "
        "distances: a spread measure, the closer stand-in) and 'largest_cluster' (most points)")
    holdout_fraction: float = knob(0.05, "fraction of each cluster held out for tuning and "
                                         "evaluation (at least one document when the cluster "
                                         "has two or more)")
    max_docs_per_expert: int | None = knob(None, "train each expert on at most N documents "
                                                 "of its cluster (a CPU budget)")
    # ---- LoRA training
    rank: int = knob(16, "LoRA rank")
    alpha: float = knob(16.0, "LoRA alpha (scaling = alpha / rank)")
    target_modules: tuple[str, ...] = knob(LLAMA_TARGETS, "module names LoRA adapts")
    shared_a: bool = knob(
        False,
        "experts share one frozen A per module: a seeded random A, identical for every expert "
        "(its seed is fixed, independent of --seed and of each expert's own seed), and only "
        "B is trained per expert. A weighted merge of such experts is exact at rank r "
        "(sum_k w_k B_k A = (sum_k w_k B_k) A) and serves like a single rank-r adapter. The "
        "multitask adapter, if any, trains normally (its own A); starting the shared A from "
        "it when the experts branch from it is a possible later refinement")
    lr: float = knob(2e-4, "AdamW learning rate (constant)")
    batch_size: int = knob(4, "documents per optimisation step")
    weight_decay: float = knob(0.01, "AdamW weight decay")
    adam_betas: tuple[float, ...] = knob((0.9, 0.999), "AdamW betas")
    adam_eps: float = knob(1e-8, "AdamW epsilon")
    epochs: int = knob(1, "passes over each cluster (the paper: one)")
    seed: int = knob(0, "seed for clustering, data order and LoRA initialisation")
    workers: int = knob(1, "parallel expert-training processes on this machine")
    threads: int = knob(0, "torch threads per training process (0: cores / workers)")
    shard: str = knob("0/1", "train only experts with id %% n == i ('i/n'); the last shard "
                             "to finish (or a plain rerun) writes the library")
    multitask: bool = knob(False, "also train one adapter on all experts' training documents "
                                  "(the fine-tuning baseline, equal token budget)")
    branch_from_multitask: str = knob(
        "auto",
        "train the experts from the multitask model instead of the base: the multitask adapter "
        "is folded into the base weights (a checkpoint in the library, branched/base, served "
        "under the experts) and each expert is trained from it on its cluster. 'on' (or the "
        "bare flag; implies --multitask), 'off' (experts from the base, the paper), or 'auto': "
        "when --multitask is given, train both expert sets, tune each on the tuning documents "
        "and keep the one with the lower tuned perplexity (without tuning, 'auto' branches: "
        "it won on both corpora measured, see the notes)",
        const="on")
    compute_matched: bool = knob(
        True,
        "when the experts branch from the multitask model, also train the compute-matched "
        "fine-tuning baseline: the multitask adapter trained for as many tokens as the "
        "branched library used in all (the same documents, twice the epochs: the multitask "
        "pass plus the experts' pass), in the library's multitask-matched/ folder, a row of "
        "the report's quality table. A plain library needs none: its experts make one pass "
        "over the multitask adapter's documents, so that adapter is already compute-matched")
    # ---- Ray (optional: pip install 'ttmm-vllm[ray]'; training/ray_build.py)
    ray: str | None = knob(None, "train the experts as Ray tasks: 'local' (or the bare flag) "
                                 "starts a Ray on this machine, 'auto' joins the running "
                                 "cluster, or a cluster address (host:port, ray://host:port)",
                           const="local")
    ray_cpus: float = knob(1.0, "CPUs each Ray expert task reserves (and its torch threads "
                                "when --threads is 0)")
    ray_gpus: float = knob(0.0, "GPUs each Ray expert task reserves")
    ray_memory: float | None = knob(None, "memory (GiB) each Ray expert task reserves "
                                          "(for scheduling)")
    ray_retries: int = knob(3, "reruns of an expert task whose Ray worker died")
    # ---- routing and tuning
    query_tokens: int = knob(50, "prefix tokens used as the routing query (and the tuning "
                                 "split: prefix -> routing, suffix -> perplexity)")
    max_active: int = knob(10, "most experts merged for one prompt (the default when not "
                               "tuning, and the cap on --active-counts)")
    active_counts: tuple[int, ...] = knob((1, 3, 10), "max_active values tuning tries (those "
                                                     "above --max-active are dropped)")
    tune: bool = knob(True, "tune beta/tau/max_active on the holdout (else keep the paper's "
                            "defaults)")
    tune_docs: int = knob(128, "holdout documents used for tuning (spread over clusters)")
    test_docs: int = knob(128, "further holdout documents, never tuned on, that the report's "
                               "quality table and heat map are measured on")
    heatmap: bool = knob(True, "score every expert alone on the test documents: the expert x "
                               "cluster heat map (the paper's Figure 6, left); costs one "
                               "evaluation pass per expert")
    betas: tuple[float, ...] = knob((0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 10.0),
                                    "temperatures tried (cos / beta); large values reach "
                                    "near-uniform weights over the active experts")
    taus: tuple[float, ...] = knob((0.0, 0.01, 0.03), "sparsity thresholds tried "
                                                      "(each must be < 1/K)")
    variants: tuple[str, ...] = knob(VARIANTS, "sparse-softmax variants tried: 'paper' "
                                               "(ReLU(p - tau), renormalised) and 'threshold' "
                                               "(keep p > tau; the public code)")
    ood_percentile: float = knob(1.0, "ood_threshold = this percentile of the holdout "
                                      "prefixes' top centroid similarity")
    eval_batch_size: int = knob(8, "documents per forward pass when evaluating")
    embed_batch_size: int = knob(64, "texts per embedding batch")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(bool(self.corpus), "corpus is required (a JSONL path or a named corpus)")
        need(str(self.out) not in ("", "."), "out (the library directory) is required")
        need(self.embedder_kind in ROUTING_EMBEDDINGS,
             f"embedder_kind {self.embedder_kind!r} is not one of {ROUTING_EMBEDDINGS}")
        need(self.has_sentence_embedder or self.embedder_kind == "base-hidden",
             f"embedder is required with embedder_kind {self.embedder_kind!r} (only "
             "'base-hidden' embeds with the base model alone)")
        need(self.branch_from_multitask in BRANCH_MODES,
             f"branch_from_multitask {self.branch_from_multitask!r} is not one of "
             f"{BRANCH_MODES}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        need(self.max_tokens >= 2, f"max_tokens must be >= 2, got {self.max_tokens}")
        need(1 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [1, max_tokens={self.max_tokens}], got {self.min_tokens}")
        need(self.k >= 1, f"K must be >= 1, got {self.k}")
        need(self.bisecting_strategy in BISECTING_STRATEGIES,
             f"bisecting_strategy {self.bisecting_strategy!r} is not one of "
             f"{BISECTING_STRATEGIES}")
        need(0 <= self.holdout_fraction < 1,
             f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        need(self.max_docs_per_expert is None or self.max_docs_per_expert >= 1,
             f"max_docs_per_expert must be >= 1, got {self.max_docs_per_expert}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(len(self.target_modules) > 0, "target_modules must name at least one module")
        need(math.isfinite(self.lr) and 0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        need(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        parse_shard(self.shard)
        if self.ray is not None:
            from training.ray_build import RayOptions

            RayOptions.from_config(self)  # checks the Ray knobs, naming value and limit
        need(self.query_tokens >= 1, f"query_tokens must be >= 1, got {self.query_tokens}")
        need(self.query_tokens < self.max_tokens,
             f"query_tokens ({self.query_tokens}) must be < max_tokens ({self.max_tokens}): "
             "the suffix after the query is what tuning scores")
        need(self.max_active >= 1, f"max_active must be >= 1, got {self.max_active}")
        need(len(self.active_counts) > 0 and all(c >= 1 for c in self.active_counts),
             f"active_counts must be numbers >= 1, got {self.active_counts}")
        need(self.tune_docs >= 1, f"tune_docs must be >= 1, got {self.tune_docs}")
        need(self.test_docs >= 0, f"test_docs must be >= 0, got {self.test_docs}")
        need(len(self.betas) > 0 and all(math.isfinite(b) and b > 0 for b in self.betas),
             f"betas must be finite numbers > 0, got {self.betas}")
        need(len(self.taus) > 0 and all(0 <= t < 1 / self.k for t in self.taus),
             f"taus must be in [0, 1/K) = [0, {1 / self.k:.4g}), got {self.taus}")
        need(len(self.variants) > 0 and all(v in VARIANTS for v in self.variants),
             f"variants must be among {VARIANTS}, got {self.variants}")
        need(0 <= self.ood_percentile <= 100,
             f"ood_percentile must be in [0, 100], got {self.ood_percentile}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got "
                                        f"{self.eval_batch_size}")
        need(self.embed_batch_size >= 1, f"embed_batch_size must be >= 1, got "
                                         f"{self.embed_batch_size}")

    # ---- derived

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out) / ".build"

    @property
    def shard_index(self) -> tuple[int, int]:
        return parse_shard(self.shard)

    @property
    def has_sentence_embedder(self) -> bool:
        return str(self.embedder) not in ("", ".")

    @property
    def cluster_embedder_kind(self) -> str:
        """What the corpus is clustered with: the sentence embedder when one is given."""
        return "sentence-transformers" if self.has_sentence_embedder else "base-hidden"

    @property
    def routing_candidates(self) -> tuple[str, ...]:
        """The routing embeddings this build scores (one unless embedder_kind is 'auto')."""
        if self.embedder_kind == "auto":
            return EMBEDDER_KINDS
        return (self.embedder_kind,)

    @property
    def branch_mode(self) -> str:
        """'off' (experts from the base), 'on' (from the folded multitask model) or
        'compare' (both, the tuned holdout perplexity decides): `branch_from_multitask`
        resolved against --multitask and --tune."""
        mode = self.branch_from_multitask
        if mode == "auto":
            if not self.multitask:
                return "off"
            return "compare" if self.tune else "on"
        return mode

    @property
    def trains_multitask(self) -> bool:
        return self.multitask or self.branch_mode != "off"

    @property
    def tuned_active_counts(self) -> tuple[int, ...]:
        """The max_active values tuning tries: --active-counts capped at --max-active."""
        return tuple(sorted({c for c in self.active_counts if c <= self.max_active}
                            | {self.max_active}))

    @property
    def torch_threads(self) -> int:
        import os

        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple)
                                                               else v)
        return out

    def subset(self, *names: str) -> dict[str, Any]:
        """The named fields as JSON: the key a cached stage is valid for."""
        full = self.to_json()
        return {n: full[n] for n in names}
