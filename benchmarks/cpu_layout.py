"""Base-model decode speed under vLLM-CPU's thread layouts (issue 18, item 5).

vLLM 0.32 on CPU runs three processes: the front end (AsyncLLM, here the runner), the
EngineCore (scheduler; it busy-waits on the shared-memory queue with `sched_yield` for up to
1 s after each read, hence the system time) and one worker (the model, torch + OpenMP). How
the worker's OpenMP threads are laid out is decided in `vllm/utils/ompmultiprocessing.py`
(`OMPProcessManager`, run in the EngineCore before it spawns the worker):

- `VLLM_CPU_OMP_THREADS_BIND` (default "auto"): "auto" binds the worker to the CPUs of its
  NUMA node (one logical CPU per physical core on x86) minus the reserved ones; "nobind" sets
  nothing (the worker inherits OMP_NUM_THREADS, else torch's default, every core, unbound);
  anything else is an explicit CPU list per rank, "0-1" or "0,2-3", ranks separated by "|".
  "all" is NOT accepted (it is parsed as a CPU list and fails).
- `VLLM_CPU_NUM_OF_RESERVED_CPU` (default unset = local world size, i.e. 1 here): CPUs taken
  off the end of the auto list for the other processes; only "auto" reads it.
- The binding itself is environment only: the worker is started with OMP_NUM_THREADS = the
  list's length and OMP_PLACES={...}, OMP_PROC_BIND=true (libgomp), or KMP_AFFINITY (Intel
  OpenMP, when libiomp is in LD_PRELOAD), or GOMP_CPU_AFFINITY (libgomp in LD_PRELOAD).
- The EngineCore sets its own torch threads to 1 unless OMP_NUM_THREADS came from outside;
  the worker patches `torch.set_num_threads` into a no-op after binding.
- `VLLM_CPU_KVCACHE_SPACE` (GiB) only sizes the KV cache (overrides kv_cache_memory_bytes).

Each layout below runs in a fresh subprocess (the variables must be set before vLLM starts),
twice, interleaved (the second round in reverse order), on the same engine settings as
`ttmm serve`'s base model (fp32, enforce_eager, max_model_len 512, no LoRA, 256 MiB KV cache).
Per engine: a warm-up, then twice each workload: 1 request x 64 new tokens and 16 concurrent
requests x 32 new tokens (random 32-token prompts, greedy, ignore_eos). Decode tokens/s counts
the tokens after each request's first, over the time after the last first token. Ratios are to
the default layout in the same round.

    flock /tmp/ttmm-heavy.lock .venv/bin/python -m benchmarks.cpu_layout      # ~20 min
    flock /tmp/ttmm-heavy.lock .venv/bin/python -m benchmarks.cpu_layout --smoke

Writes results.json and results.md into --out (default benchmarks/results/cpu_layout[-smoke]).
What `ttmm serve` does with the answer: ttmm_vllm/serve/cpu_layout.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ttmm_vllm.home import OFFLINE_ENV

DEFAULT_MODEL = Path("~/.cache/ttmm/models/SmolLM2-135M-Instruct").expanduser()
MARK = "CPU_LAYOUT_RESULT "
# The variables a layout controls: removed from the inherited environment, so that "default"
# really is vLLM's default whatever the shell running the benchmark had set.
CONTROLLED = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS",
              "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "LD_PRELOAD",
              "VLLM_CPU_KVCACHE_SPACE")


def iomp_path() -> Path | None:
    """Intel OpenMP as the `intel-openmp` wheel installs it (vLLM's docs preload it)."""
    p = Path(sys.prefix) / "lib" / "libiomp5.so"
    return p if p.exists() else None


@dataclass(frozen=True)
class Layout:
    name: str
    env: Callable[[int], dict[str, str]]  # cpu count -> variables
    what: str


LAYOUTS = [
    Layout("default", lambda n: {},
           "vLLM's auto: worker bound to all CPUs but the reserved one (here [0]), 1 thread"),
    Layout("reserve0", lambda n: {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
           "auto binding, no reserved CPU: worker bound to every CPU, one thread each"),
    Layout("bind-all", lambda n: {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}"},
           "explicit list of every CPU (what reserve0 resolves to on one NUMA node)"),
    Layout("nobind", lambda n: {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
           "no binding, OMP_NUM_THREADS unset: worker uses torch's default (every core)"),
    Layout("nobind-omp1", lambda n: {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                     "OMP_NUM_THREADS": "1"},
           "no binding, 1 thread everywhere (the OS places the processes)"),
    Layout("nobind-ompN", lambda n: {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                     "OMP_NUM_THREADS": str(n)},
           "no binding, OMP_NUM_THREADS = CPU count (EngineCore keeps that many too)"),
    Layout("default-iomp", lambda n: {"LD_PRELOAD": str(iomp_path())},
           "default binding with Intel OpenMP preloaded (KMP_AFFINITY, KMP_BLOCKTIME=5)"),
    Layout("reserve0-iomp", lambda n: {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                       "LD_PRELOAD": str(iomp_path())},
           "every CPU bound, Intel OpenMP preloaded"),
]


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 32
    single_tokens: int = 64
    batch: int = 16
    batch_tokens: int = 32
    trials: int = 2  # per engine, per workload
    max_model_len: int = 512
    kv_bytes: int = 256 << 20


SMOKE = Workload(prompt_tokens=8, single_tokens=8, batch=4, batch_tokens=8, trials=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- runner (child)


def _procs() -> dict[str, object]:
    """This process (front end), its EngineCore child and the worker, by role."""
    import psutil

    me = psutil.Process()
    roles: dict[str, object] = {"frontend": me}
    for child in me.children():
        if "resource_tracker" in " ".join(child.cmdline()):
            continue
        roles.setdefault("engine_core", child)
        for grandchild in child.children():
            if "resource_tracker" not in " ".join(grandchild.cmdline()):
                roles.setdefault("worker", grandchild)
    return roles


def _cpu(procs: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for role, p in procs.items():
        t = p.cpu_times()
        out[role] = (t.user, t.system)
    return out


def _thread_cpus(pid: int) -> dict[str, int]:
    """How many of a process's threads may run on which CPUs (Cpus_allowed_list: 0-1, 0, 1):
    what the binding actually did (vLLM's C++ pins each OpenMP thread to one CPU)."""
    counts: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus = line.split(":", 1)[1].strip()
                counts[cpus] = counts.get(cpus, 0) + 1
    return counts


def _busy() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _usage(before: dict, after: dict, wall: float) -> dict[str, dict[str, float]]:
    """Per process: user and system CPU over the measurement, as % of one core."""
    return {role: {"user_pct": 100 * (after[role][0] - before[role][0]) / wall,
                   "sys_pct": 100 * (after[role][1] - before[role][1]) / wall}
            for role in before if role in after}


def foreign_pct(seconds: float = 2.0) -> float:
    """% of one core used by everything on the machine during `seconds` (call it when none
    of ours runs): the other engineers' load."""
    b = _busy()
    time.sleep(seconds)
    return 100 * (_busy() - b) / seconds


async def _request(llm, prompt: list[int], n: int) -> tuple[float, float, int]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    first, count = None, 0
    async for out in llm.generate({"prompt_token_ids": prompt}, params, uuid.uuid4().hex):
        k = len(out.outputs[0].token_ids)
        if k and first is None:
            first = time.perf_counter()
        count += k
    return first, time.perf_counter(), count


async def _workload(llm, prompts: list[list[int]], n: int, procs: dict) -> dict:
    before, busy0 = _cpu(procs), _busy()
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_request(llm, p, n) for p in prompts))
    wall = time.perf_counter() - t0
    after, busy1 = _cpu(procs), _busy()
    ours = sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(after.values(), before.values(),
                                                          strict=True))
    last_first = max(r[0] for r in res)
    end = max(r[1] for r in res)
    total = sum(r[2] for r in res)
    return {"decode_tps": (total - len(res)) / (end - last_first),
            "e2e_tps": total / wall, "ttft_s": last_first - t0, "wall_s": wall,
            "tokens": total, "cpu": _usage(before, after, wall),
            # everything else on the machine meanwhile, % of one core (noise from others)
            "foreign_pct": max(0.0, 100 * (busy1 - busy0 - ours) / wall)}


async def _run_engine(model: str, w: Workload) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)

    def prompts(k: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(w.prompt_tokens)] for _ in range(k)]

    t0 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, tokenizer=model, dtype="float32", enforce_eager=True,
        max_model_len=w.max_model_len, max_num_seqs=max(16, w.batch), seed=0,
        enable_prefix_caching=False, kv_cache_memory_bytes=w.kv_bytes,
        disable_log_stats=True))
    startup = time.perf_counter() - t0
    try:
        procs = _procs()
        # warm-up: both shapes once
        await asyncio.gather(*(_request(llm, p, 4) for p in prompts(w.batch)))
        await _request(llm, prompts(1)[0], 8)
        single, batch = [], []
        for _ in range(w.trials):
            single.append(await _workload(llm, prompts(1), w.single_tokens, procs))
            batch.append(await _workload(llm, prompts(w.batch), w.batch_tokens, procs))
        info = {role: {"affinity": p.cpu_affinity(), "threads": p.num_threads(),
                       "thread_cpus": _thread_cpus(p.pid)} for role, p in procs.items()}
        return {"startup_s": startup, "processes": info, "single": single, "batch": batch}
    finally:
        llm.shutdown()


def runner(model: str, workload: dict) -> None:
    res = asyncio.run(_run_engine(model, Workload(**workload)))
    print(MARK + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- driver (parent)


def run_layout(layout: Layout, model: str, w: Workload, ncpu: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(OFFLINE_ENV)
    env.update(layout.env(ncpu))
    code = ("import json, sys; from benchmarks.cpu_layout import runner; "
            "runner(sys.argv[1], json.loads(sys.argv[2]))")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, model, json.dumps(asdict(w))],
                           env=env, capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    out = p.stdout + p.stderr
    binding = [ln.strip() for ln in out.splitlines()
               if "VLLM_CPU_OMP_THREADS_BIND=" in ln or "core ids=" in ln
               or "reserved_cpus=" in ln or "reserve_cpu_num=" in ln]
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res.update(binding_log=binding, total_s=time.perf_counter() - t0)
            return res
    return {"error": f"exit {p.returncode}", "tail": out[-3000:]}


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
    """One row per layout: means over rounds and trials; ratios to default per round."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["layout"] == name and "error" not in r["result"]]
        row: dict = {"layout": name, "ok_rounds": len(mine)}
        others = [t["foreign_pct"] for r in mine for wl in ("single", "batch")
                  for t in r["result"][wl]]
        row["others_pct"] = _mean(others)
        row["others_pct_max"] = max(others) if others else None
        for wl in ("single", "batch"):
            per_round = {r["round"]: _mean([t["decode_tps"] for t in r["result"][wl]])
                         for r in mine}
            row[f"{wl}_tps"] = _mean(list(per_round.values()))
            row[f"{wl}_tps_rounds"] = [per_round[k] for k in sorted(per_round)]
            ratios = []
            for rnd, v in per_round.items():
                base = [_mean([t["decode_tps"] for t in r["result"][wl]]) for r in runs
                        if r["layout"] == "default" and r["round"] == rnd
                        and "error" not in r["result"]]
                if base:
                    ratios.append(v / base[0])
            row[f"{wl}_ratio"] = _mean(ratios)
            row[f"{wl}_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
            for role in ("engine_core", "worker"):
                cpu = [t["cpu"].get(role) for r in mine for t in r["result"][wl]]
                cpu = [c for c in cpu if c]
                row[f"{wl}_{role}_cpu"] = (
                    {"user_pct": _mean([c["user_pct"] for c in cpu]),
                     "sys_pct": _mean([c["sys_pct"] for c in cpu])} if cpu else None)
        rows.append(row)
    return rows


def _rounded(obj):
    """Floats to 4 significant digits (the measurements are not more precise than that)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _f(x, d=1) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _cpu_cell(c) -> str:
    return "-" if not c else f"{c['user_pct']:.0f}+{c['sys_pct']:.0f}"


def write_report(out: Path, config: dict, runs: list[dict], rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # summary indented, one line per engine run: small enough to commit
    text = json.dumps({"config": config, "summary": _rounded(rows)}, indent=1)[:-2]
    text += ',\n "runs": [\n  ' + ",\n  ".join(json.dumps(_rounded(r)) for r in runs)
    (out / "results.json").write_text(text + "\n ]\n}\n")
    w = config["workload"]
    lines = [
        "# vLLM-CPU thread layouts: base-model decode tokens/s",
        "",
        f"`{config['command']}` on {config['model_name']}, {config['cpus']} CPUs "
        f"({config['machine']}), vLLM {config['vllm']}, torch {config['torch']}, "
        f"{config['time']}. fp32, enforce_eager, no LoRA, KV cache "
        f"{w['kv_bytes'] >> 20} MiB. Decode tokens/s (tokens after each request's first, "
        "over the time after the last first token), mean over "
        f"{config['rounds']} fresh engines x {w['trials']} trials; ratio: to `default` in the "
        "same round (range over rounds). CPU: % of one core, user+system, during the "
        "workload; others': every other process on the machine meanwhile (the checkout is "
        "shared), % of one core.",
        "",
        f"| layout | 1 x {w['single_tokens']} tok/s | ratio | {w['batch']} x "
        f"{w['batch_tokens']} tok/s | ratio | EngineCore CPU (1 / {w['batch']}) | "
        f"worker CPU (1 / {w['batch']}) | others' CPU (mean, max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def ratio(r: dict, wl: str) -> str:
        rng = r[f"{wl}_ratio_range"]
        return f"{_f(r[f'{wl}_ratio'], 2)} ({_f(rng[0], 2)}-{_f(rng[1], 2)})" if rng else "-"

    for r in rows:
        lines.append(
            f"| {r['layout']} | {_f(r['single_tps'])} | {ratio(r, 'single')} | "
            f"{_f(r['batch_tps'])} | {ratio(r, 'batch')} | "
            f"{_cpu_cell(r['single_engine_core_cpu'])} / {_cpu_cell(r['batch_engine_core_cpu'])}"
            f" | {_cpu_cell(r['single_worker_cpu'])} / {_cpu_cell(r['batch_worker_cpu'])} | "
            f"{_f(r['others_pct'], 0)}, {_f(r['others_pct_max'], 0)} |")
    lines += ["", "Layouts (variables set on top of an environment with all of "
              f"{', '.join(CONTROLLED)} removed):", ""]
    for lay in config["layouts"]:
        lines.append(f"- `{lay['name']}`: {lay['what']}; `{lay['env'] or 'nothing set'}`")
    lines += ["", "What `ttmm serve` picks from this, and why: ttmm_vllm/serve/cpu_layout.py "
              "(`TTMM_CPU_LAYOUT=vllm` or any VLLM_CPU_* layout variable overrides it)."]
    errors = [r for r in runs if "error" in r["result"]]
    if errors:
        lines += ["", "Failed engines: " + ", ".join(
            f"{r['layout']} (round {r['round']}: {r['result']['error']})" for r in errors)]
    lines += ["", "What each layout's worker got (round 0), and vLLM's log of it:", ""]
    for r in runs:
        if r["round"] != 0 or "error" in r["result"]:
            continue
        wk = r["result"]["processes"].get("worker", {})
        log_line = "; ".join(x for x in r["result"].get("binding_log", [])
                             if "core ids" in x or "reserve_cpu_num" in x)
        lines.append(f"- `{r['layout']}`: main thread on {wk.get('affinity')}, threads by "
                     f"allowed CPUs {wk.get('thread_cpus')}; log: {log_line or '-'}")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a Llama-architecture folder")
    p.add_argument("--smoke", action="store_true",
                   help="the tests' tiny model, two layouts, one round, few tokens")
    p.add_argument("--layouts", nargs="*", default=None,
                   help=f"names to run (default all: {' '.join(x.name for x in LAYOUTS)})")
    p.add_argument("--rounds", type=int, default=None, help="fresh engines per layout (2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per engine")
    p.add_argument("--quiet", type=float, default=15.0,
                   help="before each engine, wait until others use under this %% of a core")
    p.add_argument("--max-wait", type=float, default=300.0, help="... for at most this long")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    w = SMOKE if args.smoke else Workload()
    rounds = args.rounds or (1 if args.smoke else 2)
    names = args.layouts or (["default", "reserve0"] if args.smoke else
                             [x.name for x in LAYOUTS])
    layouts = [x for x in LAYOUTS if x.name in names]
    if iomp_path() is None:
        layouts = [x for x in layouts if "iomp" not in x.name]
    out = Path(args.out or f"benchmarks/results/cpu_layout{'-smoke' if args.smoke else ''}")
    ncpu = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.smoke:
            from ttmm_vllm.testing import build_tiny_llama

            model = str(build_tiny_llama(Path(tmp) / "tiny-llama"))
        runs = []
        for rnd in range(rounds):
            order = layouts if rnd % 2 == 0 else layouts[::-1]
            for lay in order:
                waited = 0.0
                while (busy := foreign_pct()) > args.quiet and waited < args.max_wait:
                    waited += 2.0  # others are using the machine: let them finish first
                log(f"round {rnd} layout {lay.name} {lay.env(ncpu)} (others: {busy:.0f}% "
                    f"of a core, waited {waited:.0f} s)")
                res = run_layout(lay, model, w, ncpu, args.timeout)
                runs.append({"round": rnd, "layout": lay.name, "env": lay.env(ncpu),
                             "foreign_before_pct": busy, "result": res})
                if "error" in res:
                    log(f"  failed: {res['error']}\n{res.get('tail', '')[-1500:]}")
                else:
                    log("  single {:.1f} tok/s, batch {:.1f} tok/s, startup {:.0f} s, others "
                        "{:.0f}% of a core".format(
                            _mean([t["decode_tps"] for t in res["single"]]),
                            _mean([t["decode_tps"] for t in res["batch"]]), res["startup_s"],
                            _mean([t["foreign_pct"] for t in res["single"] + res["batch"]])))
        import torch
        import vllm

        config = {
            "command": " ".join(["python -m benchmarks.cpu_layout", *argv]),
            "model": model, "model_name": "tiny-llama" if args.smoke else Path(model).name,
            "workload": asdict(w), "rounds": rounds, "cpus": ncpu,
            "machine": platform.processor() or platform.machine(),
            "vllm": vllm.__version__, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "layouts": [{"name": x.name, "what": x.what, "env": x.env(ncpu)} for x in layouts],
        }
        rows = summarise(runs, [x.name for x in layouts])
        write_report(out, config, runs, rows)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
