"""The caller's terminal on the client side: what the host's pty copies, raw mode, foreground.

A job gets a pty on the host when its caller has a terminal on stdout or stderr (``offld`` and
a shim's caller alike; ``offld -t`` forces one, ``-T`` refuses it); see :func:`choose` for
stdin. A :class:`Terminal` belongs to one job run and is used on the client loop's thread only
(``offld``'s main thread, the mount's agent thread). While the job runs in the foreground, the
caller's terminal is in raw mode, as under ``ssh -t``: keys go to the host's pty as typed, and
its line discipline echoes them and turns ^C, ^Z and ^\\ into signals there.
:meth:`Terminal.restore` puts the settings back; the job run calls it on every way out.
Foreground is judged from ``/proc/PID/stat`` (the caller's group against its terminal's
foreground group): the mount's agent is not in the caller's session, so it cannot ask the
terminal itself.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios

from . import protocol
from .handoff import JOB_CONTROL  # noqa: F401  (stops a caller mirrors; one copy)

DEFAULT_SIZE = (24, 80, 0, 0)   # a forced pty (offld -t) without a local terminal


def choose(stdio: tuple[int, int, int], pid: int, mode: str = "auto") -> Terminal | None:
    """The caller's terminal if the job should have a pty: ``mode`` auto, force (-t) or never
    (-T). Under auto, the fds among stdout and stderr that are a terminal become the pty, and
    stdin too when stdout is that terminal: the job then owns the screen and the keys, and the
    terminal is raw while it runs. A stdin terminal whose output goes elsewhere (``cmd | less``)
    stays the caller's: it is read in its own (cooked) mode and relayed like a pipe, so that a
    pager downstream keeps the terminal's settings it chose."""
    if mode == "never":
        return None
    ttys = [_tty_rdev(fd) for fd in stdio]
    primary = next((r for r in (ttys[1], ttys[2], ttys[0]) if r is not None), None)
    local = sum(1 << n for n, r in enumerate(ttys) if r is not None and r == primary)
    if mode == "force":
        return Terminal(stdio, pid, protocol.TTY_STDIN | protocol.TTY_STDOUT
                        | protocol.TTY_STDERR, local)
    mask = local & (protocol.TTY_STDOUT | protocol.TTY_STDERR)
    if mask & protocol.TTY_STDOUT:
        mask |= local & protocol.TTY_STDIN
    return Terminal(stdio, pid, mask, local) if mask else None


def _tty_rdev(fd: int) -> int | None:
    """The device of ``fd`` if it is a terminal, else None."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISCHR(st.st_mode) and os.isatty(fd) else None


class Terminal:
    """The terminal a job's caller has, and the bits (``mask``) of its fds the host's pty
    takes over; ``local`` says which of them really are that terminal here."""

    def __init__(self, stdio: tuple[int, int, int], pid: int, mask: int, local: int):
        """Read the settings and window size of the caller's terminal (if it has one)."""
        self.pid, self.mask, self.local = pid, mask, local
        self.fd = next((stdio[n] for n in range(3) if local & (1 << n)), None)
        self.out_fd = next((stdio[n] for n in (1, 2, 0) if local & (1 << n)), stdio[1])
        self.saved = _attrs(self.fd)
        self.size = window_size(self.fd) if self.fd is not None else DEFAULT_SIZE
        self.raw = False

    @property
    def reads_keys(self) -> bool:
        """True when the job's stdin is the pty and the caller's stdin is this terminal."""
        return bool(self.mask & self.local & protocol.TTY_STDIN)

    def spec(self) -> dict:
        """The submit's ``tty``: which fds, the window size, the settings, the foreground."""
        rows, cols, xpixel, ypixel = self.size
        spec = {"fds": self.mask, "rows": rows, "cols": cols, "xpixel": xpixel,
                "ypixel": ypixel, "foreground": self.foreground()}
        if self.saved is not None:
            iflag, oflag, cflag, lflag, ispeed, ospeed, cc = self.saved
            spec.update(iflag=iflag, oflag=oflag, cflag=cflag, lflag=lflag, ispeed=ispeed,
                        ospeed=ospeed, cc=_cc_bytes(cc))
        return spec

    def foreground(self) -> bool:
        """True if the caller is in its terminal's foreground (always, without a terminal)."""
        return self.fd is None or foreground(self.pid)

    def resized(self) -> tuple[int, int, int, int] | None:
        """The new window size if it changed since the last look, else None."""
        if self.fd is None:
            return None
        size = window_size(self.fd)
        if size == self.size:
            return None
        self.size = size
        return size

    def enter_raw(self) -> None:
        """Raw mode for the caller's terminal: keys as typed, no echo, no signals, no output
        processing (the host's pty does all of it)."""
        if self.raw or not self.reads_keys or self.saved is None:
            return
        attrs = [list(x) if isinstance(x, list) else x for x in self.saved]
        attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                      | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                      | termios.IXOFF | termios.IXANY)
        attrs[1] &= ~termios.OPOST
        attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                      | termios.IEXTEN)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)
        except termios.error:
            return
        self.raw = True

    def restore(self) -> None:
        """Put the caller's own settings back (a no-op unless raw)."""
        if not self.raw:
            return
        self.raw = False
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        except termios.error:
            pass

    def for_screen(self, data: bytes) -> bytes:
        """The host's pty output as this terminal should get it: when this terminal does
        output processing itself (it is not raw: the caller's stdin is not the terminal),
        the host's newline translation is undone, or every line would end in CR CR LF.
        Called on the tty sink's thread."""
        data = bytes(data)   # a payload may be a view of its frame
        if self.fd is None or b"\r\n" not in data:
            return data
        attrs = _attrs(self.fd)
        if attrs is None or not (attrs[1] & termios.OPOST and attrs[1] & termios.ONLCR):
            return data
        return data.replace(b"\r\n", b"\n")

    def stty(self) -> str:
        """The saved settings as ``stty -g`` writes them (a shim restores them with stty if
        the mount dies while the terminal is raw)."""
        if self.saved is None:
            return ""
        iflag, oflag, cflag, lflag, _, _, cc = self.saved
        return ":".join([f"{iflag:x}", f"{oflag:x}", f"{cflag:x}", f"{lflag:x}"]
                        + [f"{c:x}" for c in _cc_bytes(cc)])


def foreground(pid: int) -> bool:
    """True if process ``pid`` is in the foreground group of its controlling terminal."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    pgrp, tty_nr, tpgid = int(fields[2]), int(fields[4]), int(fields[5])
    return tty_nr != 0 and pgrp == tpgid


def window_size(fd: int) -> tuple[int, int, int, int]:
    """(rows, cols, xpixel, ypixel) of the terminal ``fd``."""
    try:
        return struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return DEFAULT_SIZE


def _attrs(fd: int | None) -> list | None:
    """tcgetattr of ``fd``, or None."""
    if fd is None:
        return None
    try:
        return termios.tcgetattr(fd)
    except termios.error:
        return None


def _cc_bytes(cc: list) -> bytes:
    """termios' control characters (bytes, or ints for VMIN/VTIME outside canonical mode)."""
    return bytes(c if isinstance(c, int) else c[0] for c in cc)
