"""`ttmm`: one subcommand per module in ttmm_vllm/cli (a parser function and a run
function over importable library code; heavy imports stay inside run).

A mistake the user can fix (a flag, a path, a busy port) ends as one line on stderr,
`ttmm COMMAND: what is wrong; what to do`, and exit status 2, never a traceback: subcommands
raise `UserError` (or let a ValueError / LibraryError through) and one handler, `guarded`,
which the parser wraps around every subcommand's run function (`args.func`), prints it
(`user_error_message` says which errors are the user's). With -v the traceback is logged too.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import logging
import sys
from collections.abc import Callable

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


# The exit status of a user error (argparse's own usage errors exit 2 as well)
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; its message says what is wrong and what to do, on one line.
    `main` prints it as `ttmm COMMAND: <message>` and exits 2."""


def user_error_message(e: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None (a bug: a traceback).

    The user's: UserError; ValueError, which is what the configs, the flag parsers and the
    library (LibraryError) raise for bad input; a port that cannot be listened on (an
    OSError, or the RuntimeError grpc raises when it cannot bind)."""
    if isinstance(e, UserError | ValueError):
        message = str(e)
    elif isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
        message = f"{e.strerror or e}; stop whatever listens there or choose another port"
    elif isinstance(e, OSError) and e.errno == errno.EADDRNOTAVAIL:
        message = f"{e.strerror or e}; --host must be an address of this machine"
    elif isinstance(e, RuntimeError) and str(e).startswith("Failed to bind to address"):
        address = str(e).split(";")[0].removeprefix("Failed to bind to address ")
        message = (f"cannot listen on {address} (in use?); stop whatever listens there or "
                   "choose another --port or --host")
    else:
        return None
    return " ".join(message.split()) or type(e).__name__


def version() -> str:
    """The installed distribution's version (a source tree that was never installed: unknown)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ttmm-vllm")
    except PackageNotFoundError:
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """The `ttmm` parser: the run function it parses into `args.func` is `guarded`."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, rest = super().parse_known_args(args, namespace)
        func = getattr(parsed, "func", None)
        if func is not None and not getattr(func, "ttmm_guarded", False):
            parsed.func = guarded(parsed.command, func)
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ttmm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=argparse.ArgumentParser)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"ttmm_vllm.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"ttmm_vllm.cli.{module}":
                continue  # not built yet
            raise
        mod.add_parser(sub)
    return parser


RunFunction = Callable[[argparse.Namespace], int | None]


def guarded(command: str, func: RunFunction) -> RunFunction:
    """`func` (a subcommand's run function) with the one user-error handler around it: a
    user error (`user_error_message`) becomes `ttmm COMMAND: <message>` on stderr and exit
    status 2; anything else propagates (a bug: its traceback)."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int | None:
        try:
            return func(args)
        except Exception as e:
            message = user_error_message(e)
            if message is None:
                raise
            logging.getLogger("ttmm").debug("the user error's traceback", exc_info=True)
            print(f"ttmm {command}: {message}", file=sys.stderr)
            return USER_ERROR_EXIT

    run.ttmm_guarded = True  # type: ignore[attr-defined]
    return run


def main(argv: list[str] | None = None) -> int:
    offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)  # guarded: a user error is one line and status 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
