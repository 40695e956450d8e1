"""Where vLLM-CPU's threads run: the layout `ttmm serve` picks for the machine (issue 18.5).

vLLM 0.32 on CPU runs the model in one worker process whose OpenMP threads it pins, one per
CPU (`vllm/utils/ompmultiprocessing.py`). By default ("auto") the worker gets the CPUs of its
NUMA node (one per physical core) minus `VLLM_CPU_NUM_OF_RESERVED_CPU`, which defaults to one
per worker: the reserved CPU is left to the EngineCore (the scheduler, which busy-waits on the
shared-memory queue with `sched_yield` for a second after each message). On a 2-CPU machine
that halves the compute: the worker runs one thread on CPU 0, and the EngineCore burns the
other CPU at ~100% (over a quarter of it system time), mostly spinning.

Measured on this 2-CPU machine (AMD EPYC, SmolLM2-135M fp32, enforce_eager, no LoRA, base
model; decode tokens/s, mean of 2 fresh engines x 2 trials, interleaved; ratio to the default
in the same round, range over rounds):

    flock /tmp/ttmm-heavy.lock .venv/bin/python -m benchmarks.cpu_layout
    (benchmarks/results/cpu_layout/results.md)

    | layout                                 | 1 x 64 tok/s | ratio | 16 x 32 tok/s | ratio |
    | default (auto, 1 reserved: worker [0]) |         20.1 |  1.00 |         204.6 |  1.00 |
    | VLLM_CPU_NUM_OF_RESERVED_CPU=0 ([0,1]) |         25.4 |  1.26 |         305.7 |  1.50 |
    | VLLM_CPU_OMP_THREADS_BIND=0-1          |         24.2 |  1.20 |         277.3 |  1.37 |
    | nobind (torch default: 2 threads)      |         18.0 |  0.90 |         216.8 |  1.06 |
    | nobind, OMP_NUM_THREADS=1              |         17.9 |  0.89 |         188.3 |  0.92 |
    | nobind, OMP_NUM_THREADS=2              |         11.3 |  0.56 |         158.1 |  0.77 |
    | default + LD_PRELOAD=libiomp5          |         17.0 |  0.84 |         169.8 |  0.84 |
    | reserved 0 + LD_PRELOAD=libiomp5       |         23.2 |  1.15 |         294.1 |  1.45 |

(the nobind-2-threads and default-iomp rows had other engineers' jobs running during some
trials; the two winning rows did not.) With every CPU bound, the EngineCore drops from ~98%
of a core to ~3%: it schedules in the gaps of the worker's steps instead of spinning on a core
of its own. "0-1" is the same binding as reserving none (the difference is noise);
`VLLM_CPU_OMP_THREADS_BIND=all` is not a value vLLM 0.32 accepts.

The choice: on 2 to `SMALL_MACHINE_CPUS` CPUs, reserve none (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`,
which keeps vLLM's own CPU selection: NUMA node, one CPU per physical core, the process's
affinity). Above that vLLM's default stays: a reserved CPU is at most 1/5 of the compute there,
and it keeps the scheduler's latency off the worker's cores (larger batches mean more
scheduling work). Only 2 CPUs were measured; 4 is the extrapolation (reserving costs 1/n of
the compute; at n = 2 it cost 20-33% of the throughput). One CPU: nothing to reserve.

Overriding: whatever the user's environment says wins. `VLLM_CPU_OMP_THREADS_BIND` or
`VLLM_CPU_NUM_OF_RESERVED_CPU` set (to anything) means the user chose the layout, and nothing
is added; `TTMM_CPU_LAYOUT=vllm` keeps vLLM's defaults whatever the machine ("auto", the
default, picks as above). OMP_NUM_THREADS does not size a bound worker (vLLM sets it from the
CPU list); to give the worker fewer CPUs, set `VLLM_CPU_OMP_THREADS_BIND`, e.g. "0".
Trade-off: with every CPU bound to the worker, the API process's own work (tokenising, the
router's embedding) competes with decoding instead of sharing the EngineCore's reserved CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

SMALL_MACHINE_CPUS = 4
LAYOUT_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
MODE_VAR = "TTMM_CPU_LAYOUT"
MODES = ("auto", "vllm")


def cpu_layout(cpu_count: int, env: Mapping[str, str]) -> dict[str, str]:
    """The environment variables to add for vLLM-CPU's thread layout on a machine with
    `cpu_count` usable CPUs, given the environment `env` (never one `env` already has; empty
    when the user chose the layout or asked for vLLM's defaults). Pure.

    Raises ValueError for an unknown TTMM_CPU_LAYOUT.
    """
    mode = env.get(MODE_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_VAR} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "vllm" or any(k in env for k in LAYOUT_VARS):
        return {}
    if 2 <= cpu_count <= SMALL_MACHINE_CPUS:
        return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), which is what vLLM's auto binding uses."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply_cpu_layout(env: MutableMapping[str, str] | None = None,
                     cpu_count: int | None = None) -> dict[str, str]:
    """Choose (cpu_layout) and set the layout in `env` (default os.environ) before vLLM starts
    its EngineCore, which reads it; log what was chosen. Returns what was set."""
    env = os.environ if env is None else env
    cpus = usable_cpus() if cpu_count is None else cpu_count
    chosen = cpu_layout(cpus, env)
    env.update(chosen)
    if chosen:
        log.info("vLLM-CPU thread layout for %d CPUs: %s (override: set %s, or %s=vllm)",
                 cpus, " ".join(f"{k}={v}" for k, v in chosen.items()),
                 " or ".join(LAYOUT_VARS), MODE_VAR)
    else:
        given = {k: env[k] for k in LAYOUT_VARS if k in env}
        log.info("vLLM-CPU thread layout for %d CPUs: %s", cpus,
                 f"as set: {given}" if given else "vLLM's defaults")
    return chosen
