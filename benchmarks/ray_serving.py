"""Serving through Ray Serve (issue 10): throughput of 1 vs N engine replicas, spread vs expert
affinity, against the single gRPC server on the same machine.

Rows (each a fresh deployment, measured with the same closed-loop workload):

    single server        ttmm serve (in-process here), no Ray: the reference
    ray, 1 replica       ttmm serve --ray --replicas 1
    ray, N, spread       ttmm serve --ray --replicas N              (power of two choices)
    ray, N, affinity     ttmm serve --ray --replicas N --affinity   (rendezvous on top expert)

Workload: `--distinct` holdout prompts, repeated to `--requests` in a seeded shuffle (popular
topics recur, as in real traffic: a repeat can reuse the merged adapter its routing built),
`--concurrency` clients in a closed loop, greedy, `--max-tokens` new tokens. Reported:
output tokens/s, p50/p99 latency, and merged adapters built per replica (affinity should
build each routing's adapter once; spreading builds it on every replica that sees it).

On a 2-core machine N replicas share the same cores: the point is that the Ray path costs
little over the single server and that affinity does not hurt, not a speed-up.

    flock /tmp/ttmm-heavy.lock python -m benchmarks.ray_serving --library DIR --replicas 2
    flock /tmp/ttmm-heavy.lock python -m benchmarks.ray_serving --smoke
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import BenchLibrary, log
from benchmarks.throughput import closed_loop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(bench: BenchLibrary, distinct: int, requests: int, seed: int) -> list[str]:
    base = common.prompts(bench, distinct, bench.query_tokens, seed=seed)
    reps = [base[i % distinct] for i in range(requests)]
    return [reps[i] for i in np.random.default_rng(seed).permutation(requests)]


def run_rows(target: str, prompts: list[str], concurrency: int, max_tokens: int
             ) -> dict[str, Any]:
    from ttmm_vllm.client import TTMMClient

    with TTMMClient(target, timeout=None) as c:
        c.wait_ready(120)
        for p in prompts[:concurrency]:  # warm-up: vLLM's first steps, the embedder
            c.generate(p, max_tokens=2)

        def request(prompt: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = c.generate(prompt, max_tokens=max_tokens, temperature=0.0, timeout=600)
            return time.perf_counter() - t0, r.completion_tokens

        return closed_loop(concurrency, prompts, request)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library")
    ap.add_argument("--model-dir")
    ap.add_argument("--smoke", action="store_true", help="tiny assets, a few requests")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--distinct", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--merge-path", choices=("worker", "disk"), default="worker")
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    common.offline_env()
    if args.smoke:
        assets = common.smoke_assets()
        bench = BenchLibrary.open(assets.library, assets.model_dir, assets.embedder_dir)
        args.requests, args.distinct, args.concurrency = 24, 8, 8
    else:
        bench = BenchLibrary.open(args.library, args.model_dir)
    out = common.results_dir(f"ray-serving-{bench.root.name}", args.out, args.smoke)
    prompts = workload(bench, args.distinct, args.requests, args.seed)

    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    engine = EngineConfig(merge_path=args.merge_path, max_num_seqs=max(32, args.concurrency),
                          kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)))
    rows: list[dict[str, Any]] = []

    log("single server")
    with common.serve(bench, engine) as served:
        r = run_rows(served.target, prompts, args.concurrency, args.max_tokens)
        stats = served.server.service.engine.registry.created
    rows.append({"row": "single server (no Ray)", "replicas": 1, "startup_s": served.startup_s,
                 "adapters_built": [stats], **r})

    import ray
    from ray import serve

    from ttmm_vllm.ray_runtime import forwarded_env
    from ttmm_vllm.serve import ray_serve

    layouts = [(1, False), (args.replicas, False), (args.replicas, True)]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500 << 20,
             log_to_driver=False)
    try:
        for replicas, affinity in layouts:
            name = f"ray, {replicas} replica{'s' if replicas > 1 else ''}" + \
                (", affinity" if affinity else (", spread" if replicas > 1 else ""))
            log(name)
            cfg = ray_serve.RayServeConfig(
                replicas=replicas, replica_cpus=round(1.5 / replicas, 2), frontend_cpus=0.25,
                affinity=affinity, grpc_port=_free_port(), http_port=_free_port(),
                env_vars=forwarded_env())
            t0 = time.perf_counter()
            deployed = ray_serve.deploy(bench.root, engine, ServerConfig(max_inflight=4096),
                                        cfg, model_dir=bench.model_dir,
                                        embedder_path=bench.embedder_path)
            startup = time.perf_counter() - t0
            r = run_rows(f"127.0.0.1:{deployed.grpc_port}", prompts, args.concurrency,
                         args.max_tokens)
            per = deployed.frontend.stats.remote().result()["replicas"]
            rows.append({"row": name, "replicas": replicas, "affinity": affinity,
                         "startup_s": startup,
                         "adapters_built": [s.get("adapters_created", 0) for s in per.values()],
                         "requests_per_replica": [s["requests"] for s in per.values()], **r})
            serve.delete(cfg.app_name)
            serve.shutdown()
    finally:
        ray.shutdown()

    for r in rows:
        r.pop("latencies_s", None)
    header = ["layout", "tokens/s", "p50 s", "p99 s", "adapters built (per replica)",
              "requests per replica", "startup s"]
    table = common.markdown_table(header, [
        [r["row"], r["tokens_per_s"], r["latency_p50_s"], r["latency_p99_s"],
         " + ".join(map(str, r["adapters_built"])),
         " + ".join(map(str, r.get("requests_per_replica", [r["requests"]]))),
         r["startup_s"]] for r in rows])
    config = {k: v for k, v in vars(args).items()}
    common.write_json(out / "results.json", {"config": config, "environment":
                                             common.environment(), "rows": rows})
    (out / "results.md").write_text(
        f"# Ray Serve: {bench.root.name}\n\n{args.requests} requests ({args.distinct} distinct "
        f"prompts), {args.concurrency} clients, {args.max_tokens} new tokens, merge path "
        f"{args.merge_path}\n\n{table}")
    print(table)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
