"""One job's process on the host: spawned as the caller and confined, pipes, signals, reaping.

A :class:`Process` is created, polled and closed by the server's loop thread only. Its pipe
ends on this side are non-blocking; the loop polls them (and the process's pidfd) and calls
:meth:`read`, :meth:`write_pending` and :meth:`reap` when they are ready.

A job with a terminal (the submit's ``tty``) gets a new pty with the caller's settings and
window size: the fds the caller had on its terminal are the pty's slave, the others pipes, and
its output is the stream ``tty``. It runs under ``ptyleader.py``, the session leader that owns
the terminal's foreground (see there); the pipe ``leader`` brings its reports. Stops and
continues of a job without a terminal are read with waitid (the server calls
:meth:`Process.changes` when SIGCHLD wakes it).
"""
from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import grp
import logging
import os
import pwd
import resource
import signal
import struct
import subprocess
import sys
import termios
import time

from offloadfs import protocol

from .warden import start_time

try:   # the compiled spawn (setup.py builds it where a C compiler is; see _spawn.c)
    from . import _spawn as compiled
except ImportError:
    compiled = None

PIPE_SIZE = 1024 * 1024
SMALL_READ = 64 * 1024   # a read when the pipe's count says nothing is there (EOF, a race)
_COUNT = struct.Struct("i")
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
RLIMITS = {"cpu": resource.RLIMIT_CPU, "memory": resource.RLIMIT_AS,
           "open_files": resource.RLIMIT_NOFILE, "file_size": resource.RLIMIT_FSIZE,
           "processes": resource.RLIMIT_NPROC}   # [limits] names that are rlimits

_prctl = ctypes.CDLL(None, use_errno=True).prctl   # bound once: the child only calls it
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


LEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ptyleader.py")
TTY_LINGER = 0.5   # seconds after the job's end that the pty may still be held by others
STOPPING = {signal.SIGTSTP: signal.SIGSTOP, signal.SIGTTIN: signal.SIGSTOP,
            signal.SIGTTOU: signal.SIGSTOP}   # what stops a group without a terminal


class SpawnError(Exception):
    """The command could not be started (missing binary, bad cwd, no permission)."""


class Process:
    """A job's process, leader of its own session and process group."""

    def __init__(self, path: str, argv: list[bytes], cwd: bytes | str, env: dict[bytes, bytes],
                 ids: tuple[int, int, list[int]] | None, root: str | None = None,
                 limits: list[tuple[int, int, int]] = (), tty: dict | None = None,
                 records=None, label: str = "", stdin_null: bool = False):
        """Start ``path`` with ``argv`` in ``cwd``, which must be ``root`` or below it (if
        given); ``ids`` = (uid, gid, groups) to switch to; ``limits`` from :func:`rlimits`;
        ``tty`` (a submit's) gives it a terminal; ``stdin_null``: its stdin is /dev/null, not
        a pipe (unless it is the terminal). ``records`` (a ``warden.Records``) keeps its
        process groups while it runs, under ``label``."""
        self.started = time.monotonic()
        self.ended: float | None = None
        self.tty = Terminal(tty, ids) if tty else None
        self.job_pid: int | None = None       # the job's group (with a terminal: not ours)
        self.early: list[int] = []            # signals for a job whose pid is not known yet
        self.stopped_by: int | None = None    # the signal a client asked to stop it with
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if stdin_null else None
        try:
            self.popen = self._start(path, argv, env, ids, cwd, root, limits, null)
        except BaseException:
            if self.tty is not None:
                self.tty.discard()
            raise
        finally:
            if null is not None:
                os.close(null)
            if self.tty is not None:
                self.tty.spawned()
        self.pid = self.popen.pid
        self.records = records
        self.record = None if records is None else \
            records.add(label, [(self.pid, start_time(self.pid) or 0)])
        self.pidfd = os.pidfd_open(self.pid)
        self.files = {name: getattr(self.popen, name) for name in ("stdin", "stdout", "stderr")
                      if getattr(self.popen, name) is not None}
        self.fds = {name: f.fileno() for name, f in self.files.items()}
        if self.tty is not None:
            self.fds.update(self.tty.fds())
        else:
            self.job_pid = self.pid
        for name, fd in self.fds.items():
            os.set_blocking(fd, False)
            if name in self.files:
                _grow_pipe(fd)
        self.pending: collections.deque[bytes] = collections.deque()
        self.stdin_eof = False
        self.status: int | None = None
        self.term_signal: int | None = None
        self.rusage: dict = {}

    def _start(self, path, argv, env, ids, cwd, root, limits, null) -> subprocess.Popen:
        """Popen the job, or (with a terminal) its session leader, ptyleader.py; ``null``
        (an fd of /dev/null, or None) is its stdin where that would be a pipe."""
        if self.tty is None:
            stdio = (subprocess.PIPE if null is None else null,) + (subprocess.PIPE,) * 2
            return _spawn(path, argv, env, ids, Confined(cwd, root, limits), stdio)
        t = self.tty
        stdio = t.stdio()
        if null is not None and stdio[0] == subprocess.PIPE:
            stdio = (null,) + stdio[1:]
        leader = [os.fsencode(sys.executable), b"-I", b"-S", os.fsencode(LEADER),
                  b"%d" % t.report_w, b"%d" % t.control_r, b"1" if t.foreground else b"0",
                  os.fsencode(path)] + list(argv)
        return _spawn(sys.executable, leader, env, ids,
                      Confined(cwd, root, limits, t.slave_at, signal.SIGTERM), stdio,
                      (t.report_w, t.control_r))

    # --- a terminal's job: signals, stops, window -----------------------------------------------

    def changes(self) -> list[tuple[str, int]]:
        """What happened to the job since the last call: ("stopped", SIG), ("continued", 0)."""
        if self.status is not None:
            return []
        if self.tty is not None:
            events, pid, started = self.tty.reports()
            if pid is not None and self.job_pid is None:
                self.job_pid = pid
                if self.record is not None:
                    self.records.add_group(self.record, pid, started)
                for signum in self.early:
                    _killpg(pid, signum)
            return [self._stop_as(e) for e in events]
        events = []
        while True:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WCONTINUED | os.WNOHANG)
            except ChildProcessError:
                return events
            if info is None:
                return events
            if info.si_code == os.CLD_STOPPED:
                events.append(self._stop_as(("stopped", info.si_status)))
            elif info.si_code == os.CLD_CONTINUED:
                events.append(("continued", 0))
            else:
                return events

    def _stop_as(self, event: tuple[str, int]) -> tuple[str, int]:
        """A stop by our SIGSTOP is reported as the signal the client asked for."""
        if event[0] == "stopped" and event[1] == signal.SIGSTOP and self.stopped_by:
            event = ("stopped", self.stopped_by)
        if event[0] == "stopped":
            self.stopped_by = None
        return event

    def resume(self, foreground: bool) -> None:
        """Continue the job, in the fore- or background of its terminal."""
        if self.status is not None:
            return
        if self.tty is not None:
            self.tty.control(b"fg\n" if foreground else b"bg\n")
        else:
            _killpg(self.pid, signal.SIGCONT)

    def resize(self, rows: int, cols: int, xpixel: int, ypixel: int) -> None:
        """The caller's window changed: so does the job's terminal (the job gets SIGWINCH)."""
        if self.tty is not None and self.status is None:
            self.tty.resize(rows, cols, xpixel, ypixel)

    def is_open(self, name: str) -> bool:
        """True while pipe ``name`` is open on this side."""
        return name in self.fds

    def read(self, name: str, n: int) -> bytes | None:
        """Up to ``n`` bytes of ``name`` (stdout or stderr) as they are ready: one read the
        size the pipe's count says (FIONREAD), so no buffer is bigger than its bytes or
        zeroed first; b"" at EOF, None if none ready."""
        fd = self.fds[name]
        try:   # none counted: end of file, or bytes that came after the count
            data = os.read(fd, _ready(fd, n) or min(n, SMALL_READ))
        except BlockingIOError:
            return None
        except OSError as exc:   # EIO: no process has the pty's slave open any more
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.close(name)
        return data

    def feed(self, data: bytes) -> None:
        """Queue stdin data for the process (dropped once its stdin is closed)."""
        if "stdin" in self.fds and data:
            self.pending.append(data)

    def end_input(self) -> None:
        """Close stdin once the queued data is written; a terminal's gets end-of-file (^D)."""
        if self.tty is not None and self.tty.has_stdin:
            self.feed(self.tty.eof_char())
            return
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
        if fd is None:
            return
        if name in self.files:
            self.files[name].close()
        else:
            os.close(fd)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the job's whole process group while it is not reaped. A group
        without a terminal is orphaned, which makes the kernel discard SIGTSTP, SIGTTIN and
        SIGTTOU: it gets SIGSTOP, and the stop is reported as ``signum``."""
        if self.status is not None:
            return
        if self.job_pid is None:
            self.early.append(signum)
            return
        if self.tty is None and signum in STOPPING:
            self.stopped_by, signum = signum, STOPPING[signum]
        _killpg(self.job_pid, signum)

    def linger_over(self, now: float) -> bool:
        """True once the job ended long enough ago that a pty still held open (by a process
        the job left behind) is to be drained and closed."""
        return self.ended is not None and "tty" in self.fds and now - self.ended > TTY_LINGER

    def reap(self) -> bool:
        """Reap the leader if it exited; kill what remains of its group first. True if reaped."""
        if self.status is not None:
            return True
        if _exited(self.pid):
            self._kill_groups()
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
        if self.record is not None:   # what was left of its groups is killed: see reap, kill
            self.records.remove(self.record)
            self.record = None

    def _kill_groups(self) -> None:
        """SIGKILL what is left of the job's group (and of its session leader's)."""
        _killpg(self.pid, signal.SIGKILL)
        if self.job_pid is not None and self.job_pid != self.pid:
            _killpg(self.job_pid, signal.SIGKILL)

    def kill(self) -> None:
        """Kill the whole group now and wait for the leader (bounded: SIGKILL cannot be caught)."""
        if self.status is None:
            self._kill_groups()
            _, wstatus, ru = os.wait4(self.pid, 0)
            self._record(wstatus, ru)
        for name in list(self.fds):
            self.close(name)
        if self.tty is not None:
            self.tty.close()

    @property
    def finished(self) -> bool:
        """True when the leader is reaped and its output pipes are at EOF."""
        return self.status is not None and not any(s in self.fds for s in protocol.STREAMS)


class Terminal:
    """A job's pty: the master (kept here, non-blocking), the slave (the job's), and the pipes
    to and from its session leader. Owned by one :class:`Process`."""

    def __init__(self, spec: dict, ids):
        """A new pty with the caller's termios and window size, owned by the job's user."""
        self.spec = spec
        self.foreground = bool(spec["foreground"])
        self.has_stdin = bool(spec["fds"] & protocol.TTY_STDIN)
        self.master, self.slave = os.openpty()
        self.report_r, self.report_w = os.pipe2(os.O_CLOEXEC)
        self.control_r, self.control_w = os.pipe2(os.O_CLOEXEC)
        self.stdin_w = os.dup(self.master) if self.has_stdin else -1
        self.slave_at = next(n for n in range(3) if spec["fds"] & (1 << n))
        self._buffer = b""
        _set_termios(self.slave, spec)
        self.resize(spec["rows"], spec["cols"], spec.get("xpixel", 0), spec.get("ypixel", 0))
        if ids is not None:
            os.fchown(self.slave, ids[0], _tty_group())
            os.fchmod(self.slave, 0o620)

    def stdio(self) -> tuple:
        """The job's fds 0-2 for Popen: the slave where the caller had its terminal."""
        return tuple(self.slave if self.spec["fds"] & (1 << n) else subprocess.PIPE
                     for n in range(3))

    def spawned(self) -> None:
        """The leader runs (or failed to start): close its ends here."""
        for fd in (self.slave, self.report_w, self.control_r):
            os.close(fd)
        self.slave = self.report_w = self.control_r = -1

    def fds(self) -> dict[str, int]:
        """Our ends the server polls: the master's output, its input, the leader's reports."""
        fds = {"tty": self.master, "leader": self.report_r}
        if self.stdin_w >= 0:
            fds["stdin"] = self.stdin_w
        return fds

    def reports(self) -> tuple[list[tuple[str, int]], int | None, int | None]:
        """The leader's new reports: (stop/continue events, the job's pid and its start time
        if it said them)."""
        try:
            self._buffer += os.read(self.report_r, 4096)
        except (BlockingIOError, OSError):
            pass
        *lines, self._buffer = self._buffer.split(b"\n")
        events, pid, started = [], None, None
        for line in lines:
            word, _, arg = line.partition(b" ")
            if word == b"pid" and all(a.isdigit() for a in arg.split()) and arg:
                pid, *rest = map(int, arg.split())
                started = (rest[0] if rest and rest[0] else start_time(pid)) or 0
            elif word == b"stop" and arg.isdigit():
                events.append(("stopped", int(arg)))
            elif word == b"cont":
                events.append(("continued", 0))
        return events, pid, started

    def control(self, line: bytes) -> None:
        """Tell the leader ``fg`` or ``bg``."""
        try:
            os.write(self.control_w, line)
        except OSError:
            pass

    def resize(self, rows: int, cols: int, xpixel: int, ypixel: int) -> None:
        """Set the pty's window size; the kernel sends SIGWINCH to its foreground group."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols,
                                                                  xpixel, ypixel))

    def eof_char(self) -> bytes:
        """The character that ends input at this terminal (VEOF, ^D)."""
        try:
            cc = termios.tcgetattr(self.master)[6][termios.VEOF]
        except termios.error:
            return b"\x04"
        return cc if isinstance(cc, bytes) else bytes([cc])

    def close(self) -> None:
        """Close the control pipe (the server closes the fds it polls)."""
        if self.control_w >= 0:
            os.close(self.control_w)
            self.control_w = -1

    def discard(self) -> None:
        """The leader never started: close our ends too."""
        self.close()
        for fd in (self.master, self.report_r, self.stdin_w):
            if fd >= 0:
                os.close(fd)
        self.master = self.report_r = self.stdin_w = -1


def _set_termios(fd: int, spec: dict) -> None:
    """Give the pty the caller's termios (what the spec has of it)."""
    if "lflag" not in spec:
        return
    attrs = termios.tcgetattr(fd)
    for i, name in enumerate(("iflag", "oflag", "cflag", "lflag", "ispeed", "ospeed")):
        attrs[i] = spec.get(name, attrs[i])
    cc = spec.get("cc", b"")
    attrs[6] = [cc[i:i + 1] if i < len(cc) else attrs[6][i] for i in range(len(attrs[6]))]
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _tty_group() -> int:
    """The group ``tty`` (terminals are 0620 root:tty for write(1)), or -1 to keep it."""
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return -1


def _ready(fd: int, n: int) -> int:
    """The bytes a pipe or pty holds unread (FIONREAD), at most ``n``."""
    try:
        return min(n, _COUNT.unpack(fcntl.ioctl(fd, termios.FIONREAD, bytes(_COUNT.size)))[0])
    except OSError:   # not a pipe or a terminal: the chunk
        return n


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


def _confiner(cwd, root, ids, limits, ctty: int | None = None, deathsig=signal.SIGKILL):
    """The job's ``preexec_fn``: in the child, as the caller, make fd ``ctty`` (if given) its
    controlling terminal, enter ``cwd``, check it lies in ``root``, set ``limits`` and
    no_new_privs, and ask for ``deathsig`` when offloadd dies; on a failure, one line on the
    job's stderr and exit 126 (an exception in a preexec_fn would reach us without its
    detail)."""
    cwd = os.fsencode(cwd)
    inside = None if root is None else os.fsencode(os.path.realpath(root))
    prefix = None if inside is None else inside.rstrip(b"/") + b"/"
    uid = os.getuid() if ids is None else ids[0]
    entering = b"offloadd: cannot enter %s as uid %d: " % (cwd, uid)
    parent, deathsig = os.getpid(), int(deathsig)

    # Runs between fork and exec, after CPython's setgroups/setregid/setreuid and its dup2 of
    # fds 0-2 (3.11), in a daemon with other threads (ZeroMQ's, mount workers). Only the forking
    # thread exists in the child, so a lock another thread held at fork stays held forever:
    # this function therefore takes none. It only calls pre-bound functions doing the syscalls
    # chdir, getcwd, setrlimit, prctl, getppid and write; it imports nothing and does not log.
    # Python objects it makes come from glibc malloc, which is fork-safe (its locks are reset
    # in the child); CPython re-initialises its own runtime state after fork before calling us.
    #
    # PR_SET_PDEATHSIG: the job dies (SIGKILL; a terminal's session leader gets SIGTERM, which
    # it handles by killing the job's group) when offloadd does, even of kill -9. It is set
    # here, after the uid switch, because a change of credentials clears it; exec keeps it
    # (no_new_privs: no setuid exec can clear it). The kernel sends it when the *thread* that
    # forked exits, not the process: that is the loop thread, which lives as long as the
    # daemon serves and kills every job before it returns. If offloadd died between the fork
    # and the prctl, getppid() is no longer offloadd: the job ends here, before it ran.
    # The children the job starts do not inherit it: see warden.py for them.
    def confine(chdir=os.chdir, getcwd=os.getcwdb, setrlimit=resource.setrlimit,
                prctl=_prctl, get_errno=ctypes.get_errno, die=_die, ioctl=fcntl.ioctl,
                sctty=termios.TIOCSCTTY, getppid=os.getppid) -> None:
        """Terminal, enter, check, limit, no_new_privs, death signal: see above."""
        if ctty is not None:
            try:
                ioctl(ctty, sctty, 0)
            except OSError as exc:
                die(b"offloadd: cannot give the job its terminal: %s\n"
                    % (exc.strerror or "error").encode())
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
        if prctl(PR_SET_PDEATHSIG, deathsig, 0, 0, 0) != 0:
            die(b"offloadd: cannot set the parent death signal (errno %d)\n" % get_errno())
        if getppid() != parent:
            die(b"offloadd: offloadd went away before the job started\n")
    return confine


def _die(line: bytes, write=os.write, end=os._exit) -> None:
    """In the job's child: ``line`` on its stderr (the job's pipe), then exit 126."""
    try:
        write(2, line)
    finally:
        end(126)


class Confined(collections.namedtuple("Confined", "cwd root limits ctty deathsig",
                                        defaults=(None, signal.SIGKILL))):
    """How a job is confined: the cwd it enters as the caller, the tree it must lie in (or
    None), its rlimits, the fd (0-2) to make its terminal (or None), its parent death
    signal."""


class Spawned:
    """A job started by the compiled spawn: what the server's loop thread uses of a
    subprocess.Popen (pid, our ends of its pipes, returncode)."""

    def __init__(self, pid: int, ends: list):
        """The child ``pid`` and our ends of its stdin, stdout, stderr (None: not a pipe)."""
        self.pid = pid
        self.stdin, self.stdout, self.stderr = (
            None if fd is None else open(fd, "wb" if n == 0 else "rb", buffering=0)
            for n, fd in enumerate(ends))
        self.returncode: int | None = None


def _spawn(path, argv, env, ids, confined: Confined, stdio=(subprocess.PIPE,) * 3,
           pass_fds=()) -> subprocess.Popen | Spawned:
    """Start the job in a new session, as ``ids`` when given, ``confined`` in the child before
    its exec: by the compiled spawn (vfork) where it is built, else by subprocess's fork and
    a preexec_fn; raise SpawnError with a clear text."""
    try:
        if _compiled_spawn() is None:
            who = {} if ids is None else {"user": ids[0], "group": ids[1],
                                          "extra_groups": ids[2]}
            return subprocess.Popen(argv, executable=path, env=env, stdin=stdio[0],
                                    stdout=stdio[1], stderr=stdio[2], bufsize=0,
                                    start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                    preexec_fn=_confiner(*confined[:2], ids, *confined[2:]),
                                    **who)
        return _vforked(path, argv, env, ids, confined, stdio, pass_fds)
    except FileNotFoundError:
        raise SpawnError(f"{path}: no such file or directory on this host") from None
    except PermissionError as exc:
        raise SpawnError(f"{exc.filename or path}: permission denied") from None
    except OSError as exc:
        raise SpawnError(f"{path}: {exc.strerror or errno.errorcode.get(exc.errno, exc)}") from None


def _vforked(path, argv, env, ids, confined: Confined, stdio, pass_fds) -> Spawned:
    """The job started by ``_spawn.spawn`` (see _spawn.c), with pipes where ``stdio`` says
    subprocess.PIPE."""
    ours, theirs, child_fds = [], [], []
    try:
        for n, how in enumerate(stdio):
            if how == subprocess.PIPE:
                r, w = os.pipe()   # close-on-exec; the child's end is dup2'd onto fd n
                ours.append(w if n == 0 else r)
                theirs.append(r if n == 0 else w)
            else:
                ours.append(None)
            child_fds.append(theirs[-1] if how == subprocess.PIPE else how)
        inside = None if confined.root is None else os.path.realpath(confined.root)
        pid = compiled.spawn(path, argv, _envp(env), child_fds, ids, confined.cwd, inside,
                             confined.limits, -1 if confined.ctty is None else confined.ctty,
                             int(confined.deathsig), sorted(pass_fds))
    except BaseException:
        for fd in ours:
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    return Spawned(pid, ours)


def _envp(env: dict) -> list[bytes]:
    """``env`` as execve's KEY=VALUE strings, refused as subprocess refuses it."""
    envp = []
    for key, value in env.items():
        key, value = os.fsencode(key), os.fsencode(value)
        if not key or b"=" in key:
            raise ValueError("illegal environment variable name")
        envp.append(key + b"=" + value)
    return envp


_fallback_said = False


def _compiled_spawn():
    """The compiled spawn module, or None (then offloadd says once why it forks instead):
    it is not built, or OFFLOADD_SPAWN=fork asks for subprocess's fork path."""
    global _fallback_said
    if compiled is not None and os.environ.get("OFFLOADD_SPAWN") != "fork":
        return compiled
    if not _fallback_said:
        _fallback_said = True
        logging.getLogger("offloadd").warning(
            "jobs start by fork and a preexec_fn (slower): %s",
            "OFFLOADD_SPAWN=fork" if compiled is not None else
            "offloadd._spawn is not built (reinstall with a C compiler and python3-dev)")
    return None


USERS_KEPT = 10.0   # seconds a uid's home and name are kept (a lookup reads /etc/passwd)
_users: dict[int, tuple[float, tuple[str, str]]] = {}


def user_of(uid: int) -> tuple[str, str]:
    """(home, name) of ``uid`` on this host; ("/", "uid") when unknown. Kept for
    ``USERS_KEPT`` seconds, as nscd would (the daemon's loop thread calls this)."""
    now = time.monotonic()
    kept = _users.get(uid)
    if kept is not None and now - kept[0] < USERS_KEPT:
        return kept[1]
    try:
        pw = pwd.getpwuid(uid)
        user = pw.pw_dir, pw.pw_name
    except KeyError:
        user = "/", str(uid)
    if len(_users) >= 1024:
        _users.clear()
    _users[uid] = (now, user)
    return user
