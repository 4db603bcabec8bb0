"""``offloadfs``: the VM side's command line (run, status; mount comes with the filesystem)."""
from __future__ import annotations

import argparse
import sys

from . import offld


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``offloadfs``."""
    p = argparse.ArgumentParser(prog="offloadfs", description="Offload commands to compute hosts.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run a command on a host (same as offld)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``offloadfs``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return offld.main(argv[1:], prog="offloadfs run")
    parser().parse_args(argv)
    return 2


def entry() -> None:
    """Console-script entry point of ``offloadfs``."""
    sys.exit(main())
