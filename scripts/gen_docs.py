#!/usr/bin/env python3
"""Man pages and bash/zsh completions of offloadfs, offld and offloadd, from their argparse
parsers: writes hooks/man/*.1 and hooks/completion/{bash,zsh}/ (committed, so that a pip
install needs neither generator). ``--check`` writes nothing and exits 1 if a committed copy is
stale. Needs argparse-manpage and shtab (the ``test`` extra); run with the venv's python:

    .venv/bin/python scripts/gen_docs.py [--check]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

HOOKS = Path(__file__).resolve().parents[1] / "hooks"
WIDTH = 100           # the width argparse wraps usage lines at
DATE = "2026-12-01"   # the pages' date (their footer): bump it with offloadfs.__version__
FILES = r""".TP
.I /etc/offloadfs/offloadfs.toml
the VM side's settings (\fB\-c\fR or \fBOFFLOADFS_CONFIG\fR name another file)
.TP
.I /etc/offloadfs/offloadd.toml
the compute host's settings
.TP
.I /usr/share/doc/offloadfs/examples/
commented examples of both files, every key with its default (from pip:
share/offloadfs/examples/ under the install prefix)
.TP
.I $XDG_STATE_HOME/offloadfs/jobs.jsonl
the job log (default ~/.local/state/offloadfs/jobs.jsonl)"""
SEE_ALSO = ("offloadfs", "offld", "offloadd")
EXTRA = {
    "offloadfs": {"FILES": FILES, "ENVIRONMENT": r""".TP
.B OFFLOADFS_CONFIG
the settings file when \fB\-c\fR is not given
.TP
.B OFFLOADFS_DEBUG=1
a caller's jobs through the mount say on its stderr where they ran and why"""},
    "offld": {"EXIT STATUS": r"""The job's own exit status (128+N if a signal N killed it).
255 with one line \fBoffld: ...\fR on stderr if the offload itself failed: no host took the
job, or the host was lost (then the line says whether the job may have run; it is never run
twice). 2 for a usage error.""", "FILES": FILES, "ENVIRONMENT": r""".TP
.B OFFLOADFS_CONFIG
the settings file when \fB\-c\fR is not given
.TP
.B OFFLOADFS_DEBUG=1
as \fB\-d\fR"""},
    "offloadd": {"FILES": FILES, "NOTES": r"""Jobs run as the user who asked for them, never
as root unless \fB\-\-allow\-root\fR (or allow_root in the file) says so, and only commands of
the allowlist run. The systemd unit offloadd.service runs \fBoffloadd serve \-c
/etc/offloadfs/offloadd.toml\fR."""},
}


def programs() -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Each program's parser and its one-line description (the man page's NAME)."""
    from offloadd import cli as daemon_cli

    from offloadfs import cli, offld
    return {
        "offloadfs": (cli.parser(), "the VM side of offloadfs: mount the shims, status, keys"),
        "offld": (offld.parser("offld"), "run one command on a compute host as if it ran here"),
        "offloadd": (daemon_cli.parser(), "the compute host's daemon and broker of offloadfs"),
    }


def manpage(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    """The roff text of ``name``'s man page (section 1)."""
    from argparse_manpage.manpage import Manpage

    from offloadfs import __version__
    # The _data dict is how argparse-manpage's own command line passes these (its cli.py).
    page = Manpage(parser, _data={"project_name": "offloadfs", "version": __version__,
                                  "description": summary, "date": DATE,
                                  "manual_title": "offloadfs manual", "manual_section": "1"})
    for heading, content in EXTRA.get(name, {}).items():
        page.add_section(heading, ">", content)
    page.add_section("SEE ALSO", ">", ",\n".join(f".BR {other} (1)" for other in SEE_ALSO
                                                 if other != name))
    return str(page)


def zsh_safe(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with colons in metavars escaped (HOST[:PORT]): zsh's _arguments splits a
    spec at unescaped colons, and shtab passes metavars through as they are."""
    todo = [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            if isinstance(action.metavar, str):
                action.metavar = action.metavar.replace(":", r"\:")
            if isinstance(action, argparse._SubParsersAction):
                todo += list(dict.fromkeys(action.choices.values()))
    return parser


def outputs() -> dict[Path, str]:
    """Every generated file (path under hooks/) and its text, the same on any terminal."""
    with width(WIDTH):
        return _outputs()


@contextlib.contextmanager
def width(columns: int):
    """argparse wraps usage lines at $COLUMNS (else the terminal's width): fix it meanwhile."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _outputs() -> dict[Path, str]:
    """:func:`outputs`, at whatever width argparse finds."""
    import shtab

    out = {}
    for name, (parser, summary) in programs().items():
        out[Path("man") / f"{name}.1"] = manpage(name, parser, summary)
        out[Path("completion/bash") / name] = shtab.complete(parser, shell="bash")
    for name, (parser, _) in programs().items():   # fresh parsers: zsh_safe changes them
        out[Path("completion/zsh") / f"_{name}"] = shtab.complete(zsh_safe(parser), shell="zsh")
    return out


def stale(hooks: Path = HOOKS) -> list[str]:
    """The generated files whose committed copy under ``hooks`` differs or is missing."""
    return [str(path) for path, text in outputs().items()
            if not (hooks / path).exists() or (hooks / path).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    """Write the files (or, with --check, say which are stale)."""
    p = argparse.ArgumentParser(prog="gen_docs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = p.parse_args(argv)
    if args.check:
        left = stale()
        for path in left:
            print(f"gen_docs.py: hooks/{path} is stale: run scripts/gen_docs.py", file=sys.stderr)
        return 1 if left else 0
    for path, text in outputs().items():
        (HOOKS / path).parent.mkdir(parents=True, exist_ok=True)
        (HOOKS / path).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
