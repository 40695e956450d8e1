"""`ttmm expert`: the experts a running server serves, listed, added and removed live.

    ttmm expert list --target HOST:PORT [--token T]
    ttmm expert add ID --target HOST:PORT --token ADMIN_TOKEN
    ttmm expert remove ID --target HOST:PORT --token ADMIN_TOKEN

`add` serves an expert already placed in the server's library directory: `ttmm library import
LIB ADAPTER --samples FILE --pending` puts it there and prints its id. `remove` stops routing
to an expert; requests in flight finish with the weights they started with. Adding and removing
need one of the server's admin tokens (`ttmm serve --auth FILE`: "admin_tokens").
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("expert", help="list, add or remove a running server's experts",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="expert_command", required=True, metavar="ACTION")
    specs = (("list", "the experts the server serves (to this client)", False),
             ("add", "serve an expert placed in the server's library directory", True),
             ("remove", "stop serving an expert", True))
    for name, helptext, takes_id in specs:
        c = cmds.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:]
                            + ("; needs an admin token." if takes_id else "."))
        if takes_id:
            c.add_argument("expert_id", type=int, metavar="ID", help="the expert's id")
        c.add_argument("--target", default="127.0.0.1:50051",
                       help="the server, HOST:PORT (default: %(default)s)")
        c.add_argument("--token", help="bearer token (an admin token for add and remove)")
        c.add_argument("--ca", metavar="PEM", help="root certificate: connect with TLS")
        c.add_argument("--timeout", type=float, default=60, help="seconds (default: "
                       "%(default)s)")
        c.set_defaults(func=run, action=name)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import grpc

    from ttmm_vllm.client import TTMMClient

    action = args.action
    try:
        root = Path(args.ca).read_bytes() if args.ca else None
    except OSError as e:
        print(f"ttmm expert {action}: --ca {args.ca}: {e.strerror}", file=sys.stderr)
        return 1
    client = TTMMClient(args.target, token=args.token, root_certificates=root)
    try:
        if action == "list":
            resp = client.list_experts(timeout=args.timeout)
            print(f"base model {resp.base_model}, embedder {resp.embedder}, defaults beta "
                  f"{resp.default_beta:g} tau {resp.default_tau:g}, query tokens "
                  f"{resp.query_tokens}; {len(resp.experts)} experts")
            for e in sorted(resp.experts, key=lambda e: e.expert_id):
                print(f"  {e.expert_id:>5}  rank {e.rank:>3}  size {e.size:>6}  group "
                      f"{e.group:<10}  {e.title}")
        elif action == "add":
            e = client.add_expert(args.expert_id, timeout=args.timeout)
            print(f"serving expert {e.expert_id} {e.title!r} (rank {e.rank}, group {e.group})")
        else:
            client.remove_expert(args.expert_id, timeout=args.timeout)
            print(f"removed expert {args.expert_id}")
    except grpc.RpcError as e:
        code = e.code()
        detail = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            detail = f"cannot reach {args.target} ({detail.splitlines()[0] if detail else ''})"
        print(f"ttmm expert {action}: {code.name}: {detail}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
