"""Which way a library's merges are served: the cost model behind `--worker-merge auto`.

A decode step with S requests in flight, each with its own routing over K experts of rank r,
reads per LoRA projection (in -> out):

    mix (all experts resident, one product over the union U of the batch's experts):
        |U| * r * (in + out)          with |U| <= min(K, S * max_active)
    slots (each request's merge as one adapter of rank b in vLLM's slots):
        S * b * (in + out)            (shared-A experts: S * r * out + r * in, and b = r)

Slots cost does not depend on K; mix grows with the union, up to the whole library. So:

- shared-A libraries (`LoraSpec.shared_a`): slots ("expand") at rank r, always. The merge
  (sum_k w_k s_k B_k) A is exact at rank r and costs one weighted sum of B's at admission.
- other libraries: "mix" while the whole library's rank K * r is at most S * b (the union can
  never cost more than the slots would), "expand" compressed to rank b above it (its error
  is reported per request as `compression_error`).
- GPUs: the plugin's ops are CPU-only, so always "expand" through vLLM's own LoRA kernels
  (bf16/fp16: vLLM's Triton kernels take nothing else).

Pure: the engine calls `choose` with what it knows; tests call it with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

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
           concurrency: int, rank_budget: int | None, on_cpu: bool, dtype: str = "auto",
           plugin_ops: bool = True) -> ServingPath:
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
                              and num_experts * expert_rank <= concurrency * budget):
        why = ("mix requested" if requested == "mix" else
               f"library rank {num_experts} x {expert_rank} <= {concurrency} requests x "
               f"rank {budget}: mixing the resident library costs no more than slots")
        return ServingPath("mix", allowed_rank(expert_rank), dtype, plugin_ops, why)
    why = ("expand requested" if requested == "expand" else
           f"library rank {num_experts} x {expert_rank} > {concurrency} requests x rank "
           f"{budget}: per-request merges at rank {budget} (compressed when larger)")
    return ServingPath("expand", allowed_rank(budget), dtype, plugin_ops, why)
