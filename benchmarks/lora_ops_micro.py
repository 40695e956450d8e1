"""One LoRA layer, no engine: vLLM's stock CPU op vs the plugin's grouped and mix ops.

SmolLM2-135M's packed qkv_proj (576 -> 576 + 192 + 192) and down_proj (1536 -> 576), T tokens
(decode: one per request), each request with its own merge of n rank-16 experts out of a
library of 16. Times are medians over repeats, one thread, as ratios to the base projection
(x @ W.T) on the same tokens.

    .venv/bin/python -m benchmarks.lora_ops_micro [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ttmm_vllm.vllm_plugin.ops import (
    SlotGroup,
    expand_weights,
    group_rows_by_slot,
    grouped_lora_linear,
    mix_lora_linear,
    stack_expert_factors,
)

LAYERS = {"qkv_proj": (576, (576, 192, 192)), "down_proj": (1536, (576,))}
ALLOWED = (16, 64, 256)


def timeit(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def bench_layer(name: str, tokens: int, n: int, seed: int = 0) -> dict:
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    in_dim, outs = LAYERS[name]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    k_lib, r = 16, 16
    x = torch.randn(tokens, in_dim, generator=gen)
    w = torch.randn(sum(outs), in_dim, generator=gen) / in_dim**0.5
    y = torch.zeros(tokens, sum(outs))
    base = timeit(lambda: torch.matmul(x, w.T))

    # The library and each token's routing (token t = request t, one decode token each).
    experts = [[(torch.randn(r, in_dim, generator=gen), torch.randn(o, r, generator=gen))
                for o in outs] for _ in range(k_lib)]
    weights = torch.zeros(tokens, k_lib)
    for t in range(tokens):
        ks = rng.sample(range(k_lib), n)
        weights[t, ks] = torch.rand(n, generator=gen)

    # Slot buffers as vLLM holds them: one rank-expanded merge (rank n*r) per slot.
    max_rank = next(a for a in ALLOWED if a >= n * r)
    a_st = tuple(torch.zeros(tokens, 1, max_rank, in_dim) for _ in outs)
    b_st = tuple(torch.zeros(tokens, 1, o, max_rank) for o in outs)
    for t in range(tokens):
        ks = weights[t].nonzero().flatten().tolist()
        for i in range(len(outs)):
            a_st[i][t, 0, : n * r] = torch.cat([experts[k][i][0] for k in ks])
            b_st[i][t, 0, :, : n * r] = torch.cat([experts[k][i][1] * weights[t, k]
                                                    for k in ks], 1)
    slots = torch.arange(tokens)
    stock = PunicaWrapperCPU(tokens, tokens, "cpu")
    ids = list(range(1, tokens + 1))
    stock.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=True), ids,
                          tokens + 1, 1000)
    groups = [SlotGroup(s, n * r, rows) for s, rows in group_rows_by_slot(slots).items()]
    a_cat, b_slices = stack_expert_factors(experts, [1.0] * k_lib, [r] * k_lib, in_dim, outs)
    col_w = expand_weights(weights, torch.full((k_lib,), r))

    t_stock = timeit(lambda: stock.add_lora_linear(y, x, a_st, b_st, 1.0, outs), 5)
    t_grouped = timeit(lambda: grouped_lora_linear(y, x, a_st, b_st, groups, outs))
    t_mix = timeit(lambda: mix_lora_linear(y, x, a_cat, b_slices, outs, col_w))
    return {"layer": name, "tokens": tokens, "active": n, "max_lora_rank": max_rank,
            "base_us": base * 1e6, "stock_x": t_stock / base, "grouped_x": t_grouped / base,
            "mix_x": t_mix / base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_layer(layer, args.tokens, n) for layer in LAYERS for n in (1, 3, 10)]
    print("| layer | active | max_lora_rank | base us | stock | grouped | mix |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layer']} | {r['active']} | {r['max_lora_rank']} | {r['base_us']:.0f} | "
              f"{r['stock_x']:.1f}x | {r['grouped_x']:.1f}x | {r['mix_x']:.1f}x |")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
