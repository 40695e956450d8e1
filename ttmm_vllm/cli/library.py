"""`ttmm library`: make a library from PEFT LoRA adapters you already have, tune and check it.

    ttmm library create --base-model MODEL_DIR --embedder EMBEDDER_DIR --out LIB
    ttmm library import LIB ADAPTER_DIR --samples docs.jsonl --title "legal" [--group G]
    ttmm library tune LIB --samples legal=held-out-legal.txt --samples medical=held-out.jsonl
    ttmm library validate LIB

An adapter is a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) trained on
the library's base model, or a Hugging Face id (with hub access). Its samples (JSONL {"text"}
per line, or plain text with one document per paragraph) are documents it was trained on or is
meant for: routing sends a prompt to the adapters whose samples it resembles. For a library a
server is serving, import with --pending and serve it with `ttmm expert add ID`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _moved_sources(p: Any) -> None:
    """--base-model / --embedder: where the library's models are now, if they moved."""
    p.add_argument("--base-model", metavar="MODEL",
                   help="the base model folder if it moved since the library was made")
    p.add_argument("--embedder", metavar="EMBEDDER",
                   help="the embedder folder if it moved since the library was made")


def add_parser(sub) -> None:
    p = sub.add_parser("library", help="make a library from existing PEFT LoRA adapters; "
                       "tune and validate libraries", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="library_command", required=True, metavar="ACTION")

    c = cmds.add_parser("create", help="an empty library for a base model and an embedder",
                        description="Create an empty library: the base model the adapters were "
                        "trained on (recorded by path and fingerprint) and the sentence "
                        "embedder that routes prompts.")
    c.add_argument("--base-model", required=True, metavar="MODEL",
                   help="the base model folder (config.json + *.safetensors) or hub id")
    c.add_argument("--embedder", metavar="EMBEDDER",
                   help="sentence-transformers folder or hub id (required unless "
                        "--embedder-kind base-hidden)")
    c.add_argument("--embedder-kind", choices=("sentence-transformers", "base-hidden"),
                   default="sentence-transformers",
                   help="base-hidden: route by the base model's mean-pooled hidden states "
                        "(default: %(default)s)")
    c.add_argument("--out", required=True, metavar="LIB", help="the new library folder")
    c.add_argument("--query-tokens", type=int, default=50, metavar="N",
                   help="prompt tokens routing embeds (default: %(default)s)")
    c.add_argument("--name", help="the base model's name in the manifest (default: its "
                                  "folder's name)")
    c.set_defaults(func=run_create)

    i = cmds.add_parser("import", help="add a PEFT LoRA adapter as a new expert",
                        description="Copy a PEFT LoRA adapter folder into the library as a "
                        "new expert. Its centroid is the mean embedding of --samples. Refused "
                        "(with the reason): adapters for another base model, modules the base "
                        "does not have, DoRA, non-safetensors weights, non-LoRA PEFT types, "
                        "fan_in_fan_out, trained biases or modules_to_save.")
    i.add_argument("library", metavar="LIB")
    i.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA folder or hub id")
    i.add_argument("--samples", metavar="FILE",
                   help="documents the adapter is for: JSONL with a \"text\" per line, or "
                        "plain text with one document per paragraph (without: its title is "
                        "embedded, a weak router)")
    i.add_argument("--title", help="its title (default: the adapter folder's name)")
    i.add_argument("--group", default="default",
                   help="its access group (default: %(default)s)")
    i.add_argument("--id", type=int, dest="expert_id", metavar="ID",
                   help="its expert id (default: the next free one)")
    i.add_argument("--pending", action="store_true",
                   help="for a served library: place it for `ttmm expert add ID` and leave "
                        "the manifest to the server")
    _moved_sources(i)
    i.set_defaults(func=run_import)

    t = cmds.add_parser("tune", help="tune routing defaults (beta, tau, max_active) on "
                        "held-out samples and report routing accuracy",
                        description="Tune the router's defaults on held-out samples of each "
                        "expert: each sample's first query_tokens tokens are routed, the rest "
                        "is scored under the merge they route to; the lowest perplexity wins "
                        "(the build's criterion). Reports pass@1/pass@3 (is the sample's own "
                        "adapter the top / among the top 3 experts) and writes the defaults "
                        "into the manifest.")
    t.add_argument("library", metavar="LIB")
    t.add_argument("--samples", action="append", required=True, metavar="EXPERT=FILE|FILE",
                   help="held-out samples of one expert (EXPERT: id or title; FILE as for "
                        "import), or a JSONL file of {\"expert\", \"text\"}; repeatable")
    t.add_argument("--betas", type=float, nargs="+", metavar="B",
                   default=[0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 10.0],
                   help="temperatures tried (default: %(default)s)")
    t.add_argument("--taus", type=float, nargs="+", metavar="T", default=[0.0, 0.01, 0.03],
                   help="sparsity thresholds tried, each < 1/K (default: %(default)s)")
    t.add_argument("--active-counts", type=int, nargs="+", metavar="N", default=[1, 3, 10],
                   help="max_active values tried (default: %(default)s)")
    t.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                   help="tokens of each sample scored at most (default: %(default)s)")
    t.add_argument("--dry-run", action="store_true", help="report, do not write the manifest")
    t.add_argument("--json", metavar="FILE", help="also write the report (with the grid) here")
    _moved_sources(t)
    t.set_defaults(func=run_tune)

    v = cmds.add_parser("validate", help="check a library: checksums, shapes, ranks, finite "
                        "values, base fingerprint",
                        description="Check a library built anywhere; exit 1 with every "
                        "problem listed.")
    v.add_argument("library", metavar="LIB")
    v.add_argument("--base-model", metavar="MODEL",
                   help="the base model folder to check against (default: the library's)")
    v.set_defaults(func=run_validate)


def _fail(action: str, e: BaseException) -> int:
    print(f"ttmm library {action}: {e}", file=sys.stderr)
    return 1


# Errors that are the user's to fix: one line, no traceback
def _user_errors() -> tuple[type[BaseException], ...]:
    from ttmm_vllm.library import LibraryError

    return (LibraryError, ValueError, OSError)


def run_create(args: argparse.Namespace) -> int:
    try:
        from training.import_adapters import create_library
        from ttmm_vllm.library import RouterDefaults

        if args.embedder_kind != "base-hidden" and not args.embedder:
            raise ValueError("--embedder is required (or --embedder-kind base-hidden)")
        if args.query_tokens < 1:
            raise ValueError(f"--query-tokens must be >= 1, got {args.query_tokens}")
        lib = create_library(args.out, args.base_model, args.embedder or "",
                             embedder_kind=args.embedder_kind, base_name=args.name,
                             router=RouterDefaults(query_tokens=args.query_tokens))
    except _user_errors() as e:
        return _fail("create", e)
    m = lib.manifest
    print(f"created {lib.root}: base model {m.base_model.name} (fingerprint "
          f"{m.base_model.fingerprint}), embedder {m.embedder.name} (dim {m.embedder.dim}); "
          f"no experts yet: ttmm library import {args.out} ADAPTER --samples FILE")
    return 0


def run_import(args: argparse.Namespace) -> int:
    try:
        from training.import_adapters import import_adapter, read_samples

        samples = read_samples(args.samples) if args.samples else None
        done = import_adapter(args.library, args.adapter, samples=samples, title=args.title,
                              group=args.group, expert_id=args.expert_id, pending=args.pending,
                              base_model=args.base_model, embedder_path=args.embedder)
    except _user_errors() as e:
        return _fail("import", e)
    e, a = done.info, done.adapter
    how = (f"centroid from {done.samples} samples" if not done.title_as_sample else
           "centroid from its title alone (pass --samples for a better one)")
    scale = "rsLoRA, " if a.rslora else ""
    print(f"{'placed' if done.pending else 'imported'} {a.path} as expert {e.id} "
          f"{e.title!r}: rank {e.rank}, alpha {e.alpha:g} ({scale}scaling {a.scaling:g}), "
          f"{len(a.modules)} modules ({', '.join(a.targets)}), group {e.group}; {how}")
    if done.nearest is not None:
        i, title, s = done.nearest
        warn = "  (close: routing may not tell them apart)" if s > 0.95 else ""
        print(f"nearest other expert: {i} {title!r}, centroid cosine {s:.3f}{warn}")
    if done.pending:
        print(f"serve it: ttmm expert add {e.id} --target HOST:PORT --token ADMIN_TOKEN")
    return 0


def parse_tune_samples(lib, specs: list[str]) -> dict[int, list[str]]:
    """expert id -> held-out texts, from EXPERT=FILE and labelled JSONL arguments."""
    from training.import_adapters import read_labelled_samples, read_samples, resolve_expert

    out: dict[int, list[str]] = {}
    for spec in specs:
        if Path(spec).expanduser().is_file():
            for key, text in read_labelled_samples(spec):
                out.setdefault(resolve_expert(lib, key), []).append(text)
        elif "=" in spec:
            key, path = spec.split("=", 1)
            out.setdefault(resolve_expert(lib, key), []).extend(read_samples(path))
        else:
            raise ValueError(f"--samples {spec}: neither a file nor EXPERT=FILE")
    return out


def run_tune(args: argparse.Namespace) -> int:
    try:
        from training.import_adapters import tune_library
        from ttmm_vllm.library import Library

        lib = Library.open(args.library)
        samples = parse_tune_samples(lib, args.samples)
        r = tune_library(lib, samples, base_model=args.base_model,
                         embedder_path=args.embedder, betas=args.betas, taus=args.taus,
                         active_counts=args.active_counts, max_tokens=args.max_tokens,
                         write=not args.dry_run)
    except _user_errors() as e:
        return _fail("tune", e)
    titles = lib.titles()
    print(f"held-out samples: {r.samples} over {len(r.experts)} experts (routing sees each "
          f"sample's first {r.query_tokens} tokens)")
    print(f"routing accuracy: pass@1 {r.pass_at[1]:.3f}  pass@3 {r.pass_at[3]:.3f}")
    for eid, acc in r.pass1_by_expert.items():
        print(f"  expert {eid:>4} {titles.get(eid, '')!r}: pass@1 {acc:.3f} "
              f"({r.experts[eid]} samples)")
    print(f"tuned on {r.grid_points} grid points (lowest held-out perplexity): variant "
          f"{r.variant}, beta {r.beta:g}, tau {r.tau:g}, max_active {r.max_active}")
    print(f"held-out perplexity: base {r.base_perplexity:.3f}, top-1 expert "
          f"{r.top1_perplexity:.3f}, tuned merge {r.perplexity:.3f}")
    print("written to the manifest" if r.written else "not written (--dry-run)")
    if args.json:
        Path(args.json).write_text(json.dumps(r.to_json(), indent=2) + "\n")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    try:
        from training.import_adapters import validate_library

        problems, facts = validate_library(args.library, base_model=args.base_model)
    except _user_errors() as e:
        return _fail("validate", e)
    if problems:
        print(f"{args.library}: {len(problems)} problem{'s' if len(problems) > 1 else ''}",
              file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{args.library}: OK: {facts['experts']} experts (ranks "
          f"{', '.join(map(str, facts['ranks']))}), base model {facts['base_model']} "
          f"(fingerprint matches {facts['base_model_dir']}), embedder {facts['embedder']}")
    return 0
