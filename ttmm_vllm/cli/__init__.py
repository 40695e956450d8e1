"""`ttmm`: one subcommand per module in ttmm_vllm/commands (a parser function and a run
function over importable library code; heavy imports stay inside run)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ttmm_vllm.home import offline_env

# subcommand name -> module under ttmm_vllm.cli
COMMANDS = {
    "fetch": "fetch",
    "build": "build",
    "serve": "serve",
    "generate": "generate",
    "route": "route",
    "demo": "demo",
    "library": "library",
    "expert": "expert",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttmm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"ttmm_vllm.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"ttmm_vllm.cli.{module}":
                continue  # not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
