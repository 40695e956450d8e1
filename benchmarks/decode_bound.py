"""The decode step's LoRA cost over a whole model, no engine: the ceiling of serving per-request
merges from slots, and what bounds it.

At decode every request contributes one token, and each token needs its own adapter. With S
requests each holding its own rank-b merge, a step reads S * b * sum(in + out) LoRA weights
(both factors of every adapted projection) and does only 2 flops per weight read: it streams
memory. The base model's step, by contrast, reads its weights once for all S tokens and is
bound by GEMM speed. So on a CPU the slots' share of a step is (bytes read) / (streaming rate),
whatever the library size: this benchmark measures that rate and the ceiling it sets.

SmolLM2-135M shapes (30 layers of packed qkv 576 -> 576+192+192, o 576 -> 576, packed gate_up
576 -> 1536+1536, down 1536 -> 576; `--model llama-3.2-1b` for a 1B model's), S slots in vLLM's
buffer layout, one token each. Timed, in interleaved rounds (median; the machine is shared):

    base:          the base projections, x @ W^T, every layer (the GEMM-bound part of a step)
    plugin op:     ops.batched_lora_linear over the slots (what `ttmm serve` runs)
    bare bmm:      the same two batched products per slice with nothing around them (the
                   op's floor in this form)
    shared-A op:   ops.shared_a_lora_linear (shared-A merges: one shrink for every slot)

and reports MB read a step, the streaming rate, and the ceiling base / (base + LoRA) for the
projections alone. A real step also spends time outside the projections (attention, norms,
sampling), which LoRA does not add to, so pass the engine's measured base step time
(`--base-step-ms`, e.g. 1000 * 32 / base decode tok/s from benchmarks.lora_throughput) for the
whole-step ceiling.

    .venv/bin/python -m benchmarks.decode_bound [--model smollm2-135m] [--slots 32] [--rank 16]
        [--threads 1] [--base-step-ms 88] [--rounds 7] [--out benchmarks/results/decode_bound]

Why it matters: LoRA time / base time = (4 W_b / M) / (2 P / F) = 2 W_b F / (P M) per token,
with W_b = b * sum(in + out) * layers the weights of one rank-b adapter, P the model's
projection weights, F the GEMM rate and M the streaming rate. It does not depend on S or K,
and falls with model width: SmolLM2-135M (W_b / P ~ 4.6%) is the worst case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment
from ttmm_vllm.vllm_plugin.ops import SlotBatch, batched_lora_linear, shared_a_lora_linear


def llama_shapes(hidden: int, inter: int, kv: int) -> tuple:
    """Packed LoRA layers -> (in, output slices), as vLLM's punica wrapper sees a Llama:
    qkv_proj, o_proj, gate_up_proj, down_proj."""
    return ((hidden, (hidden, kv, kv)), (hidden, (hidden,)), (hidden, (inter, inter)),
            (inter, (hidden,)))


# name -> (layers, shapes): the model served here, and a 1B model for how the ceiling scales
MODELS = {"smollm2-135m": (30, llama_shapes(576, 1536, 192)),
          "llama-3.2-1b": (16, llama_shapes(2048, 8192, 512))}
LAYERS, SHAPES = MODELS["smollm2-135m"]
OUT = Path(__file__).resolve().parent / "results" / "decode_bound"


def lora_bytes(slots: int, rank: int, layers: int = LAYERS, shapes=SHAPES,
               elem: int = 4) -> int:
    """Bytes of LoRA weights a decode step reads: every slot's A (rank x in) and B (out x
    rank) of every slice of every layer."""
    per_layer = sum(rank * (din + dout) for din, outs in shapes for dout in outs)
    return slots * layers * per_layer * elem


def build(slots: int, rank: int, layers: int, shapes=SHAPES, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = []
    for _ in range(layers):
        layer = []
        for din, outs in shapes:
            layer.append({
                "w": torch.randn(sum(outs), din, generator=g) / din**0.5,
                "a": tuple(torch.randn(slots, 1, rank, din, generator=g) for _ in outs),
                "b": tuple(torch.randn(slots, 1, o, rank, generator=g) for o in outs),
                "a_shared": torch.randn(len(outs) * rank, din, generator=g),
                "outs": outs})
        model.append(layer)
    xs = {din: torch.randn(slots, din, generator=g) for din, _ in shapes}
    ys = {sum(outs): torch.zeros(slots, sum(outs)) for _, outs in shapes}
    # decode: one token per slot, tokens in an order other than the slots'
    batch = SlotBatch(torch.arange(slots), torch.randperm(slots, generator=g), rank)
    return {"model": model, "x": xs, "y": ys, "batch": batch}


def step_fns(m: dict) -> dict:
    model, xs, ys, batch = m["model"], m["x"], m["y"], m["batch"]

    def base():
        for layer in model:
            for p in layer:
                xs[p["w"].shape[1]] @ p["w"].T

    def plugin():
        for layer in model:
            for p in layer:
                batched_lora_linear(ys[sum(p["outs"])], xs[p["w"].shape[1]], p["a"], p["b"],
                                    batch, p["outs"])

    def bare():
        for layer in model:
            for p in layer:
                x = xs[p["w"].shape[1]].unsqueeze(1)
                for a, b in zip(p["a"], p["b"], strict=True):
                    torch.bmm(torch.bmm(x, a[:, 0].transpose(1, 2)), b[:, 0].transpose(1, 2))

    def shared():
        for layer in model:
            for p in layer:
                shared_a_lora_linear(ys[sum(p["outs"])], xs[p["w"].shape[1]], p["a_shared"],
                                     p["b"], batch, p["outs"])

    return {"base": base, "plugin op": plugin, "bare bmm": bare, "shared-A op": shared}


def measure(fns: dict, rounds: int) -> dict[str, float]:
    """Median ms per call of each function, rounds interleaved (one of each per round)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def report(ms: dict[str, float], slots: int, rank: int, layers: int,
           base_step_ms: float | None, shapes=SHAPES) -> list[dict]:
    """One row per LoRA form: ms, MB read, GB/s, and the ceilings it implies."""
    nbytes = lora_bytes(slots, rank, layers, shapes)
    # shared-A slots hold no A of their own: the same count with every input width 0
    shared_bytes = lora_bytes(slots, rank, layers, tuple((0, outs) for _, outs in shapes))
    rows = []
    for name in ("plugin op", "bare bmm", "shared-A op"):
        read = shared_bytes if name.startswith("shared") else nbytes
        row = {"form": name, "ms": ms[name], "mb_read": read / 1e6,
               "gb_s": read / 1e9 / (ms[name] / 1e3),
               "projections_ceiling": ms["base"] / (ms["base"] + ms[name])}
        if base_step_ms:
            row["step_ceiling"] = base_step_ms / (base_step_ms + ms[name])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m",
                   help="whose projection shapes (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="default: the model's")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--base-step-ms", type=float, default=None,
                   help="the engine's base decode step (ms) for the whole-step ceiling")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, shapes = MODELS[args.model]
    args.layers = args.layers or layers
    ms = measure(step_fns(build(args.slots, args.rank, args.layers, shapes)), args.rounds)
    rows = report(ms, args.slots, args.rank, args.layers, args.base_step_ms, shapes)
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    config = dict(vars(args), base_ms=ms["base"], **environment())
    (out / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    lines = ["| LoRA form | ms a step | MB read a step | GB/s | ceiling, projections | "
             "ceiling, whole step |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        step = f"{r['step_ceiling']:.2f}" if "step_ceiling" in r else "-"
        lines.append(f"| {r['form']} | {r['ms']:.1f} | {r['mb_read']:.0f} | {r['gb_s']:.1f} | "
                     f"{r['projections_ceiling']:.2f} | {step} |")
    text = (f"# Decode-step LoRA cost, {args.model} shapes ({args.layers} layers)\n\n"
            f"`python -m benchmarks.decode_bound {' '.join(argv)}`\n\n"
            f"{args.slots} slots of rank {args.rank}, one token each, {args.threads} thread(s); "
            f"medians of {args.rounds} interleaved rounds. Base projections: "
            f"{ms['base']:.1f} ms a step"
            + (f"; engine's base step: {args.base_step_ms:.0f} ms" if args.base_step_ms else "")
            + ". Ceiling = base / (base + LoRA): the decode ratio slots cannot exceed.\n\n"
            + "\n".join(lines) + "\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
