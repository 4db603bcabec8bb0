"""What the kernel says about the process that ran a shim: identity, cwd, environment, stdio,
pending signals, and where the local command is.

Called on FUSE worker threads (when a shim's control file is read) and on the agent thread
(signal polling). Everything here is local /proc and syscalls, never the network. Identity comes
from the kernel, never from the caller's environment.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import stat

from . import mountinfo

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (generic syscall table)
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def filesystem_ids(uid: int, gid: int):
    """On this thread only, touch files as ``uid``/``gid`` (setfsuid/setfsgid; supplementary
    groups are not switched). The agent reads and writes a caller's staged files this way, so
    a symlink in the caller's tree cannot make root read or write what the caller may not."""
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


class CallerGone(Exception):
    """The caller exited, or its /proc entries cannot be read."""


class Caller:
    """A snapshot of a shim process, taken when it asks for its job."""

    def __init__(self, pid: int):
        """Read the caller's identity, cwd and environment from /proc."""
        self.pid = pid
        try:
            self.uid, self.gid, self.groups = _identity(pid)
            self.cwd = os.fsencode(os.readlink(f"/proc/{pid}/cwd"))
            self.env = _environ(pid)
        except (OSError, ValueError) as exc:
            raise CallerGone(f"cannot read /proc/{pid}: {exc}") from None

    def stdio(self) -> tuple[int, int, int]:
        """Our own duplicates of the caller's fds 0, 1, 2 (the same open files); the caller
        of this method owns and closes them."""
        fds: list[int] = []
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError as exc:
            raise CallerGone(f"pid {self.pid}: {exc.strerror}") from None
        try:
            for n in (0, 1, 2):
                fds.append(_getfd(pidfd, self.pid, n))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise CallerGone(f"pid {self.pid} fd: {exc.strerror}") from None
        finally:
            os.close(pidfd)
        return fds[0], fds[1], fds[2]

    def local_command(self, name: str) -> str | None:
        """The command ``name`` the caller's PATH finds after the offloadfs mounts, or None."""
        cwd = os.fsdecode(self.cwd)
        mounts = mountinfo.offloadfs_mounts()
        path = os.fsdecode(self.env.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin"))
        for entry in path.split(":"):
            directory = os.path.join(cwd, entry or ".")
            if mountinfo.inside(os.path.normpath(directory), mounts):
                continue
            candidate = os.path.join(directory, name)
            if _executable(candidate):
                return candidate
        return None

    def debug(self) -> bool:
        """True if the caller asked for debug lines (OFFLOADFS_DEBUG=1)."""
        return self.env.get(b"OFFLOADFS_DEBUG") == b"1"


def pending_signals(pid: int) -> set[int]:
    """Signals pending for ``pid`` (process-wide and its main thread's); empty if gone."""
    try:
        status = _status(pid)
        mask = int(_field(status, b"SigPnd")[0], 16) | int(_field(status, b"ShdPnd")[0], 16)
    except (OSError, ValueError, IndexError):
        return set()
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def _identity(pid: int) -> tuple[int, int, list[int]]:
    """(uid, gid, groups) of ``pid``: the real ids from /proc/PID/status."""
    status = _status(pid)
    try:
        uid, gid = int(_field(status, b"Uid")[0]), int(_field(status, b"Gid")[0])
    except IndexError:
        raise ValueError("no Uid/Gid line") from None
    return uid, gid, [int(g) for g in _field(status, b"Groups")]


def _status(pid: int) -> bytes:
    """/proc/PID/status (read whole: its lines are looked up, not walked)."""
    return _read(f"/proc/{pid}/status")


def _read(path: str) -> bytes:
    """The whole of a /proc file, with plain reads (no buffered file: it would fstat, ask
    whether the file is a terminal and seek, each a syscall, on every control open)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _field(status: bytes, name: bytes) -> list[bytes]:
    """The words of line ``name`` of a /proc status text (none if it has no such line)."""
    start = status.find(b"\n" + name + b":")
    if start < 0:
        return []
    start += len(name) + 2
    end = status.find(b"\n", start)
    return status[start:end if end >= 0 else len(status)].split()


def _environ(pid: int) -> dict[bytes, bytes]:
    """The environment ``pid`` was started with."""
    data = _read(f"/proc/{pid}/environ")
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key] = value
    return env


def _getfd(pidfd: int, pid: int, n: int) -> int:
    """A duplicate of fd ``n`` of the process: pidfd_getfd, or reopening /proc/PID/fd/N."""
    fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, n, 0)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err not in (1, 38):  # EPERM (ptrace policy) or ENOSYS (old kernel): try /proc
        raise OSError(err, os.strerror(err))
    return _reopen(pid, n)


def _reopen(pid: int, n: int) -> int:
    """Reopen the caller's fd ``n`` through /proc with its access mode (not for sockets)."""
    with open(f"/proc/{pid}/fdinfo/{n}") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    mode = flags & os.O_ACCMODE
    return os.open(f"/proc/{pid}/fd/{n}", mode | os.O_CLOEXEC | (flags & os.O_APPEND))


def _executable(path: str) -> bool:
    """True for a regular file with an execute bit."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
