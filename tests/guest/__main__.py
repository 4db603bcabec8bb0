"""``scripts/vm COMMAND``: the guest rig (docs/deployment.md).

- ``build``: build (or find in the cache) the guest image for the current sources;
- ``check [SCENARIO...]``: boot a guest, run the scenarios (both by default), one line each,
  ``ok NAME: evidence`` or ``FAIL NAME: why``; exit 0 only if all held;
- ``run -- COMMAND...``: boot a guest, run one command in it as root, print its output, stop;
- ``clean``: remove the cache.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys

from . import image, scenarios
from .machine import Guest, GuestError


def parser() -> argparse.ArgumentParser:
    """The subcommands."""
    p = argparse.ArgumentParser(prog="scripts/vm", description="The offloadfs guest rig.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the guest image (cached by its inputs)")
    c = sub.add_parser("check", help="run the guest scenarios")
    c.add_argument("scenario", nargs="*", choices=[[], *scenarios.SCENARIOS],
                   help="kernel-nfs-client, kernel-nfsd (default: both)")
    r = sub.add_parser("run", help="run one command in a fresh guest")
    r.add_argument("argv", nargs="+")
    sub.add_parser("clean", help="remove the cached images")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; one line and exit 1 on any failure of the rig itself."""
    opts = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the guest
    try:
        if opts.command == "clean":
            shutil.rmtree(image.CACHE, ignore_errors=True)
            return 0
        built = image.ensure(log=lambda line: print(line, flush=True))
        if opts.command == "build":
            print(built.disk)
            return 0
        if opts.command == "run":
            with Guest(built) as g:
                done = g.run(opts.argv, check=False)
            sys.stdout.buffer.write(done.out)
            sys.stderr.buffer.write(done.err)
            return done.rc
        held = scenarios.check(built, opts.scenario or tuple(scenarios.SCENARIOS),
                               out=lambda line: print(line, flush=True))
        return 0 if held else 1
    except (image.BuildError, GuestError, OSError) as exc:
        print(f"vm: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
