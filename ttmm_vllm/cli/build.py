"""`ttmm build`: train an expert library from a corpus (training/pipeline.py).

    ttmm build --corpus wiki --base-model MODEL_DIR --embedder EMBEDDER_DIR -K 16 \\
        --max-docs-per-expert 120 --multitask --out ~/.cache/ttmm/libraries/wiki-k16

With --multitask the build also trains experts branched from the multitask model and keeps
whichever set tunes better (--branch-from-multitask auto), and it routes with whichever
embedding finds each document's own cluster more often (--embedder-kind auto); report.md in
the library says what won and by how much.

Every flag is a field of `training.config.BuildConfig` (help text and checks live there).
Rerunning the same command resumes: cached stages and finished experts are skipped. With
`--shard i/n` on several machines (or processes) each trains every n-th expert; copy the
expert folders together and rerun without --shard to write the library. With `--ray [ADDRESS]`
the experts train as Ray tasks instead (training/ray_build.py; no shared filesystem needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any


def _arg_type(hint: typing.Any) -> tuple[typing.Any, bool]:
    """(element type, is a sequence) for a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return _arg_type(args[0])
    return hint, False


def add_parser(subparsers: Any) -> None:
    from training.config import BuildConfig

    p = subparsers.add_parser("build", help="train an expert library from a corpus",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(BuildConfig)
    for f in dataclasses.fields(BuildConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        typ, many = _arg_type(hints[f.name])
        default = f.default
        helptext = f.metadata.get("help", "")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=helptext)
            continue
        shown = " ".join(map(str, default)) if many else default
        if isinstance(default, Path) and str(default) == ".":
            shown = "none"
        required = f.name in ("corpus", "out", "base_model")
        const = f.metadata.get("const")
        extra = {"nargs": "?", "const": const} if const is not None else \
            {"nargs": "+" if many else None}
        p.add_argument(flag, dest=f.name, type=typ, default=None if required else default,
                       required=required, metavar=f.name.upper(),
                       help=helptext + ("" if required else f" (default: {shown})"), **extra)
    p.add_argument("--home", default=None, help="TTMM_HOME for named corpora "
                                                "(default: $TTMM_HOME, else ~/.cache/ttmm)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from training.config import BuildConfig
    from ttmm_vllm.home import ttmm_home

    kw = {}
    for f in dataclasses.fields(BuildConfig):
        if f.name == "home" or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        kw[f.name] = tuple(v) if isinstance(v, list) else v
    for name in ("out", "base_model", "embedder", "work_dir"):
        if kw.get(name) is not None:
            kw[name] = Path(kw[name]).expanduser()
    return BuildConfig(home=ttmm_home(args.home), **kw)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"ttmm build: {e}", file=sys.stderr)
        return 2
    from training.pipeline import build

    lib = build(cfg)
    if lib is None:
        print(f"shard {cfg.shard} finished; the library is written once every shard is done",
              file=sys.stderr)
        return 0
    m = lib.manifest
    print(f"library {lib.root}: {lib.num_experts} experts; router beta={m.router.beta} "
          f"tau={m.router.tau} ({m.router.sparse_softmax}); report {lib.root / 'report.md'}",
          file=sys.stderr)
    print(lib.root)
    return 0
