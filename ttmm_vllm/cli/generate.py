"""`ttmm generate`: send one prompt to a running server and print the routing and the text."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from a running ttmm server")
    p.add_argument("prompt")
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--mode", choices=("ttmm", "base", "top1", "uniform"))
    p.add_argument("--max-active", type=int)
    p.add_argument("--beta", type=float)
    p.add_argument("--tau", type=float)
    p.add_argument("--experts", type=int, nargs="*", default=())
    p.add_argument("--token", help="bearer token")
    p.add_argument("--ca", help="PEM root certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=run)


def format_routing(routing) -> str:
    if not routing.experts:
        return "  (base model, no experts)"
    lines = [f"  expert {e.expert_id:>4}  w={e.weight:.3f}  sim={e.similarity:.3f}  {e.title}"
             for e in sorted(routing.experts, key=lambda e: -e.weight)]
    if routing.out_of_reach:
        lines.append("  (out of reach: no expert is close to this prompt)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import grpc

    from ttmm_vllm.client import TTMMClient, routing_options, sampling_options

    root = Path(args.ca).read_bytes() if args.ca else None
    client = TTMMClient(args.target, token=args.token, root_certificates=root)
    routing = routing_options(args.mode, beta=args.beta, tau=args.tau,
                              max_active=args.max_active, experts=args.experts)
    sampling = sampling_options(max_tokens=args.max_tokens, temperature=args.temperature)
    try:
        if args.stream:
            for chunk in client.stream(args.prompt, sampling=sampling, routing=routing,
                                       timeout=args.timeout):
                if chunk.HasField("routing"):
                    print(format_routing(chunk.routing), file=sys.stderr)
                print(chunk.text, end="", flush=True)
            print()
        else:
            r = client.generate(args.prompt, sampling=sampling, routing=routing,
                                timeout=args.timeout)
            print(format_routing(r.routing), file=sys.stderr)
            print(r.text)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
