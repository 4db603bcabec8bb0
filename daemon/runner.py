"""One job's process on the host: spawned as the caller and confined, pipes, signals, reaping.

A :class:`Process` is created, polled and closed by the server's loop thread only. Its pipe
ends on this side are non-blocking; the loop polls them (and the process's pidfd) and calls
:meth:`read`, :meth:`write_pending` and :meth:`reap` when they are ready.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import pwd
import resource
import signal
import subprocess
import time


PIPE_SIZE = 1024 * 1024
PR_SET_NO_NEW_PRIVS = 38
RLIMITS = {"cpu": resource.RLIMIT_CPU, "memory": resource.RLIMIT_AS,
           "open_files": resource.RLIMIT_NOFILE, "file_size": resource.RLIMIT_FSIZE,
           "processes": resource.RLIMIT_NPROC}   # [limits] names that are rlimits

_prctl = ctypes.CDLL(None, use_errno=True).prctl   # bound once: the child only calls it
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


class SpawnError(Exception):
    """The command could not be started (missing binary, bad cwd, no permission)."""


class Process:
    """A job's process, leader of its own session and process group."""

    def __init__(self, path: str, argv: list[bytes], cwd: bytes | str, env: dict[bytes, bytes],
                 ids: tuple[int, int, list[int]] | None, root: str | None = None,
                 limits: list[tuple[int, int, int]] = ()):
        """Start ``path`` with ``argv`` in ``cwd``, which must be ``root`` or below it (if
        given); ``ids`` = (uid, gid, groups) to switch to; ``limits`` from :func:`rlimits`."""
        self.started = time.monotonic()
        self.ended: float | None = None
        self.popen = _spawn(path, argv, env, ids, _confiner(cwd, root, ids, limits))
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


def rlimits(limits: dict[str, int]) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for each rlimit in ``limits``, never above this daemon's own hard
    limit. The CPU hard limit is one second past the soft one: at the soft limit the job gets
    SIGXCPU (exit 152), which it may catch; SIGKILL comes at the hard one (the kernel checks
    the hard limit first, so soft = hard would be SIGKILL at once)."""
    out = []
    for name, res in RLIMITS.items():
        if name in limits:
            grace = 1 if res == resource.RLIMIT_CPU else 0
            out.append((res, _clamp(res, limits[name]), _clamp(res, limits[name] + grace)))
    return out


def _clamp(res: int, n: int) -> int:
    """``n``, or this daemon's own hard limit of ``res`` if that is lower."""
    ceiling = resource.getrlimit(res)[1]
    return n if ceiling == resource.RLIM_INFINITY else min(n, ceiling)


def _confiner(cwd, root, ids, limits):
    """The job's ``preexec_fn``: in the child, as the caller, enter ``cwd``, check it lies in
    ``root``, set ``limits`` and no_new_privs; on a failure, one line on the job's stderr and
    exit 126 (an exception in a preexec_fn would reach us without its detail)."""
    cwd = os.fsencode(cwd)
    inside = None if root is None else os.fsencode(os.path.realpath(root))
    prefix = None if inside is None else inside.rstrip(b"/") + b"/"
    uid = os.getuid() if ids is None else ids[0]
    entering = b"offloadd: cannot enter %s as uid %d: " % (cwd, uid)

    # Runs between fork and exec, after CPython's setgroups/setregid/setreuid and its dup2 of
    # fds 0-2 (3.11), in a daemon with other threads (ZeroMQ's, mount workers). Only the forking
    # thread exists in the child, so a lock another thread held at fork stays held forever:
    # this function therefore takes none. It only calls pre-bound functions doing the syscalls
    # chdir, getcwd, setrlimit, prctl and write; it imports nothing and does not log. Python
    # objects it makes come from glibc malloc, which is fork-safe (its locks are reset in the
    # child); CPython re-initialises its own runtime state after fork before calling us.
    def confine(chdir=os.chdir, getcwd=os.getcwdb, setrlimit=resource.setrlimit,
                prctl=_prctl, get_errno=ctypes.get_errno, die=_die) -> None:
        """Enter, check, limit, no_new_privs: see above."""
        try:
            chdir(cwd)
            here = getcwd()
        except OSError as exc:
            die(entering + (exc.strerror or "error").encode() + b"\n")
        if inside is not None and here != inside and not here.startswith(prefix):
            die(b"offloadd: cannot run in %s as uid %d: it is %s, outside %s\n"
                % (cwd, uid, here, inside))
        for res, soft, hard in limits:
            try:
                setrlimit(res, (soft, hard))
            except (OSError, ValueError):
                die(b"offloadd: cannot set resource limit %d to %d\n" % (res, soft))
        if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            die(b"offloadd: cannot set no_new_privs (errno %d)\n" % get_errno())
    return confine


def _die(line: bytes, write=os.write, end=os._exit) -> None:
    """In the job's child: ``line`` on its stderr (the job's pipe), then exit 126."""
    try:
        write(2, line)
    finally:
        end(126)


def _spawn(path, argv, env, ids, confine) -> subprocess.Popen:
    """Popen in a new session, as ``ids`` when given, ``confine`` run in the child before exec;
    raise SpawnError with a clear text."""
    who = {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": ids[2]}
    try:
        return subprocess.Popen(argv, executable=path, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                start_new_session=True, close_fds=True, preexec_fn=confine,
                                **who)
    except FileNotFoundError:
        raise SpawnError(f"{path}: no such file or directory on this host") from None
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
