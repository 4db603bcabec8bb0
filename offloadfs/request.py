"""A shim's request in the mount, and the one rule that decides where it runs.

:func:`decide` is the local-or-remote decision, pure and free of I/O: from a shim's policy
(auto, always, never), what stands in the way of offloading it, and how an offloaded job
ended, it answers "run remote", "run local (reason)" or "fail (why)". The FUSE thread asks it
before it hands a request to the agent (``fs.ShimFS._start``); the agent thread asks it when no
host can take the job (``agent.Agent._dispatch``) and when the job ended (``agent.Agent.
_conclude``). A job runs locally only when it provably never ran remotely (docs/decisions.md,
"A job that may have started is never run again, anywhere"); under ``always`` a shim fails
closed, whatever is broken.

:class:`ShimRequest` is the hand-off between the two threads: a FUSE worker thread makes it
and waits on it, the agent thread decides it.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import queue
import time
from typing import TYPE_CHECKING

from . import shim
from .channel import OffloadError
from .jobrun import JobRun, Outcome

if TYPE_CHECKING:   # offld imports this module, and needs no caller (nor ctypes)
    from .caller import Caller

REMOTE, LOCAL, FAIL = "remote", "local", "fail"   # what :func:`decide` answers
# What stands in the way of offloading a request (the caller's stderr and status show it).
AGENT_DOWN = "the agent is not running"
NO_STDIO = "its stdio cannot be relayed (a file of the offloadfs mount?)"
NO_HOST = "no host offering it answers"


class Ending(enum.Enum):
    """How an offloaded job ended, as far as running it again goes."""

    EXITED = "exited"               # it ran to its exit status (or died of a signal)
    NEVER_RAN = "never ran"         # an offload error before any host could have run it
    MAY_HAVE_RUN = "may have run"   # an offload error once a host may have started it
    CANCELLED = "cancelled"         # we gave up on it (the caller went away or was killed)


def ending(error: OffloadError | None) -> Ending:
    """How a job ended with ``error`` (None: its exit status); the "never ran" rule is the
    error's ``started`` (``JobRun.may_have_started`` when this side ended it)."""
    if error is None:
        return Ending.EXITED
    if error.kind == "cancelled":
        return Ending.CANCELLED
    return Ending.MAY_HAVE_RUN if error.started else Ending.NEVER_RAN


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a request runs: ``route`` REMOTE, LOCAL or FAIL; ``reason`` says why (as the
    mount's status shows it)."""

    route: str
    reason: str = ""

    @property
    def counted(self) -> str:
        """The registry's count (``Registry.record``) of a request run locally or refused."""
        return "failures" if self.route == FAIL else "fallbacks"

    @property
    def text(self) -> str:
        """The line for the caller: a refusal before any submit says the job never ran."""
        return f"{self.reason}; it never ran" if self.route == FAIL else self.reason


def decide(policy: str, *, agent: bool = True, stdio: bool = True, host: bool = True,
           obstacle: str | None = None, ended: Ending | None = None,
           error: str = "") -> Decision:
    """Where a shim's request runs, from plain facts: its ``policy``; whether the mount's
    ``agent`` runs, the caller's ``stdio`` can be relayed and a ``host`` that is up offers the
    command; any other ``obstacle`` to offloading it (the export, staging); and, once the
    offloaded job is over, how it ``ended`` and its ``error`` text. REMOTE after the end means
    the remote outcome stands."""
    if ended is not None:
        if ended == Ending.NEVER_RAN and policy == "auto":
            return Decision(LOCAL, error)
        return Decision(REMOTE)
    if policy == "never":
        return Decision(LOCAL, "policy never")
    why = (AGENT_DOWN if not agent else NO_STDIO if not stdio else NO_HOST if not host
           else obstacle)
    if why is None:
        return Decision(REMOTE)
    if policy == "always":   # fail closed, whatever is broken
        return Decision(FAIL, f"{why} (policy always)")
    return Decision(LOCAL, why)


class ShimRequest:
    """One run of a shim, from its control-file read to the reply line.

    Made and waited on by a FUSE thread; decided by the agent thread (or, by :func:`decide`
    before the hand-off, by the FUSE thread itself), which sets exactly one of ``outcome``
    (the job ran), ``local`` (run locally, with the reason) or ``refusal``. Before that, the
    agent may :meth:`emit` lines for the shim (the terminal's settings, a stop); the FUSE
    thread hands them out in order from :meth:`next_line`. ``prog``, ``quiet`` and ``tty``
    are how the agent shows the queue notice and chooses the terminal (a hand-off from offld,
    ``listener.HandedRequest``, sets its own)."""

    prog, quiet, tty = "offloadfs", False, "auto"

    def __init__(self, name: str, args: list[bytes], caller: Caller, policy: str,
                 stdio: tuple[int, int, int] | None, debug: bool = False,
                 stamps: dict[str, int] | None = None):
        """A request to run ``name`` with ``args`` for ``caller``, whose fds 0-2 we hold as
        ``stdio`` (the request closes them when it is done); ``debug`` tells where it ran;
        ``stamps`` are its moments so far (:meth:`stamp`)."""
        self.stamps = {} if stamps is None else stamps
        self.name, self.args, self.caller, self.policy = name, args, caller, policy
        self.verbose = debug or caller.debug()
        self.lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()   # None: decided
        self.stdio = stdio
        self.job: JobRun | None = None
        self.outcome: Outcome | None = None
        self.local: str | None = None
        self.refusal: str | None = None
        self.pidfd = -1
        self.forwarded: set[int] = set()
        self.early_signals: list[int] = []

    def decide(self, decision: Decision) -> None:
        """Run locally or fail closed as ``decision`` says (not for REMOTE)."""
        if decision.route == LOCAL:
            self.decide_local(decision.text)
        else:
            self.decide_refused(decision.text)

    def decide_local(self, reason: str) -> None:
        """Agent thread: run the command locally."""
        self.local = reason
        self.lines.put(None)

    def decide_refused(self, text: str) -> None:
        """Agent thread: fail closed (exit 255 with one line)."""
        self.refusal = text
        self.lines.put(None)

    def decide_outcome(self, outcome: Outcome) -> None:
        """Agent thread: the job ended."""
        self.stamp("decided")
        self.outcome = outcome
        self.lines.put(None)

    @property
    def decided(self) -> bool:
        """True once one of the three decisions was made."""
        return self.outcome is not None or self.local is not None or self.refusal is not None

    def emit(self, line: bytes) -> None:
        """Agent thread: a line for the shim before the last one."""
        self.lines.put(line)

    def stopped(self, signum: int) -> None:
        """Agent thread: the job stopped on the host; the caller stops likewise."""
        self.emit(shim.reply_stopped(signum))

    def next_event(self) -> bytes | None:
        """The waiting thread: the next line before the last, or None once decided and the
        caller's output is all written."""
        line = self.lines.get()
        if line is None:
            self.stamp("woke")
            if self.job is not None:
                self.job.join()
        return line

    def next_line(self) -> tuple[bytes, bool]:
        """FUSE thread: wait for the shim's next line; (line, True) for the last one, once the
        caller's output is all written."""
        line = self.next_event()
        if line is not None:
            return line, False
        try:
            return self._reply(), True
        finally:
            self.close()
            self.stamp("replied")

    def stamp(self, moment: str) -> None:
        """Any thread: note when ``moment`` happened (monotonic ns; the mount's status shows
        them, bench overhead turns them into the shim's time breakdown)."""
        self.stamps[moment] = time.monotonic_ns()

    def _reply(self) -> bytes:
        """The reply line, after any message of ours on the caller's stderr."""
        if self.local is not None:
            path = self.caller.local_command(self.name)
            if path is None:
                self._say(f"{self.name}: {self.local}, and there is no local {self.name} on PATH")
                return shim.reply_status(127)
            self._debug(f"{self.name}: running locally ({self.local}): {path}")
            return shim.reply_local(path)
        if self.refusal is not None:
            self._say(f"{self.name}: {self.refusal}")
            return shim.reply_status(255)
        out = self.outcome
        if out.error is not None:
            self._say(f"{self.name}: {out.error}")
            return shim.reply_status(255)
        self._debug(f"{self.name}: ran on {out.host}, exit {out.status} (policy {self.policy})")
        return shim.reply_signal(out.signal) if out.signal else shim.reply_status(out.status)

    def _say(self, text: str) -> None:
        """One line on the caller's stderr."""
        fd = self.stdio[2] if self.stdio else None
        if fd is not None:
            try:
                os.write(fd, f"offloadfs: {text}\n".encode(errors="replace"))
            except OSError:
                pass

    def _debug(self, text: str) -> None:
        """A line on the caller's stderr with OFFLOADFS_DEBUG=1."""
        if self.verbose:
            self._say(text)

    def close(self) -> None:
        """Close our duplicates of the caller's fds and its pidfd."""
        for fd in self.stdio or ():
            os.close(fd)
        self.stdio = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
