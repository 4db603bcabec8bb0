"""What a client says while a job waits: the queue notice at a terminal, and the mount's line
when no host answers. Every text about waiting is composed here.

:class:`WaitNotice` is the rule, free of I/O: fed the host's queue positions and the time, it
returns the bytes to write (a line that updates in place, and its erasure before the job's
first output byte or its end). :class:`TerminalNotice` writes them to a terminal; the client
loop's thread (``offld``'s main thread) calls both, through the job run
(``jobrun.JobRun.waits``), as does the mount's agent thread for a shim's caller whose stderr
is a terminal. On a pipe, or with ``-q``, there is no notice at all
(:func:`at_terminal` answers :data:`SILENT`).
"""
from __future__ import annotations

import os
import select

from .reach import shown as address  # host:port, as the user wrote it
from .terminal import foreground

DELAY = 1.0          # seconds a job waits in a queue before the notice shows
ERASE = b"\r\x1b[K"  # back to the line's start, and clear it


def place(endpoint: str, broker: bool) -> str:
    """Where a job waits: ``on HOST:PORT``, or ``via broker HOST:PORT``."""
    return f"{'via broker' if broker else 'on'} {address(endpoint)}"


def queue_line(prog: str, where: str, position: int) -> str:
    """The notice of a job in a queue."""
    return f"{prog}: waiting for a slot {where} (position {position})"


def connect_line(prog: str, endpoints: list[str]) -> str:
    """The notice of a job waiting for hosts' first answer (right after the mount started)."""
    return f"{prog}: waiting for {', '.join(map(address, endpoints))} to answer"


def unreachable(tried: list[tuple[str, str]], timeout: float) -> str:
    """The mount's warning when no host answered its first connection: each host (endpoint)
    with what it said (empty: nothing within ``timeout`` seconds)."""
    said = "; ".join(f"{address(endpoint)}: {why or f'no answer within {timeout:g}s'}"
                     for endpoint, why in tried)
    return (f"no host reachable yet (tried {said}); jobs run locally under auto, "
            f"exit 255 under always")


class WaitNotice:
    """The notice's rule: shown once a job has waited ``delay`` s (in a queue, or for a host's
    first answer), rewritten when its text changes (a new position), erased when it starts
    or ends. Each call returns the bytes to write now (often none). One thread (the client
    loop's) calls it."""

    def __init__(self, prog: str, where: str, delay: float = DELAY):
        """Nothing shown; ``where`` is :func:`place`'s answer."""
        self.prog, self.where, self.delay = prog, where, delay
        self.since: float | None = None   # when the job was first said to wait
        self.line = ""                    # what the notice says now
        self.shown = ""                   # what the terminal shows

    def queued(self, now: float, position: int, front: bool = True) -> bytes:
        """The host says the job waits at ``position``."""
        return self.waits(now, queue_line(self.prog, self.where, position), front)

    def connecting(self, now: float, endpoints: list[str], front: bool = True) -> bytes:
        """The job waits for these hosts' first answer."""
        return self.waits(now, connect_line(self.prog, endpoints), front)

    def waits(self, now: float, line: str, front: bool = True) -> bytes:
        """The job still waits, as ``line`` says."""
        if self.since is None:
            self.since = now
        self.line = line
        return self.tick(now, front)

    def tick(self, now: float, front: bool = True) -> bytes:
        """Time passes: show the line once the job has waited long enough, or its update;
        never while the caller is not in its terminal's foreground (``front``: the line would
        land in the shell's own)."""
        if self.since is None or now - self.since < self.delay or self.line == self.shown \
                or not front:
            return b""
        self.shown = self.line
        return b"\r" + self.line.encode(errors="replace") + b"\x1b[K"

    def clear(self) -> bytes:
        """The job starts or ends: erase what is shown (the job's output starts on a clean
        line); no more notices."""
        self.since, self.line = None, ""
        if not self.shown:
            return b""
        self.shown = ""
        return ERASE


class TerminalNotice:
    """A :class:`WaitNotice` written to the terminal ``fd`` of process ``pid`` (best effort: a
    write that fails costs only the notice). Called on the client loop's thread."""

    def __init__(self, fd: int, rule: WaitNotice, pid: int):
        """Write ``rule``'s bytes to ``fd`` while ``pid`` is in its terminal's foreground."""
        self.fd, self.rule, self.pid = fd, rule, pid

    def queued(self, now: float, position: int) -> None:
        """The job waits at ``position``."""
        self._write(self.rule.queued(now, position, foreground(self.pid)))

    def connecting(self, now: float, endpoints: list[str]) -> None:
        """The job waits for these hosts' first answer."""
        self._write(self.rule.connecting(now, endpoints, foreground(self.pid)))

    def tick(self, now: float) -> None:
        """Time passes."""
        if self.rule.since is not None:   # (no look at /proc while nothing waits)
            self._write(self.rule.tick(now, foreground(self.pid)))

    def clear(self) -> None:
        """The job starts or ends."""
        self._write(self.rule.clear())

    def _write(self, data: bytes) -> None:
        """Write ``data`` if there is any and the terminal has room for it now: a short
        write to a terminal that polls writable does not block, and the loop thread (the
        mount's agent: every job's) must never wait on a stuck terminal."""
        if not data:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        try:
            if poller.poll(0):
                os.write(self.fd, data)
        except OSError:
            pass


class Silent:
    """No notice (a pipe, ``-q``): every call does nothing."""

    def queued(self, now: float, position: int) -> None:
        """Nothing."""

    def connecting(self, now: float, endpoints: list[str]) -> None:
        """Nothing."""

    def tick(self, now: float) -> None:
        """Nothing."""

    def clear(self) -> None:
        """Nothing."""


SILENT = Silent()


def at_terminal(fd: int, prog: str, where: str, quiet: bool = False,
                pid: int | None = None) -> TerminalNotice | Silent:
    """The queue notice for the stderr ``fd`` of process ``pid`` (ours by default): written
    only to a terminal, and never when quiet."""
    if quiet or not os.isatty(fd):
        return SILENT
    return TerminalNotice(fd, WaitNotice(prog, where), os.getpid() if pid is None else pid)
