"""``python -m bench NAME [--quick]``: run one registered benchmark, or ``all`` of them and
write bench/results/RESULTS.md; ``report`` rewrites RESULTS.md from the JSON already there."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys

from . import BENCHMARKS, report
from .common import BenchError, compile_package, mark_run_start


def parser() -> argparse.ArgumentParser:
    """One subcommand per registered benchmark, plus ``all``."""
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Run a benchmark of offloadfs, or all of them.")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        s = sub.add_parser(name, parents=[shared], help=module.__doc__.splitlines()[0])
        if hasattr(module, "add_arguments"):
            module.add_arguments(s)
    sub.add_parser("all", parents=[shared], help="run every benchmark with its defaults, then "
                   "write bench/results/RESULTS.md")
    sub.add_parser("report", help="write bench/results/RESULTS.md from the JSON of earlier runs")
    return p


def run_one(name: str, argv: list[str]) -> str | None:
    """Run benchmark ``name`` with its own options parsed from ``argv``; why it failed, or
    None."""
    opts = parser().parse_args([name, *argv])
    mark_run_start()
    try:
        BENCHMARKS[name].run(opts)
    except BenchError as exc:
        print(f"bench {name}: {exc}", file=sys.stderr)
        return str(exc).splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 if every benchmark run succeeded."""
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run finally:s
    opts = parser().parse_args(argv)
    command = shlex.join(["python", "-m", "bench", *argv])
    if opts.name == "report":
        report.write(BENCHMARKS, {}, command + " (from the JSON of earlier runs)")
        return 0
    compile_package()   # start-up as installed, whatever PYTHONDONTWRITEBYTECODE says
    names = list(BENCHMARKS) if opts.name == "all" else [opts.name]
    rest = ["--quick"] if opts.name == "all" and opts.quick else argv[1:]
    failures = {}
    for name in names:
        if opts.name == "all":
            print(f"\n=== {name} ===", flush=True)
        if (why := run_one(name, rest)) is not None:
            failures[name] = why
    if opts.name == "all":
        report.write(BENCHMARKS, failures, command)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
