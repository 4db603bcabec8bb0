"""What the command lines, ``offloadfs``, ``offld`` and ``offloadd``, share: ``--version``, the
``keygen`` subcommand and running the chosen subcommand, a ConfigError being one line on
stderr.

Light to import: the keys (and zmq) load only when ``keygen`` runs.
"""
from __future__ import annotations

import sys

from . import __version__
from .settings import ConfigError

USAGE_ERROR = 2    # the exit status of a configuration file or flag that cannot be used


def add_version(parser) -> None:
    """``--version``: the program's name and the package's one version (offloadfs.__version__,
    which setup.cfg reads too)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_keygen(sub, whose: str) -> None:
    """Add the ``keygen DIR NAME`` subcommand to ``sub``; ``whose``: what NAME names."""
    k = sub.add_parser("keygen", help="write a CURVE key pair: DIR/NAME.key and "
                       "DIR/NAME.key_secret")
    k.add_argument("directory", metavar="DIR")
    k.add_argument("name", metavar="NAME", help=f"the key's name ({whose})")


def keygen(args) -> int:
    """``offloadfs keygen`` and ``offloadd keygen DIR NAME``: write a key pair, say where."""
    from .keys import keygen_command
    return keygen_command(args.directory, args.name)


def run(prog: str, commands: dict, args) -> int:
    """Run the function of ``commands`` that ``args.cmd`` names; its exit status, or 2 with
    one line on stderr if a setting cannot be used."""
    try:
        return commands[args.cmd](args)
    except ConfigError as exc:
        from . import logsetup  # only now: offld's start-up does without it
        print(logsetup.error_line(f"{prog}: {exc}"), file=sys.stderr)
        return USAGE_ERROR
