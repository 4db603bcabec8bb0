"""Staging (``offld -n``): the job's input files travel in messages, its output files come back.

Used on the client loop's thread by :class:`~offloadfs.jobrun.JobRun`: :func:`plan` picks the
files the argv names under the cwd, :class:`Outbox` reads them in chunks as credit allows, and
:class:`Inbox` writes returned files atomically into the cwd (a temporary file renamed over the
target once complete), so a reader never sees half a file.
"""
from __future__ import annotations

import os
import stat

from . import protocol


def plan(argv: list[bytes], cwd: bytes, extra=()) -> tuple[list[bytes], list[bytes]]:
    """(argv with absolute paths under ``cwd`` made relative, files to send relative to cwd):
    every argument (or ``extra`` name) that is a regular file inside ``cwd``."""
    new_argv, files = [argv[0]], []
    for arg in argv[1:]:
        rel = _inside(arg, cwd)
        new_argv.append(rel if rel is not None and os.path.isabs(arg) else arg)
        if rel is not None and rel not in files:
            files.append(rel)
    for name in extra:
        rel = _inside(os.fsencode(name), cwd)
        if rel is not None and rel not in files:
            files.append(rel)
    return new_argv, files


def _inside(arg: bytes, cwd: bytes) -> bytes | None:
    """``arg`` as a path relative to ``cwd`` if it names a regular file inside it."""
    path = os.path.normpath(os.path.join(cwd, arg))
    if not path.startswith(cwd.rstrip(b"/") + b"/"):
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return os.path.relpath(path, cwd)


def total(cwd: bytes, files: list[bytes]) -> int:
    """The bytes the files hold."""
    return sum(os.stat(os.path.join(cwd, f)).st_size for f in files)


class Outbox:
    """Chunks of files to send, read lazily as credit allows."""

    def __init__(self, directory: bytes | str, files: list):
        """Send ``files`` (relative names) of ``directory`` in order."""
        self.directory, self.files = os.fsencode(directory), [os.fsencode(f) for f in files]
        self.fd = -1
        self.mode = 0o644

    def next_chunk(self, limit: int):
        """(name, mode, last, data) of the next chunk of at most ``limit`` bytes, or None."""
        while self.files:
            name = self.files[0]
            if self.fd < 0:
                self.fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_NOFOLLOW)
                self.mode = stat.S_IMODE(os.fstat(self.fd).st_mode)
            data = os.read(self.fd, min(limit, protocol.CHUNK))
            last = len(data) < min(limit, protocol.CHUNK) and self._at_end()
            if last:
                os.close(self.fd)
                self.fd = -1
                self.files.pop(0)
            return name, self.mode, last, data
        return None

    def _at_end(self) -> bool:
        """True if the open file has nothing more to read."""
        return os.lseek(self.fd, 0, os.SEEK_CUR) >= os.fstat(self.fd).st_size

    def close(self) -> None:
        """Close a file left open."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Inbox:
    """Writes returned files into a directory, each atomically once its last chunk is in."""

    def __init__(self, directory: bytes | str, owner: tuple[int, int] | None = None):
        """Files land in ``directory``; ``owner`` (uid, gid) is given to them when set."""
        self.directory, self.owner = os.fsencode(directory), owner
        self.open: dict[bytes, tuple[int, bytes]] = {}
        self.written: list[bytes] = []

    def write(self, name: bytes, mode: int, last: bool, data: bytes) -> None:
        """Add a chunk of ``name``; on the last one, put the file in place."""
        if name not in self.open:
            self.open[name] = self._temp(name, mode)
        fd, _ = self.open[name]
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if last:
            fd, temp = self.open.pop(name)
            os.close(fd)
            os.replace(temp, os.path.join(self.directory, name))
            self.written.append(name)

    def _temp(self, name: bytes, mode: int) -> tuple[int, bytes]:
        """An open temporary file beside ``name`` (parents made as needed)."""
        target = os.path.join(self.directory, name)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, b".offloadfs-" + os.urandom(6).hex().encode() + b"-" +
                            os.path.basename(target))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode & 0o7777)
        if self.owner is not None:
            os.fchown(fd, *self.owner)
        return fd, temp

    def discard(self) -> None:
        """Remove unfinished temporary files."""
        for fd, temp in self.open.values():
            os.close(fd)
            try:
                os.unlink(temp)
            except OSError:
                pass
        self.open.clear()


def snapshot(directory: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every regular file below ``directory``, by relative name."""
    found = {}
    for top, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return found


def changed(directory: str, before: dict[str, tuple[int, int]], uid: int) -> list[str]:
    """Regular files below ``directory`` that are new or changed since ``before``, and owned by
    ``uid`` (a job cannot make us send back a file it merely linked in)."""
    out = []
    for top, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, directory)
            if stat.S_ISREG(st.st_mode) and st.st_uid == uid and \
                    before.get(rel) != (st.st_size, st.st_mtime_ns):
                out.append(rel)
    return sorted(out)
