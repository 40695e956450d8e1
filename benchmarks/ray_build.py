"""The expert library build, local vs `--ray` (issue 10): wall times on the same machine, and
whether the two builds' experts are equal.

Both runs are the real `ttmm build` command with the same arguments, one with `--ray`; each
starts from the same cached documents/embeddings/clusters when `--stages-from` names a
finished build's folder, so the comparison is the expert stage (what Ray distributes) plus
the stages after it. On one machine the point is correctness and no blow-up of overhead, not
a speed-up: the Ray tasks share the same cores.

    python -m benchmarks.ray_build --smoke
    python -m benchmarks.ray_build --stages-from ~/.cache/ttmm/libraries/wiki-k16 -- \\
        --corpus wiki --base-model M/SmolLM2-135M-Instruct --embedder M/all-MiniLM-L6-v2 -K 16 \\
        --max-docs-per-expert 40 --max-tokens 256 --min-tokens 80 --lr 1e-3 --no-tune \\
        --test-docs 0 --no-heatmap
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import log

# the stages before the experts: copied so both builds start at the expert stage
SHARED_STAGES = ("documents.jsonl", "documents.stage.json", "embeddings.npy",
                 "embeddings.stage.json", "clusters.npz", "clusters.stage.json")


def _fresh_build(args: list[str], out: Path, stages_from: Path | None) -> dict[str, Any]:
    """Run one `ttmm build` into a fresh `out`; its wall time and the report's stage times."""
    shutil.rmtree(out, ignore_errors=True)
    if stages_from is not None:
        (out / ".build").mkdir(parents=True)
        for name in SHARED_STAGES:
            shutil.copy2(stages_from / ".build" / name, out / ".build" / name)
    return _run_build(args, out, out.parent / f"{out.name}.log")


def _run_build(args: list[str], out: Path, log_path: Path) -> dict[str, Any]:
    """`ttmm build ARGS --out OUT`: its wall time, the report's expert-stage times and how
    many experts this run trained (0 on a rerun of a finished build)."""
    cmd = [sys.executable, "-m", "ttmm_vllm.cli", "build", *args, "--out", str(out)]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    t = json.loads((out / "report.json").read_text())["timings"]
    return {"wall_s": wall, "expert_stage_s": t["train"]["seconds"],
            "experts_sum_s": t.get("train: experts", {}).get("seconds"),
            "trained": t["train"].get("trained")}


def max_expert_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the two libraries' expert tensors (0.0: bitwise
    equal)."""
    from safetensors.numpy import load_file

    from ttmm_vllm.library import ADAPTER_WEIGHTS

    names = sorted(p.parent.name for p in (a / "experts").glob(f"*/{ADAPTER_WEIGHTS}"))
    other = sorted(p.parent.name for p in (b / "experts").glob(f"*/{ADAPTER_WEIGHTS}"))
    if not names or names != other:
        raise ValueError(f"expert folders differ or are missing: {names} vs {other}")
    worst = 0.0
    for name in names:
        ta = load_file(a / "experts" / name / ADAPTER_WEIGHTS)
        tb = load_file(b / "experts" / name / ADAPTER_WEIGHTS)
        if ta.keys() != tb.keys():
            raise ValueError(f"{name}: different tensor names")
        for k in ta:
            worst = max(worst, float(abs(ta[k].astype("float64") - tb[k]).max()))
    return worst


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    build_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="%(prog)s [options] -- TTMM BUILD ARGS (no --out)")
    p.add_argument("--out", default=None, help="results folder (default results/ray-build)")
    p.add_argument("--smoke", action="store_true", help="the tiny model and corpus, K=4")
    p.add_argument("--assets", default=None, help="--smoke: where the tiny assets live")
    p.add_argument("--stages-from", default=None,
                   help="a finished build whose documents/embeddings/clusters both runs reuse")
    p.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs per Ray expert task")
    a = p.parse_args(own)
    common.offline_env()
    out = Path(a.out) if a.out else common.RESULTS / ("ray-build-smoke" if a.smoke else "ray-build")
    out.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        assets = common.smoke_assets(a.assets)
        corpus = assets.library.parent / "corpus.jsonl"
        build_args = ["--corpus", str(corpus), "--base-model", str(assets.model_dir),
                      "--embedder", str(assets.embedder_dir), "-K", "4", "--max-tokens", "96",
                      "--query-tokens", "16", "--holdout-fraction", "0.2", "--lr", "1e-3",
                      "--no-tune", "--test-docs", "0", "--no-heatmap",
                      "--embedder-kind", "sentence-transformers"]
    if not build_args:
        p.error("give the build's arguments after --, or --smoke")
    stages = Path(a.stages_from).expanduser() if a.stages_from else None
    ray_args = [*build_args, "--ray", "--ray-cpus", str(a.ray_cpus)]
    rows = {"local": _fresh_build(build_args, out / "local", stages),
            "ray": _fresh_build(ray_args, out / "ray", stages),
            # the same command again on the finished Ray build: resume skips every expert
            "ray rerun (all finished)": _run_build(ray_args, out / "ray",
                                                   out / "ray-rerun.log")}
    diff = max_expert_difference(out / "local", out / "ray")
    table = common.markdown_table(
        ["build", "wall s", "x local", "expert stage s", "sum of experts' own s",
         "experts trained"],
        [[name, common.fmt(r["wall_s"], 1), common.fmt(r["wall_s"] / rows["local"]["wall_s"]),
          common.fmt(r["expert_stage_s"], 1), common.fmt(r["experts_sum_s"], 1),
          r["trained"]]
         for name, r in rows.items()])
    text = (f"# Build: local vs --ray\n\n`ttmm build {' '.join(build_args)}`; Ray tasks of "
            f"{a.ray_cpus:g} CPUs\n\n{table}\n\nLargest |local - ray| over every expert "
            f"tensor: {diff:.3g}\n")
    (out / "results.md").write_text(text)
    common.write_json(out / "results.json", {"args": build_args, "rows": rows,
                                             "max_expert_difference": diff,
                                             "environment": common.environment()})
    print(text)


if __name__ == "__main__":
    main()
