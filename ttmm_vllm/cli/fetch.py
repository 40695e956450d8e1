"""`ttmm fetch`: make the offline base model, embedder and corpora under $TTMM_HOME.

    ttmm fetch base-model                  models/SmolLM2-135M-Instruct (fp32, from a GGUF)
    ttmm fetch embedder                    models/all-MiniLM-L6-v2
    ttmm fetch corpus wiki                 corpora/wiki.jsonl (10,033 Wikipedia extracts)
    ttmm fetch corpus python [--root DIR]  corpora/python*.jsonl (deduplicated .py files)

Each prints the path it produced as the last line of stdout (progress goes to stderr), so a
script can capture it: `MODEL=$(ttmm fetch base-model | tail -n1)`. An artefact that is
already there and intact is reused at once; `--force` rebuilds it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=None,
                        help="cache folder (default: $TTMM_HOME, else ~/.cache/ttmm)")
    common.add_argument("--force", action="store_true",
                        help="rebuild even if an intact artefact is there")

    fetch = subparsers.add_parser("fetch", help="fetch the offline model, embedder, corpora",
                                  description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    what = fetch.add_subparsers(dest="what", required=True, metavar="WHAT")
    what.add_parser("base-model", parents=[common],
                    help="SmolLM2-135M-Instruct as an fp32 Hugging Face folder"
                    ).set_defaults(func=run_base_model)
    what.add_parser("embedder", parents=[common],
                    help="all-MiniLM-L6-v2 sentence-transformers folder"
                    ).set_defaults(func=run_embedder)

    corpus = what.add_parser("corpus", help="a corpus as JSONL").add_subparsers(
        dest="corpus", required=True, metavar="NAME")
    corpus.add_parser("wiki", parents=[common],
                      help="10,033 English Wikipedia extracts").set_defaults(func=run_wiki)
    python = corpus.add_parser("python", parents=[common],
                               help="deduplicated .py files of an environment")
    python.add_argument("--root", metavar="DIR", action="append", default=None,
                        help="folder to collect .py files from (repeatable; default: this "
                        "environment's site-packages)")
    python.add_argument("--stdlib", action="store_true",
                        help="also collect the standard library (adds its folder to the roots)")
    python.add_argument("--min-bytes", type=int, default=None, metavar="N",
                        help="skip smaller files (default 500)")
    python.add_argument("--max-bytes", type=int, default=None, metavar="N",
                        help="skip larger files (default 100000)")
    python.set_defaults(func=run_python)


def _home(args: argparse.Namespace) -> Path:
    from ttmm_vllm.home import ttmm_home

    return ttmm_home(args.home)


def _done(make: Callable[[], Path]) -> int:
    """Print the artefact's path; a known failure is one line on stderr, not a traceback."""
    from training.sources.pypi import DownloadError
    from training.sources.readers import CorpusError

    try:
        path = make()
    except (CorpusError, DownloadError) as e:
        print(f"ttmm fetch: error: {e}", file=sys.stderr)
        return 1
    print(path, flush=True)
    return 0


def run_base_model(args: argparse.Namespace) -> int:
    from training.sources.models import fetch_base_model

    return _done(lambda: fetch_base_model(_home(args), force=args.force))


def run_embedder(args: argparse.Namespace) -> int:
    from training.sources.models import fetch_embedder

    return _done(lambda: fetch_embedder(_home(args), force=args.force))


def run_wiki(args: argparse.Namespace) -> int:
    from training.sources.corpora import fetch_wiki

    return _done(lambda: fetch_wiki(_home(args), force=args.force))


def run_python(args: argparse.Namespace) -> int:
    from training.sources import corpora

    roots = list(args.root or [])
    if args.stdlib:
        roots = (roots or corpora.default_python_roots()) + [corpora.stdlib_root()]
    sizes = {}
    if args.min_bytes is not None:
        sizes["min_bytes"] = args.min_bytes
    if args.max_bytes is not None:
        sizes["max_bytes"] = args.max_bytes
    return _done(lambda: corpora.fetch_python(_home(args), roots or None, force=args.force,
                                                **sizes))
