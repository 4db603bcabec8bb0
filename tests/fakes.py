"""Stand-ins for the VM side's I/O, for unit tests without sockets or processes.

:class:`FakeChannel` takes the place of :class:`offloadfs.channel.Channel` for a
:class:`~offloadfs.jobrun.JobRun` and a :class:`~offloadfs.client.ClientLoop`: what they send
is decoded and kept in ``sent``; what the test :meth:`~FakeChannel.feed`\\ s is what the host
said, handed out by ``recv`` (each message checked by the real protocol module both ways).
:class:`FakeLink` is an agent's host link on such a channel, :class:`FakeCaller` a shim's
caller, and :class:`Stdio` the caller's fds 0-2 as pipes. Everything runs on the test's thread
(a JobRun's sink threads aside); every fd is closed by ``close``.
"""
from __future__ import annotations

import collections
import os
import time

import pytest

from offloadfs import protocol
from offloadfs.agent import HostLink
from offloadfs.channel import OffloadError
from offloadfs.protocol import Message
from offloadfs.states import HostState


class Pollable:
    """Something a zmq.Poller can watch that never becomes ready (a pipe nobody writes)."""

    def __init__(self):
        """A fresh pipe."""
        self.r, self.w = os.pipe2(os.O_CLOEXEC)

    def fileno(self) -> int:
        """The read end, for the poller."""
        return self.r

    def close(self, linger=None) -> None:
        """Close both ends."""
        os.close(self.r)
        os.close(self.w)


class FakeChannel:
    """A host connection as a JobRun and the client loop use it: send, recv, host, heard."""

    def __init__(self, host: str = "h1", accepts: bool = True):
        """A channel to ``host``; ``accepts`` False: every send fails as ZeroMQ's would."""
        self.host, self.endpoint, self.accepts = host, f"tcp://{host}:1", accepts
        self.heard = time.monotonic()
        self.stalled = False
        self.welcome = None
        self.sent: list[Message] = []
        self.incoming: collections.deque = collections.deque()
        self.sock = Pollable()

    def send(self, frames: list) -> bool:
        """Keep the decoded message; False when this channel does not accept sends."""
        self.sent.append(protocol.decode(frames))
        return self.accepts

    def recv(self) -> Message | None:
        """The next message fed (an OffloadError fed is raised), else None."""
        if not self.incoming:
            return None
        self.heard = time.monotonic()
        item = self.incoming.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def feed(self, kind: str, job: str | None = None, payload: bytes | None = None, /,
             **fields) -> Message:
        """Queue a message from the host (encoded and decoded as on the wire)."""
        msg = protocol.decode(protocol.encode(kind, job, payload, **fields))
        self.incoming.append(msg)
        return msg

    def feed_garbage(self, text: str = "garbage") -> None:
        """Queue what a bad frame makes ``Channel.recv`` raise."""
        self.incoming.append(OffloadError(f"{self.host} sent a bad message: {text}", "protocol"))

    def kinds(self, job: str | None = None) -> list[str]:
        """The kinds sent so far (about ``job`` only, if given)."""
        return [m.kind for m in self.sent if job is None or m.job == job]

    def close(self, linger=None) -> None:
        """Close the poll stand-in."""
        self.sock.close()


class FakeLink(HostLink):
    """An agent's host link over a FakeChannel, up and offering ``commands``."""

    def __init__(self, channel: FakeChannel, commands=("cat",), up: bool = True):
        """No socket and no monitor socket: a pipe stands in for the monitor."""
        self.endpoint, self.channel, self.keys, self.ctx = channel.endpoint, channel, None, None
        self.monitor = Pollable()
        self.failure = ""
        self.state = HostState.UP if up else HostState.UNKNOWN
        self.since = time.monotonic()
        self.hello_sent = time.monotonic()
        self.name = channel.host
        self.commands = list(commands)
        self.in_flight = 0
        self.dead_since = self.down_at = None
        self.rebuilt = 0

    def close(self, linger=None) -> None:
        """Close the stand-ins."""
        self.monitor.close()
        self.channel.close()

    def rebuild(self) -> None:
        """Count it; the same fake channel stays."""
        self.rebuilt += 1


class FakeCaller:
    """A shim's caller (offloadfs.caller.Caller) without /proc: this very process."""

    def __init__(self, cwd: str = "/", local: str | None = "/bin/cat", debug: bool = False):
        """Our own pid and ids; ``local`` is what its PATH finds after the mount."""
        self.pid, self.uid, self.gid, self.groups = os.getpid(), os.getuid(), os.getgid(), []
        self.cwd, self.env = os.fsencode(cwd), {b"PATH": b"/usr/bin:/bin"}
        self.local, self.verbose = local, debug

    def local_command(self, name: str) -> str | None:
        """The local command a fallback runs."""
        return self.local

    def debug(self) -> bool:
        """Whether the caller asked for debug lines."""
        return self.verbose


class Stdio:
    """A caller's fds 0-2 as pipes: the test writes ``stdin`` and reads ``out`` and ``err``."""

    def __init__(self):
        """Three pipes; ``fds`` are the caller's ends (given to a job, which may close them)."""
        self.stdin_r, self.stdin = os.pipe2(os.O_CLOEXEC)
        self.out, out_w = os.pipe2(os.O_CLOEXEC)
        self.err, err_w = os.pipe2(os.O_CLOEXEC)
        for fd in (self.out, self.err):
            os.set_blocking(fd, False)
        self.fds = (self.stdin_r, out_w, err_w)
        self.mine = [self.stdin, self.out, self.err]

    def dup(self) -> tuple[int, int, int]:
        """Duplicates of the caller's ends (for a ShimRequest, which closes what it holds)."""
        return tuple(os.dup(fd) for fd in self.fds)

    def read(self, fd: int) -> bytes:
        """What has been written to ``out`` or ``err`` so far."""
        try:
            return os.read(fd, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        """Close every end."""
        for fd in self.mine + list(self.fds):
            os.close(fd)


@pytest.fixture
def stdio():
    """The caller's fds as pipes (a fixture: import it into a test module)."""
    s = Stdio()
    yield s
    s.close()
