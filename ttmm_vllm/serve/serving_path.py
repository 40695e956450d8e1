"""Which way a library's merges are served: the cost model behind `--worker-merge auto`.

A decode step with S requests in flight, each with its own routing over K experts of rank r,
computes per token and LoRA projection (in -> out), and reads per step:

    mix (all experts resident, one product over the union U of the batch's experts):
        |U| * r * (in + out) multiply-adds per token, |U| <= min(K, S * max_active);
        exact, and nothing to build per request
    slots (each request's merge as one adapter of rank b in vLLM's slots, all slots in one
    batched product: ops.batched_lora_linear):
        b * (in + out) per token, and S * b * (in + out) weights read per step
        (shared-A experts: one shrink for every slot, ops.shared_a_lora_linear, and b = r)

Slots cost does not depend on K; mix grows with the union. On a CPU the two are bound by
different things, which sets the threshold below (SmolLM2-135M: sum(in + out) over a layer's
projections is 10176, so an adapter of rank b holds b * 10176 * 30 weights):

    mix:   2 * T * |U| * r * sum(in + out) flops, at the GEMM rate F (~90 GFLOP/s a core here)
    slots: S * b * sum(in + out) * 4 bytes read (T = S at decode), at the streaming rate M of
           a batched row-vector product (~12-20 GB/s here; 32 rank-16 slots read 625 MB a
           step, more than the base model's 540 MB of weights)
    mix / slots = |U| * r * M / (2 * b * F) ~= |U| * r / (150 to 240) at b = 16

so mix wins (and costs nothing at admission) while the union's rank is well under ~150, and
loses above it. Measured on SmolLM2-135M with 32 concurrent requests, 10 random rank-16 experts
each (benchmarks/results/lora_throughput/scale.md: `python -m benchmarks.lora_throughput
--library-size 16 64 256 1024`), decode throughput as a ratio to the base model:

    K                         16     64     256    1024
    mix                       0.44   0.23   0.07   (bank of 20 GB: not run)
    slots, compressed to 16   0.64   0.65   0.66   0.63
    slots, shared-A (exact)   0.70   0.72   0.70   0.71

(`ttmm serve`'s thread layout; medians of 3 paired rounds, which still differ by ~0.05 on
this shared machine). The slots' ceiling here is memory, not the op: 32 rank-16 slots read
625 MB a step, and the plugin's op over them takes ~34-42 ms against the base's ~87 ms step
(benchmarks/results/decode_bound: a bare `bmm` over the same buffers ~28 ms), so compressed
slots cannot decode faster than ~0.68-0.72x of the base on this CPU, at any K; shared-A slots
read half (no A per slot), ceiling ~0.80. The same count for a 1B Llama gives ~0.93: the
ceiling is set by the adapter's share of the model's weights, 4.6% per rank-16 slot here. So:

- shared-A libraries (`LoraSpec.shared_a`): slots ("expand") at rank r, always. The merge
  (sum_k w_k s_k B_k) A is exact at rank r and costs one weighted sum of B's at admission.
- other libraries: "mix" while the whole library is small (K * r <= MIX_MAX_RANK = 128: its
  union then costs at most about half a slot batch, and it is exact with nothing to build),
  "expand" compressed to rank b above it (its error is reported per request as
  `compression_error`; admission computes the optimal rank-b approximation: 0.32-0.52 s a
  request in the worker on SmolLM2, 4-6 base decode steps; the two R x R Grams that make the
  error exact are 15.6 GFLOP, ~1.7 steps of one core, and a Gram-free randomized sketch that
  gives the exactness up measured no faster: 212-232 ms without power iterations).
- GPUs: the plugin's ops are CPU-only, so always "expand" through vLLM's own LoRA kernels
  (bf16/fp16: vLLM's Triton kernels take nothing else).

Pure: the engine calls `choose` with what it knows; tests call it with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# Above this total library rank (K * r), "auto" serves ordinary libraries from slots, not mix.
MIX_MAX_RANK = 128

# vLLM accepts only these max_lora_rank values.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def allowed_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (capped at 512)."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    return LORA_RANKS[-1]


@dataclass(frozen=True)
class ServingPath:
    """What the engine starts vLLM with, and why (logged at start-up)."""

    worker_merge: str  # "mix" | "expand"
    max_lora_rank: int
    dtype: str
    plugin_ops: bool
    why: str


def choose(*, requested: str, shared_a: bool, num_experts: int, expert_rank: int,
           rank_budget: int | None, on_cpu: bool, dtype: str = "auto",
           plugin_ops: bool = True, mix_max_rank: int = MIX_MAX_RANK) -> ServingPath:
    """The serving path for a library (see the module docstring for the cost model).

    requested: "auto", "mix" or "expand" (`--worker-merge`); rank_budget: the slot rank b for
    compressed merges (None: the experts' rank). Raises ValueError for a combination the
    platform cannot run, so it is refused at start-up, never request by request.
    """
    if requested not in ("auto", "mix", "expand"):
        raise ValueError(f"worker_merge must be 'auto', 'mix' or 'expand', got {requested!r}")
    budget = rank_budget or expert_rank
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"
    if not on_cpu and dtype == "float32":
        raise ValueError("dtype float32: vLLM's GPU LoRA kernels take bfloat16 or float16 "
                         "(use --dtype auto or bfloat16)")
    if not on_cpu:
        if requested == "mix":
            raise ValueError("worker_merge 'mix' needs the plugin's CPU LoRA ops; on a GPU use "
                             "'expand' (or 'auto')")
        plugin_ops = False
    if requested == "mix" and not plugin_ops:
        raise ValueError("worker_merge 'mix' needs the plugin's LoRA ops (drop --no-plugin-ops)")
    if shared_a:
        if requested == "mix":
            return ServingPath("mix", allowed_rank(expert_rank), dtype, plugin_ops,
                               "mix requested")
        return ServingPath("expand", allowed_rank(expert_rank), dtype, plugin_ops,
                           f"shared-A experts: exact merges at rank {expert_rank} in slots")
    if requested == "mix" or (requested == "auto" and on_cpu and plugin_ops
                              and num_experts * expert_rank <= mix_max_rank):
        why = ("mix requested" if requested == "mix" else
               f"library rank {num_experts} x {expert_rank} <= {mix_max_rank}: the resident "
               "library mixed per token (exact)")
        return ServingPath("mix", allowed_rank(expert_rank), dtype, plugin_ops, why)
    why = ("expand requested" if requested == "expand" else
           f"library rank {num_experts} x {expert_rank} > {mix_max_rank}: per-request merges "
           f"in slots at rank {budget} (compressed when larger)")
    return ServingPath("expand", allowed_rank(budget), dtype, plugin_ops, why)
