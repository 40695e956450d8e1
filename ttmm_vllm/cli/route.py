"""`ttmm route`: the routing of a prompt, offline (embedder + index, no engine)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("route", help="show which experts a prompt routes to (offline)")
    p.add_argument("prompt")
    p.add_argument("--library", required=True)
    p.add_argument("--embedder", help="sentence-transformers folder (default: the library's)")
    p.add_argument("--tokenizer", help="base-model folder for the query prefix "
                   "(default: the library's served model)")
    p.add_argument("--mode", choices=("ttmm", "top1", "uniform"))
    p.add_argument("--beta", type=float)
    p.add_argument("--tau", type=float)
    p.add_argument("--max-active", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ttmm_vllm.library import Library
    from ttmm_vllm.routing.embed import load_embedder
    from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, RoutingParams, Variant

    lib = Library.open(args.library, verify_checksums=False)
    m = lib.manifest
    tok = AutoTokenizer.from_pretrained(args.tokenizer or str(lib.served_model_dir()))
    emb = load_embedder(m.embedder.kind, args.embedder or m.embedder.path, m.embedder.name)
    ids = [e.id for e in m.active_experts]
    router = Router(CentroidIndex(lib.centroids, ids=ids), RoutingParams())
    r = m.router
    params = RoutingParams(beta=r.beta, tau=r.tau, max_active=r.max_active,
                           variant=Variant(r.sparse_softmax), top_m=r.top_m,
                           ood_threshold=r.ood_threshold).with_overrides(
        mode=Mode(args.mode) if args.mode else None, beta=args.beta, tau=args.tau,
        max_active=args.max_active)
    q_ids = tok(args.prompt, add_special_tokens=False)["input_ids"][: r.query_tokens]
    routing = router.route(emb.embed([tok.decode(q_ids)])[0], params)
    titles = lib.titles()
    print(f"top similarity {routing.top_similarity:.3f}, entropy {routing.entropy:.3f}"
          + ("  (out of reach)" if routing.out_of_reach else ""))
    for i, w, s in sorted(zip(routing.expert_ids, routing.weights, routing.similarities,
                              strict=True), key=lambda x: -x[1]):
        print(f"expert {i:>4}  w={w:.3f}  sim={s:.3f}  {titles.get(i, '')}")
    return 0
