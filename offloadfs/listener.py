"""The mount's end of offld's hand-off (``handoff``): offld's jobs, run as shims' jobs are.

Threads: :meth:`Listener.start` (called by ``Agent.start``, from libfuse's ``init``) binds the
mount's abstract socket and starts the accept thread ``offloadfs-handoff``. Each connection
gets a thread ``offloadfs-handoff-PID`` that plays the part a FUSE thread plays for a shim: it
reads the job frame and its fds, takes the caller's identity from the kernel (SO_PEERCRED) and
its cwd and environment from /proc (``caller.Caller``, checked against the kernel's ids), makes
a :class:`HandedRequest` (a ``request.ShimRequest``), asks ``request.decide`` and hands it to
the agent (``Agent.submit``); then it relays the request's stops to offld, offld's
``continued`` to the agent, and the end. Only the agent thread touches the job; a bad peer
costs its own connection only.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import typing
from collections.abc import Callable

from . import handoff, joblog
from . import request as rules
from .caller import Caller, CallerGone
from .fs import _outside  # the shim's rule: stdio on the mount itself is refused
from .request import ShimRequest

log = logging.getLogger("offloadfs")

POLICY = "always"        # offld fails closed; its own --fallback is the only local run
MAX_CONNECTIONS = 256    # hand-offs served at once (each holds a thread and three fds)
FIRST_FRAME = 10.0       # seconds a peer has to send its job frame
NO_HOST = "offloadfs mount"   # the end frame's host when no host took the job


class HandedRequest(ShimRequest):
    """A shim's request that came from offld over the hand-off socket: offld's name for the
    queue notice, its -q and -t/-T, and a stop said as a hand-off frame. Its terminal's
    settings line is not sent: offld keeps its own copy to put back if the mount dies."""

    prog = "offld"
    job_log = ""   # the mount's config's [client] job_log, for offld's log line

    def stopped(self, signum: int) -> None:
        """Agent thread: offld stops its process group likewise (a ``Z`` frame)."""
        self.lines.put(handoff.encode(handoff.STOP, signal=signum))

    def emit(self, line: bytes) -> None:
        """Agent thread: the terminal's settings line, which offld needs not."""

    def end_frame(self) -> bytes:
        """The ``E`` frame for offld, once decided, with the job log's line (offld would
        have to load the VM's config and json to make it: ms of each start)."""
        out = self.outcome
        if out is None:   # refused (or, never under POLICY, local): it never ran
            text = f"{self.name}: {self.refusal or self.local}"   # as a shim's caller reads it
            end = Ended(255, None, NO_HOST, rules.Ending.NEVER_RAN.value, text, {})
        else:
            end = Ended(out.status, out.signal, out.host, rules.ending(out.error).value,
                        str(out.error) if out.error else "", out.timings)
        command = [self.name] + [os.fsdecode(a) for a in self.args]
        line = joblog.line(command, end, os.fsdecode(self.caller.cwd))
        return handoff.End.frame(*end, log=line, job_log=self.job_log)


class Ended(typing.NamedTuple):
    """What an ``E`` frame says (``handoff.End.frame``'s arguments), as ``joblog.entry``
    reads an outcome."""

    status: int
    signal: int | None
    host: str
    ending: str
    error: str
    timings: dict


class Listener:
    """The hand-off socket of one mount; see the module docstring for threads."""

    def __init__(self, agent, mountpoint: str, dev: Callable[[], int]):
        """Serve ``agent``'s hand-offs at the address of ``mountpoint``; ``dev`` gives the
        mount's device (a caller's stdio on the mount itself is refused, as a shim's is)."""
        self.agent, self.mountpoint, self.dev = agent, mountpoint, dev
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._accept, name="offloadfs-handoff",
                                       daemon=True)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = False

    def start(self) -> None:
        """Bind the abstract socket (any local user may connect: the kernel names them) and
        start accepting; a name already taken is logged and offld connects itself."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(handoff.address(self.mountpoint))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            log.warning("no hand-off socket for %s: %s (offld connects to hosts itself)",
                        self.mountpoint, exc.strerror)
            return
        self.sock = sock
        self.thread.start()

    def stop(self) -> None:
        """Stop accepting (running hand-offs end with their jobs)."""
        self._stopping = True
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()

    def _accept(self) -> None:
        """Accept connections, one thread each, up to MAX_CONNECTIONS at once."""
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.warning("hand-off socket: %s", exc.strerror)
                threading.Event().wait(0.1)   # out of fds: do not spin
                continue
            if not self.slots.acquire(blocking=False):
                _send_quietly(conn, never_ran(f"the mount's agent serves {MAX_CONNECTIONS} "
                                          f"hand-offs already"))
                conn.close()
                continue
            pid = handoff.peer(conn)[0]
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"offloadfs-handoff-{pid}").start()

    def _serve(self, conn: socket.socket) -> None:
        """One hand-off, start to end; whatever goes wrong costs this connection only."""
        try:
            request, reader = self._take(conn)
            if request is not None:
                self._relay(request, conn, reader)
        except Exception:
            log.exception("internal error in a hand-off; the agent goes on")
        finally:
            conn.close()
            self.slots.release()

    def _take(self, conn: socket.socket):
        """Read and check the job, make its request and hand it on; (request, reader), or
        (None, None) after refusing it (one line in the log, an end frame to the peer)."""
        reader = handoff.Reader(conn)
        pid, uid, gid = handoff.peer(conn)
        conn.settimeout(FIRST_FRAME)
        try:
            frame = reader.next()
            if frame is None:
                raise handoff.HandoffError("the peer closed before sending a job")
            kind, fields = frame
            if kind != handoff.JOB:
                raise handoff.HandoffError(f"a {kind.decode()} frame before the job")
            job = handoff.Job(fields, len(reader.fds))
            caller = _caller(pid, uid, gid)
        except (handoff.HandoffError, OSError) as exc:
            for fd in reader.fds:
                os.close(fd)
            log.warning("hand-off from pid %d (uid %d) refused: %s", pid, uid, exc)
            _send_quietly(conn, never_ran(f"the mount's agent refused the hand-off: {exc}"))
            return None, None
        conn.settimeout(None)
        stdio = _outside(tuple(reader.fds), self.dev())
        reader.fds = []
        request = HandedRequest(os.fsdecode(job.argv[0]), job.argv[1:], caller, POLICY, stdio)
        request.quiet, request.tty = job.quiet, job.tty
        request.job_log = self.agent.config.job_log_given
        decision = rules.decide(POLICY, stdio=stdio is not None,
                                agent=self.agent.thread.is_alive())
        if decision.route == rules.REMOTE:
            self.agent.submit(request)
        else:
            request.decide(decision)
        return request, reader

    def _relay(self, request: HandedRequest, conn: socket.socket, reader) -> None:
        """Stops to offld (and its ``continued`` back to the agent), then the end frame."""
        try:
            while (line := request.next_event()) is not None:
                _send_quietly(conn, line)
                frame = _next_quietly(reader)
                if frame is not None and frame[0] == handoff.CONTINUED:
                    self.agent.continued(request)
            _send_quietly(conn, request.end_frame())
        finally:
            request.close()


def never_ran(text: str) -> bytes:
    """The ``E`` frame of a job no host took: status 255, ``text`` the caller's line."""
    return handoff.End.frame(255, None, NO_HOST, rules.Ending.NEVER_RAN.value, text, {})


def _caller(pid: int, uid: int, gid: int) -> Caller:
    """The caller the kernel named, from /proc; HandoffError if it is gone or its ids are not
    the ones it connected with (identity comes from the kernel, never from the message)."""
    try:
        caller = Caller(pid)
    except CallerGone as exc:
        raise handoff.HandoffError(str(exc)) from None
    if (caller.uid, caller.gid) != (uid, gid):
        raise handoff.HandoffError(f"pid {pid} is uid {caller.uid} gid {caller.gid} now, not "
                                   f"the uid {uid} gid {gid} it connected as")
    return caller


def _send_quietly(conn: socket.socket, frame: bytes) -> None:
    """Send a frame to a peer that may have gone (its job then ends by its pidfd)."""
    try:
        handoff.send(conn, frame)
    except OSError:
        pass


def _next_quietly(reader):
    """The peer's next frame, or None if it went away or sent garbage."""
    try:
        return reader.next()
    except (OSError, handoff.HandoffError) as exc:
        log.warning("hand-off: %s", exc)
        return None
