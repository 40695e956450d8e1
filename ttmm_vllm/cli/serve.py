"""`ttmm serve`: serve an expert library over gRPC until SIGTERM (drains) or engine death
(exits non-zero so a supervisor restarts it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an expert library over gRPC")
    p.add_argument("--library", required=True, help="expert library directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default: %(default)s)")
    p.add_argument("--http-port", type=int,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health, /metrics) on this port, with "
                   "the same auth, admission and metrics as gRPC (0: any free port; "
                   "default: off)")
    p.add_argument("--base-model", help="served model folder (default: the library's)")
    p.add_argument("--embedder", help="sentence-transformers folder (default: the library's)")
    p.add_argument("--merge-path", choices=("worker", "disk"), default="worker",
                   help="merge inside vLLM's worker (plugin) or write rank-expanded adapters")
    p.add_argument("--worker-merge", choices=("auto", "mix", "expand"), default="auto",
                   help="in-worker merges: 'auto' picks by the cost model "
                   "(ttmm_vllm/serve/serving_path.py: exact rank-r slots for shared-A "
                   "libraries; 'mix' of the resident library while it is small; per-request "
                   "merges compressed to --rank-budget beyond); 'mix' (CPU only) or 'expand' "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="model and adapter dtype: 'auto' is float32 on the "
                   "CPU, bfloat16 on GPUs (default: %(default)s)")
    p.add_argument("--no-plugin-ops", action="store_true", help="use vLLM's stock LoRA ops")
    p.add_argument("--rank-budget", type=int, help="compress merged adapters above this rank")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--idle-adapters", type=int, default=32)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--max-inflight", type=int, default=256,
                   help="admitted requests; beyond them RESOURCE_EXHAUSTED")
    p.add_argument("--max-inflight-per-client", type=int,
                   help="admitted requests per authenticated client (token identity or "
                   "certificate subject); default: half of --max-inflight")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20)
    p.add_argument("--metrics-port", type=int, help="Prometheus endpoint (0: any free port)")
    p.add_argument("--grace", type=float, default=30.0, help="drain seconds on SIGTERM")
    p.add_argument("--reroute-every", type=int, default=0,
                   help="re-route routed requests after every N generated tokens unless they "
                   "set routing.reroute_every (0: route once, from the prompt)")
    p.add_argument("--auth", help="JSON file: {\"tokens\": {token: identity}, \"admin_tokens\": "
                   "[...], \"client_groups\": {identity: [group, ...]}}")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    r = p.add_argument_group("Ray Serve (pip install 'ttmm-vllm[ray]'; ttmm_vllm/serve/ray_serve.py)")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve through Ray Serve's gRPC proxy on --port (all interfaces): "
                   "'local' (or the bare flag) starts a Ray here, 'auto' joins the running "
                   "cluster, or a cluster address")
    r.add_argument("--replicas", type=int, default=1, help="engine replicas (one vLLM each)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per engine replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per engine replica")
    r.add_argument("--frontends", type=int, default=1,
                   help="front-door replicas (validate, embed, route)")
    r.add_argument("--frontend-cpus", type=float, default=0.5, help="CPUs per front door")
    r.add_argument("--affinity", action="store_true",
                   help="send requests that share a top expert to the same replica")
    r.add_argument("--ray-http-port", type=int, default=8000,
                   help="Ray Serve's HTTP proxy port (started by Ray Serve; unused by ttmm; "
                   "default: %(default)s)")
    p.set_defaults(func=run)


def configs(args: argparse.Namespace):
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    engine = EngineConfig(
        merge_path=args.merge_path, worker_merge=args.worker_merge,
        plugin_ops=not args.no_plugin_ops, rank_budget=args.rank_budget, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_loras=args.max_loras, idle_adapters=args.idle_adapters,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)))
    auth = load_auth(args.auth) if args.auth else {}
    # ServerConfig checks the auth values' types (no string where a list belongs, no empty
    # token) and the TLS flags, with a one-line ValueError
    server = ServerConfig(
        host=args.host, port=args.port, max_inflight=args.max_inflight,
        max_inflight_per_client=getattr(args, "max_inflight_per_client", None),
        max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
        grace_s=args.grace, tokens=auth.get("tokens", {}),
        admin_tokens=auth.get("admin_tokens", []),
        client_groups=auth.get("client_groups", {}),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    return engine, server


AUTH_KEYS = ("tokens", "admin_tokens", "client_groups")


def load_auth(path: str) -> dict:
    """The --auth file: {"tokens": {token: identity}, "admin_tokens": [token, ...],
    "client_groups": {identity: [group, ...]}}. A file that is not that (unknown keys, a
    string where a list belongs, empty tokens) is refused with a ValueError naming the field;
    the value types are checked by ServerConfig."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--auth {path}: not a readable JSON file ({type(e).__name__})") \
            from None
    if not isinstance(raw, dict):
        raise ValueError(f"--auth {path}: must be a JSON object with keys {list(AUTH_KEYS)}")
    unknown = sorted(set(raw) - set(AUTH_KEYS))
    if unknown:
        raise ValueError(f"--auth {path}: unknown keys {unknown}; expected {list(AUTH_KEYS)}")
    return raw


async def serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.http_server import HttpConfig
    from ttmm_vllm.serve.service import ServiceConfig

    log = logging.getLogger("ttmm.serve")
    engine_cfg, server_cfg = configs(args)
    http = HttpConfig(host=args.host, port=args.http_port) if args.http_port is not None \
        else None
    server = await start(ServeConfig(
        library=args.library, engine=engine_cfg, server=server_cfg,
        service=ServiceConfig(default_reroute_every=max(args.reroute_every, 0)),
        base_model=args.base_model, embedder=args.embedder, http=http))
    print(f"serving {server.service.library.root} ({server.service.library.num_experts} "
          f"experts) on {server_cfg.host}:{server.port}", flush=True)
    if server.http is not None:
        print(f"OpenAI-compatible API on http://{args.host}:{server.http.port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dead = asyncio.create_task(server.engine_dead.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({dead, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if server.engine_dead.is_set():
        log.error("vLLM engine died; exiting with status 1 so a supervisor restarts us")
        await server.stop(grace=0)
        return 1
    log.info("draining (up to %.0f s)", server_cfg.grace_s)
    await server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from ttmm_vllm.serve.service import ServiceConfig

    try:  # every flag and the auth file checked before anything starts
        configs(args)
        ServiceConfig(default_reroute_every=max(args.reroute_every, 0))
    except ValueError as e:
        print(f"ttmm serve: {e}", file=sys.stderr)
        return 2
    if args.ray is not None:
        if args.http_port is not None:
            print("ttmm serve: --http-port (the OpenAI-compatible API) is not served through "
                  "Ray Serve yet; drop --ray or --http-port", file=sys.stderr)
            return 2
        return serve_on_ray(args)
    return asyncio.run(serve(args))


def serve_on_ray(args: argparse.Namespace) -> int:
    from ttmm_vllm.ray_runtime import forwarded_env
    from ttmm_vllm.serve import ray_serve

    engine_cfg, server_cfg = configs(args)
    cfg = ray_serve.RayServeConfig(
        address=args.ray, replicas=args.replicas, replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus, frontends=args.frontends,
        frontend_cpus=args.frontend_cpus, affinity=args.affinity,
        grpc_port=args.port, http_port=args.ray_http_port, env_vars=forwarded_env())
    return ray_serve.serve_until_signalled(args.library, engine_cfg, server_cfg, cfg,
                                           model_dir=args.base_model,
                                           embedder_path=args.embedder)
