"""The benchmarks never rot: `python -m benchmarks.run_all --smoke` runs every benchmark end to
end on the tiny model (a tiny `ttmm build` library, the real gRPC server, the reference
baselines) and each writes its JSON, markdown table and plots with every row present and
finite. Speed is not asserted here (the machine is shared); only that everything runs."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality import METHODS
from benchmarks.throughput import MODES
from ttmm_vllm.home import OFFLINE_ENV
from ttmm_vllm.serve.serving_path import MIX_MAX_RANK

REPO = Path(__file__).resolve().parents[2]


def _finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_all_smoke_writes_every_row(tmp_path):
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]

    q = tmp_path / "quality"
    for f in ("results.json", "results.md", "perplexity.png", "experts.png", "cost.png"):
        assert (q / f).stat().st_size > 0, f
    res = json.loads((q / "results.json").read_text())
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == {m.key for m in METHODS}
    for r in rows.values():
        assert _finite(r["perplexity"], *r["ci95"], r["mean_active"]), r["key"]
        assert r["ci95"][0] <= r["perplexity"] <= r["ci95"][1], r["key"]
    assert {(p["a"], p["b"]) for p in res["pairs"]} >= {("ttmm10", "multitask")}
    assert all(_finite(p["difference"], p["lo"], p["hi"]) for p in res["pairs"])
    # the product's Score and the transformers reference agree on the base row
    assert res["checks"]["base"]["max_abs_mean_nll_diff"] < 1e-2
    md = (q / "results.md").read_text()
    assert all(m.name in md for m in METHODS)

    o = tmp_path / "overhead"
    for f in ("results.json", "results.md", "overhead.png"):
        assert (o / f).stat().st_size > 0, f
    res = json.loads((o / "results.json").read_text())
    assert [p["merge_path"] for p in res["paths"]] == ["worker", "disk"]
    for p in res["paths"]:
        assert _finite(p["token_ms_base"], p["token_ms_merged"])
        assert [r["active"] for r in p["rows"]][-1] is None  # the routed row
        for r in p["rows"]:
            assert _finite(r["overhead_ms_p50"], r["overhead_tokens"], r["embed_ms_p50"]), r
    assert _finite(res["ttt"]["overhead_s"], res["summary"]["ttt_over_ttmm"])

    t = tmp_path / "throughput"
    for f in ("results.json", "results.md", "throughput.png"):
        assert (t / f).stat().st_size > 0, f
    res = json.loads((t / "results.json").read_text())
    got = {(r["mode"], r["concurrency"]) for r in res["rows"]}
    assert got == {(m.key, c) for m in MODES for c in res["config"]["concurrency"]}
    for r in res["rows"]:
        assert _finite(r["tokens_per_s"], r["latency_p50_s"], r["latency_p99_s"],
                       r["ratio_to_base"]), r
        assert r["tokens"] > 0

    r = tmp_path / "rerouting"
    for f in ("results.json", "results.md", "rerouting.png"):
        assert (r / f).stat().st_size > 0, f
    res = json.loads((r / "results.json").read_text())
    assert [row["every"] for row in res["rows"]] == [0, 8]
    for row in res["rows"]:
        assert _finite(row["perplexity"], *row["ci95"], row["gen_tok_per_s"]), row
    assert res["rows"][1]["switches_per_doc"] >= 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_build_benchmark_smoke(tmp_path):
    """`benchmarks.ray_build --smoke`: the tiny build local and on a local Ray, timed, and the
    two libraries' experts compared tensor by tensor (equal: same seeds, data order, threads)."""
    pytest.importorskip("ray", reason="Ray is the optional extra ttmm-vllm[ray]")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_build", "--smoke", "--out",
                           str(tmp_path), "--assets", str(tmp_path / "assets")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["rows"]) == ["local", "ray", "ray rerun (all finished)"]
    assert all(_finite(r["wall_s"]) and r["wall_s"] > 0 for r in res["rows"].values())
    assert [r["trained"] for r in res["rows"].values()] == [4, 4, 0]  # the rerun skips all
    assert res["max_expert_difference"] == 0.0
    assert "| ray |" in (tmp_path / "results.md").read_text()


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_library_size_smoke_reports_every_path(tmp_path):
    """`lora_throughput --library-size` on the tiny model: a row per (path, K), the default
    marked with what it resolved to, the merges' real rank and error reported (compressed for
    plain experts above the slot rank, exact for shared-A ones), and the plot written."""
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora_throughput", "--smoke", "--library-size", "4",
         "32", "--distinct-experts", "8", "--mix-max-rank", "256", "--repeats", "2",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    got = {(r["path"], r["library_size"]) for r in rows}
    defaults = {("default", 4), ("default, shared-A library", 4),
                ("default", 32), ("default, shared-A library", 32)}
    assert got == {("base", 4), ("mix", 4), ("expand", 4), ("shared-A expand", 4),
                   ("base", 32), ("expand", 32), ("shared-A expand", 32)} | defaults
    # (mix at K=32 is over --mix-max-rank: skipped)
    for r in rows:
        assert _finite(r["decode_tok_s"], r["decode_ratio"]) and r["decode_tok_s"] > 0
        if r["path"] == "default":
            assert r["resolved"] == ("mix" if r["library_size"] * 16 <= MIX_MAX_RANK
                                     else "expand")
        if r["path"] in ("mix", "expand", "shared-A expand"):  # paired rounds, median ratio
            assert len(r["extra"]["decode_ratios"]) == 2
            assert _finite(r["admission_ms"], r["admission_cold_ms"])  # steady state, cold
            assert r["decode_ratio"] == pytest.approx(statistics.median(
                r["extra"]["decode_ratios"]))
        if r["path"] == "default, shared-A library":
            assert r["resolved"] == "shared-A expand"
    built = {(r["path"], r["library_size"]): r["extra"]["built"] for r in rows
             if r["path"] in ("expand", "shared-A expand")}
    assert built[("expand", 32)]["rank"] == 16 and built[("expand", 32)]["rel_error"] > 0.1
    assert built[("shared-A expand", 32)] == dict(built[("shared-A expand", 32)], rank=16,
                                                  rel_error=0.0)
    assert (tmp_path / "scale.png").stat().st_size > 0


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_smoke_runs_the_gpu_path_on_vllm_stock_ops(tmp_path):
    """The GPU path's code (merges built in the worker as ordinary adapters, served by vLLM's
    own LoRA ops, no plugin op) through `serve.start`, against transformers + PEFT."""
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_smoke", "--smoke", "--no-plugin-ops", "--out",
         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["passed"] and res["max_logprob_diff"] <= 1e-3
    assert res["serving_path"]["worker_merge"] == "expand"
    assert not res["serving_path"]["plugin_ops"]
    assert all(len(p["experts"]) > 1 and p["merged_rank"] == 4 and p["compression_error"] == 0
               for p in res["prompts"])
    assert _finite(res["throughput"]["ratio"]) and res["throughput"]["ratio"] > 0


@pytest.mark.timeout(300)
def test_scaling_smoke_writes_every_row_pair_and_the_plot(tmp_path):
    """`benchmarks.scaling --smoke`: the K sweep on the tiny model writes a row per method and
    K (plain TTMM 1 and 10, own expert, the served rank-b merge), the baselines, the branched and
    shared-A rows, every paired difference with its interval, and the plot; a rerun resumes
    from the stage cache without training anything."""
    env = dict(os.environ, **OFFLINE_ENV)
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--smoke", "--assets",
           str(tmp_path / "assets"), "--out", str(tmp_path / "out"), "--work",
           str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "scaling.json").read_text())
    rows = res["rows"]
    expected = {"base", "multitask-1ep", "multitask-2ep"}
    for k in (2, 4):
        expected |= {f"plain-k{k}/{m}" for m in ("ttmm1", "ttmm10", "own",
                                                 "ttmm10-rank4")}
    expected |= {f"{s}-k2/{m}" for s in ("branched", "shared-a")
                 for m in ("ttmm1", "ttmm10", "own")}
    assert set(rows) == expected
    assert all(_finite(r["perplexity"], r["lo"], r["hi"]) and r["lo"] <= r["hi"]
               for r in rows.values())
    assert rows["plain-k4/ttmm10-rank4"]["rel_error_max"] > 0  # 4 rank-4 experts -> rank 4
    questions = {p["question"] for p in res["pairs"]}
    assert {"merging vs the top expert", "TTMM 10: K=4 vs K=2",
            "branched TTMM vs fine-tuning, equal compute",
            "shared-A experts vs ordinary (TTMM 10)"} <= questions
    assert all(p["lo"] <= p["hi"] for p in res["pairs"])
    report = (tmp_path / "out" / "scaling.md").read_text()
    assert "| TTMM 10 |" in report and "## Plainly" in report
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert again.returncode == 0 and "training the multitask" not in again.stderr + again.stdout


def test_lm_eval_task_is_a_rolling_loglikelihood_task_over_local_data(tmp_path):
    import yaml

    from benchmarks.lm_eval_task import TASK, task_yaml

    data = tmp_path / "docs.jsonl"
    cfg = yaml.safe_load(task_yaml(data))
    assert cfg["task"] == TASK and cfg["output_type"] == "loglikelihood_rolling"
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    assert cfg["doc_to_target"] == "{{text}}" and cfg["test_split"] == "test"
