"""How the long-running programs log (``offloadd serve`` and ``broker``, ``offloadfs mount``,
the host's NFS client): one handler on the root logger, set up once by each entry point.

Records go to stderr, one line each, or to a file (``offloadfs mount --log FILE``). When
stderr is the journal (systemd connected it and names it in ``$JOURNAL_STREAM``), each line
starts with its syslog priority as sd-daemon(3) spells it (``<4>`` for a warning) and carries
neither time nor level name: journald stamps the time and keeps the priority, so that
``journalctl -p warning`` finds warnings. Elsewhere a line reads ``offloadd: WARNING ...``,
with the time in front in a file. Rules only, but for
:func:`setup` and :func:`is_journal`; :func:`error_line` marks a program's one-line error.
"""
from __future__ import annotations

import logging
import os
import sys

from .settings import ConfigError

# sd-daemon(3): <2> crit, <3> err, <4> warning, <6> info, <7> debug.
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))
DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the lower one's)."""
    return next((prio for level, prio in PRIORITIES if levelno >= level), DEBUG_PRIORITY)


def is_journal(fd: int, journal_stream: str | None) -> bool:
    """True if ``fd`` is the stream that ``journal_stream`` ($JOURNAL_STREAM: the device and
    inode numbers of the journal's socket, ``DEV:INODE``) names."""
    dev, sep, ino = (journal_stream or "").partition(":")
    try:
        st = os.fstat(fd)
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def on_journal() -> bool:
    """True if this process's stderr is the journal."""
    return is_journal(2, os.environ.get("JOURNAL_STREAM"))


def error_line(text: str) -> str:
    """A one-line error for stderr (a program's last words): ``<3>`` first on the journal."""
    return f"<3>{text}" if on_journal() else text


def printable(text: str, limit: int = 200) -> str:
    """What a peer sent, fit for one log line: at most ``limit`` characters, control
    characters (a newline would forge a line) shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) with the record's priority in front."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's lines, each ``<N>`` first."""
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def formatter(name: str, *, journal: bool, timestamps: bool) -> logging.Formatter:
    """The format of ``name``'s lines: for the journal (``<N>message``), else ``name: LEVEL
    message``, the time first with ``timestamps``."""
    if journal:
        return JournalFormatter("%(message)s")
    return logging.Formatter(("%(asctime)s " if timestamps else "") +
                             f"{name}: %(levelname)s %(message)s")


def setup(name: str, debug: bool = False, path: str | None = None, *,
          timestamps: bool = False) -> None:
    """Send every logger's records (INFO and up; DEBUG too with ``debug``) to
    :func:`handler`'s stream; replaces any handler. Records skip what no format here shows
    (the caller's file and line, thread and process: the logging HOWTO's optimizations), which
    a job's two lines would otherwise pay for on the daemon's loop."""
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    logging.logProcesses = "%(process)" in name   # nfsfuse's lines name their pid
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        handlers=[handler(name, path, timestamps=timestamps)], force=True)


def handler(name: str, path: str | None = None, *, timestamps: bool = False) -> logging.Handler:
    """A handler of ``name``'s lines to stderr, or to the file ``path`` (always with the time;
    ConfigError if it cannot be opened)."""
    if path:
        try:
            out: logging.Handler = logging.FileHandler(path)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        out.setFormatter(formatter(name, journal=False, timestamps=True))
        return out
    journal = on_journal()
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(formatter(name, journal=journal, timestamps=timestamps and not journal))
    return out
