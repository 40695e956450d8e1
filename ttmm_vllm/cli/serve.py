"""`ttmm serve`: serve an expert library over gRPC until SIGTERM (drains) or engine death
(exits non-zero so a supervisor restarts it)."""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

from ttmm_vllm.cli import UserError


def add_parser(sub) -> None:
    from ttmm_vllm.serve.grpc_server import ServerConfig

    d = ServerConfig()  # defaults come from the config the flags fill, so they cannot drift
    p = sub.add_parser("serve", help="serve an expert library over gRPC")
    p.add_argument("--library", required=True, help="expert library directory")
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (default: %(default)s)")
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
    p.add_argument("--no-plugin-ops", action="store_true", help="use vLLM's stock LoRA ops")
    add_engine_flags(p)
    p.add_argument("--max-inflight", type=int, default=d.max_inflight,
                   help="admitted requests; beyond them RESOURCE_EXHAUSTED (default: "
                   "%(default)s)")
    p.add_argument("--max-inflight-per-client", type=int,
                   help="admitted requests per authenticated client (token identity or "
                   "certificate subject); default: half of --max-inflight")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest request message (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, help="Prometheus endpoint (0: any free port)")
    p.add_argument("--grace", type=float, default=d.grace_s,
                   help="drain seconds on SIGTERM (default: %(default)s)")
    p.add_argument("--reroute-every", type=int, default=0,
                   help="re-route routed requests after every N generated tokens unless they "
                   "set routing.reroute_every (0: route once, from the prompt)")
    p.add_argument("--auth", help="JSON file: {\"tokens\": {token: identity}, \"admin_tokens\": "
                   "[...], \"client_groups\": {identity: [group, ...]}}")
    p.add_argument("--tls-cert", help="serve TLS with this certificate (PEM; with --tls-key), "
                   "on gRPC and on --http-port (HTTPS)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA "
                   "(both doors)")
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


def add_engine_flags(p) -> None:
    """vLLM's engine flags, named as `vllm serve` names them; defaults read from EngineConfig
    (the one place they are set), so help and code cannot drift."""
    from ttmm_vllm.serve.engine_api import EngineConfig

    d = EngineConfig()
    g = p.add_argument_group("engine (vLLM's flags)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default=d.dtype, help="model and adapter dtype: 'auto' is float32 on the "
                   "CPU, bfloat16 on GPUs (default: %(default)s)")
    g.add_argument("--max-lora-rank", "--rank-budget", dest="rank_budget", type=int,
                   default=d.rank_budget, help="rank of a request's merged adapter in vLLM's "
                   "slots; larger merges are compressed to it (default: the experts' rank)")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="context length (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="requests in one batch (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens in one step (default: vLLM's)")
    g.add_argument("--max-loras", type=int, default=d.max_loras,
                   help="distinct merged adapters in one step (default: %(default)s)")
    g.add_argument("--idle-adapters", type=int, default=d.idle_adapters,
                   help="merged adapters kept registered while unused (default: %(default)s)")
    g.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_bytes / (1 << 30),
                   help="KV cache size in GiB (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory vLLM may use (GPUs; default: vLLM's)")
    g.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="GPUs per engine (default: %(default)s)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                   default=d.enforce_eager, help="no CUDA graphs (default: %(default)s)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching, help="default: %(default)s")
    g.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vLLM engine argument (AsyncEngineArgs field; VALUE parsed "
                   "as JSON when it is JSON, e.g. --engine-arg swap_space=4); repeatable")


def engine_args(pairs: list[str]) -> dict:
    """--engine-arg KEY=VALUE pairs -> a dict (VALUE as JSON when it parses)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def configs(args: argparse.Namespace):
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    engine = EngineConfig(
        merge_path=args.merge_path, worker_merge=args.worker_merge,
        plugin_ops=not args.no_plugin_ops, rank_budget=args.rank_budget, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_loras=args.max_loras, idle_adapters=args.idle_adapters,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        engine_args=engine_args(args.engine_arg))
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
    # the HTTP door serves TLS (and mutual TLS) with the gRPC door's flags
    http = HttpConfig(host=args.host, port=args.http_port, tls_cert=args.tls_cert,
                      tls_key=args.tls_key, tls_client_ca=args.tls_client_ca) \
        if args.http_port is not None else None
    server = await start(ServeConfig(
        library=args.library, engine=engine_cfg, server=server_cfg,
        service=ServiceConfig(default_reroute_every=max(args.reroute_every, 0)),
        base_model=args.base_model, embedder=args.embedder, http=http))
    print(f"serving {server.service.library.root} ({server.service.library.num_experts} "
          f"experts) on {server_cfg.host}:{server.port}", flush=True)
    if server.http is not None:
        print(f"OpenAI-compatible API on {server.http.config.scheme}://{args.host}:"
              f"{server.http.port}/v1", flush=True)
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

    check(args)
    if args.ray is not None:
        return serve_on_ray(args)
    return asyncio.run(serve(args))


def check(args: argparse.Namespace) -> None:
    """What can be checked in a moment, before the engine's minutes of start-up: every flag
    and the auth file (their ValueErrors), the folders and files the flags name, and that the
    ports are free. A failure raises UserError (or ValueError), which `ttmm` prints as one
    line saying what is wrong and what to do, exiting 2. (The library's contents, the model's
    fingerprint and the embedder are checked by the start itself: LibraryError, same line.)"""
    from ttmm_vllm.library import MANIFEST
    from ttmm_vllm.serve.service import ServiceConfig

    configs(args)
    ServiceConfig(default_reroute_every=max(args.reroute_every, 0))
    if args.ray is not None and args.http_port is not None:
        raise UserError("--http-port (the OpenAI-compatible API) is not served through Ray "
                        "Serve yet; drop --ray or --http-port")
    build_it = "give the folder `ttmm build --out` or `ttmm library create` wrote"
    library = Path(args.library).expanduser()
    if not library.is_dir():
        raise UserError(f"--library {args.library}: no such directory; {build_it}")
    if not (library / MANIFEST).is_file():
        raise UserError(f"--library {args.library}: not an expert library (no {MANIFEST}); "
                        f"{build_it}")
    for flag, folder in (("--base-model", args.base_model), ("--embedder", args.embedder)):
        if folder and not Path(folder).expanduser().is_dir():
            raise UserError(f"{flag} {folder}: no such directory; give a local model folder, "
                            f"or drop {flag} to use the library's")
    for flag, file in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--tls-client-ca", args.tls_client_ca)):
        if file:
            try:
                Path(file).expanduser().open("rb").close()
            except OSError as e:
                raise UserError(f"{flag} {file}: cannot read it ({e.strerror}); give a "
                                "readable file") from None
    if args.ray is None:  # Ray Serve's proxies listen where Ray puts them
        seen: dict[int, str] = {}
        for flag, port in (("--port", args.port), ("--http-port", args.http_port),
                           ("--metrics-port", args.metrics_port)):
            if port:  # None: off; 0: any free port
                if port in seen:
                    raise UserError(f"{seen[port]} and {flag} are both {port}; give each its "
                                    "own port")
                seen[port] = flag
                check_port(flag, args.host, port)


def check_port(flag: str, host: str, port: int) -> None:
    """UserError unless `host:port` can be listened on now (bound and let go at once; the
    server binds the same way, with SO_REUSEADDR)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE)[0]
    except OSError:
        return  # a host that does not resolve: the server's start says so
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"{flag} {port}: {host}:{port} is already in use; stop whatever "
                                f"listens there or choose another {flag}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: cannot listen there ({e.strerror}); give an "
                                "address of this machine (0.0.0.0: all of them)") from None
            raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}); "
                            f"choose another {flag}") from None


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
