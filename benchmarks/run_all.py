"""Every benchmark, one after another, each in its own process (each starts and stops its own
vLLM engine; separate processes give every one a clean machine).

    python -m benchmarks.run_all --smoke     # tiny model + tiny library: a few minutes
    python -m benchmarks.run_all             # the real runs (libraries below), about 2 hours

The real runs: quality on the Wikipedia library (prefix 50) and on the Python library (prefix
200), overhead on the Python library (K=32, so 30 experts can be active), throughput on the
Wikipedia library. Results go to OUT/<benchmark>-<library>/ (default results/).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

LIBRARIES = Path("~/.cache/ttmm/libraries").expanduser()


def jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(folder name, command line) per benchmark run."""
    if args.smoke:
        assets = ["--smoke", "--assets", str(args.out / "assets")]
        return [("quality", ["quality", *assets]),
                ("overhead", ["overhead", *assets]),
                ("throughput", ["throughput", *assets]),
                ("rerouting", ["rerouting", *assets])]
    wiki, py = str(args.wiki), str(args.python)
    return [("quality-wiki", ["quality", "--library", wiki, "--prefix-tokens", "50",
                              "--test-docs", "64", "--ttt-neighbours", "16"]),
            ("quality-python", ["quality", "--library", py, "--prefix-tokens", "200",
                                "--test-docs", "64", "--ttt-neighbours", "8"]),
            ("overhead", ["overhead", "--library", py]),
            ("throughput", ["throughput", "--library", wiki, "--concurrency", "1", "8", "32"]),
            ("rerouting-wiki", ["rerouting", "--library", wiki, "--prefix-tokens", "50"]),
            ("rerouting-python", ["rerouting", "--library", py, "--prefix-tokens", "100"])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and library, minutes")
    p.add_argument("--out", type=Path, default=None,
                   help="results root (default results/ or results/smoke/)")
    p.add_argument("--wiki", type=Path, default=LIBRARIES / "wiki-k16")
    p.add_argument("--python", type=Path, default=LIBRARIES / "python-k32")
    p.add_argument("--only", nargs="+", default=None, help="run only these folder names")
    args = p.parse_args(argv)
    args.out = args.out or (common.RESULTS / "smoke" if args.smoke else common.RESULTS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:  # build the tiny assets once, before the benchmarks share them
        common.offline_env()
        common.smoke_assets(args.out / "assets")
    failed = []
    for name, cmd in jobs(args):
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        common.log(f"run_all: {name}")
        rc = subprocess.run([sys.executable, "-m", f"benchmarks.{cmd[0]}", *cmd[1:],
                             "--out", str(args.out / name)]).returncode
        common.log(f"run_all: {name} {'ok' if rc == 0 else f'FAILED ({rc})'} in "
                   f"{time.perf_counter() - t0:.0f}s -> {args.out / name}")
        if rc:
            failed.append(name)
    if failed:
        common.log(f"run_all: failed: {', '.join(failed)}")
        return 1
    common.log(f"run_all: every benchmark wrote its results under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
