"""One job's process on the host: spawn as the caller, pipes, signals, reaping.

A :class:`Process` is created, polled and closed by the server's loop thread only. Its pipe
ends on this side are non-blocking; the loop polls them (and the process's pidfd) and calls
:meth:`read`, :meth:`write_pending` and :meth:`reap` when they are ready.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import pwd
import signal
import subprocess
import time


PIPE_SIZE = 1024 * 1024


class SpawnError(Exception):
    """The command could not be started (missing binary, bad cwd, no permission)."""


class Process:
    """A job's process, leader of its own session and process group."""

    def __init__(self, path: str, argv: list[bytes], cwd: bytes, env: dict[bytes, bytes],
                 ids: tuple[int, int, list[int]] | None):
        """Start ``path`` with ``argv`` in ``cwd``; ``ids`` = (uid, gid, groups) to switch to."""
        self.started = time.monotonic()
        self.ended: float | None = None
        self.popen = _spawn(path, argv, cwd, env, ids)
        self.pid = self.popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.fds = {"stdin": self.popen.stdin.fileno(), "stdout": self.popen.stdout.fileno(),
                    "stderr": self.popen.stderr.fileno()}
        for fd in self.fds.values():
            os.set_blocking(fd, False)
            _grow_pipe(fd)
        self.pending: collections.deque[bytes] = collections.deque()
        self.stdin_eof = False
        self.status: int | None = None
        self.term_signal: int | None = None
        self.rusage: dict = {}

    def is_open(self, name: str) -> bool:
        """True while pipe ``name`` is open on this side."""
        return name in self.fds

    def read(self, name: str, n: int) -> bytes | None:
        """Up to ``n`` bytes of ``name`` (stdout or stderr) as they are ready, in as few chunks
        as possible; b"" at EOF, None if none ready."""
        parts, fd = [], self.fds[name]
        while n > 0:
            try:
                data = os.read(fd, n)
            except BlockingIOError:
                break
            if not data:
                if not parts:
                    self.close(name)
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts) if parts else (None if name in self.fds else b"")

    def feed(self, data: bytes) -> None:
        """Queue stdin data for the process (dropped once its stdin is closed)."""
        if "stdin" in self.fds and data:
            self.pending.append(data)

    def end_input(self) -> None:
        """Close stdin once the queued data is written."""
        self.stdin_eof = True
        if not self.pending:
            self.close("stdin")

    def write_pending(self) -> int:
        """Write queued stdin data without blocking; returns bytes taken from the queue."""
        done = 0
        while self.pending and "stdin" in self.fds:
            chunk = self.pending[0]
            try:
                n = os.write(self.fds["stdin"], chunk)
            except BlockingIOError:
                break
            except (BrokenPipeError, OSError):
                done += sum(map(len, self.pending))
                self.pending.clear()
                self.close("stdin")
                break
            done += n
            if n < len(chunk):
                self.pending[0] = chunk[n:]
                break
            self.pending.popleft()
        if self.stdin_eof and not self.pending:
            self.close("stdin")
        return done

    def close(self, name: str) -> None:
        """Close this side of pipe ``name``."""
        fd = self.fds.pop(name, None)
        if fd is not None:
            getattr(self.popen, name).close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the job's whole process group while it is not reaped."""
        if self.status is None:
            _killpg(self.pid, signum)

    def reap(self) -> bool:
        """Reap the leader if it exited; kill what remains of its group first. True if reaped."""
        if self.status is not None:
            return True
        _killpg(self.pid, signal.SIGKILL) if _exited(self.pid) else None
        try:
            pid, wstatus, ru = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, wstatus, ru = self.pid, 255 << 8, None
        if pid == 0:
            return False
        self._record(wstatus, ru)
        return True

    def _record(self, wstatus: int, ru) -> None:
        """Keep the exit status (128+N for signal N) and resource usage."""
        self.ended = time.monotonic()
        self.popen.returncode = 0  # reaped by us; keeps Popen from waiting again
        if os.WIFSIGNALED(wstatus):
            self.term_signal = os.WTERMSIG(wstatus)
            self.status = 128 + self.term_signal
        else:
            self.status = os.waitstatus_to_exitcode(wstatus) & 0xFF
        if ru is not None:
            self.rusage = {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kb": ru.ru_maxrss}
        os.close(self.pidfd)
        self.pidfd = -1

    def kill(self) -> None:
        """Kill the whole group now and wait for the leader (bounded: SIGKILL cannot be caught)."""
        if self.status is None:
            _killpg(self.pid, signal.SIGKILL)
            _, wstatus, ru = os.wait4(self.pid, 0)
            self._record(wstatus, ru)
        for name in list(self.fds):
            self.close(name)

    @property
    def finished(self) -> bool:
        """True when the leader is reaped and its output pipes are at EOF."""
        return self.status is not None and "stdout" not in self.fds and "stderr" not in self.fds


def _grow_pipe(fd: int) -> None:
    """Let a pipe hold up to 1 MiB, so that a chunk is one read, not sixteen (best effort)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def _exited(pid: int) -> bool:
    """True if ``pid`` is a zombie (exited, not yet reaped): its pid cannot be reused yet."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def _killpg(pgid: int, signum: int) -> None:
    """killpg that ignores a group already gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def _spawn(path, argv, cwd, env, ids) -> subprocess.Popen:
    """Popen in a new session, as ``ids`` when given; raise SpawnError with a clear text."""
    who = {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": ids[2]}
    try:
        return subprocess.Popen(argv, executable=path, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                start_new_session=True, close_fds=True, **who)
    except FileNotFoundError as exc:
        missing = cwd if exc.filename in (cwd, os.fsdecode(cwd)) else path
        raise SpawnError(f"{os.fsdecode(missing)}: no such file or directory on this host") from None
    except PermissionError as exc:
        raise SpawnError(f"{exc.filename or path}: permission denied") from None
    except OSError as exc:
        raise SpawnError(f"{path}: {exc.strerror or errno.errorcode.get(exc.errno, exc)}") from None


def user_of(uid: int) -> tuple[str, str]:
    """(home, name) of ``uid`` on this host; ("/", "uid") when unknown."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return "/", str(uid)
    return pw.pw_dir, pw.pw_name
