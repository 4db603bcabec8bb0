"""One job on the client side, from submit to exit status: stdio pumps, credit, signals.

The client loop thread (``offld``'s main thread, later the agent's loop) owns every
:class:`JobRun` and calls all its methods. Output is written to the caller's fds by one
:class:`Sink` thread per stream, because a blocking write to a slow reader must not stop the
loop's heartbeats; sinks report progress through the wake-up pipe, and the loop turns it into
credit for the daemon. Stdin is read on the loop thread only after poll() says it is readable,
so the caller's fds are never switched to non-blocking (a tty is shared with the shell).

With a terminal (``terminal.Terminal``) the job has a pty on the host: the pty's output is the
stream ``tty``, keys are read only while the caller is in its terminal's foreground, and the
caller's terminal is raw while the job runs there and restored on every way out. When the host
says the job ``stopped``, the run restores the terminal, says ``suspend`` and calls
``on_stop(signum)``: the owner stops the caller (``offld`` itself; a shim through its reply)
and calls :meth:`JobRun.continued` when it runs again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import queue
import signal
import stat
import threading
import time

import zmq

from . import heap, notice, protocol, staging
from .channel import Channel, OffloadError
from .handoff import RELAYED
from .protocol import Message
from .states import IllegalTransition, JobState, advance
from .terminal import Terminal, foreground

# What a host (or a broker for it) may say about a job, from the protocol's routing table.
FROM_HOST = protocol.accepted_by(protocol.CLIENT) & (protocol.NEEDS_JOB | {"error"})
OUTPUT = protocol.accepted_by(protocol.CLIENT) & protocol.PAYLOAD_KINDS   # spends output credit
BEFORE_START = OUTPUT | {"stopped", "exit"}   # illegal before ``started`` (a job's state)
STOP_SIGNALS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGSTOP})
# The caller's signals a job gets: the protocol's forwarded ones, and a stop (handled apart).
FORWARDED = RELAYED   # (handoff's: offld blocks them while the mount's agent runs its job)
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SIGNAL_GRACE = 5.0   # seconds a host may stay silent after an ending signal was forwarded
SINK_WAIT = 5.0   # seconds a stop waits for the terminal's output before it restores it
DEV_NULL = os.makedev(1, 3)   # the device number of /dev/null on Linux


@dataclasses.dataclass
class JobSpec:
    """What the caller asks to run."""

    argv: list[bytes]
    cwd: bytes
    uid: int
    gid: int
    groups: list[int]
    env: dict[bytes, bytes]
    tags: list[str] = dataclasses.field(default_factory=list)
    data: dict | None = None   # where the host finds the cwd (export.Export.descriptor)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How often to heartbeat a daemon and how long its silence is tolerated (seconds)."""

    heartbeat: float = 1.0
    liveness: float = 10.0
    ack_timeout: float = 5.0


@dataclasses.dataclass
class Outcome:
    """How a job ended: its exit status, or the offload error that ended it."""

    status: int
    host: str = ""
    error: OffloadError | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    rusage: dict = dataclasses.field(default_factory=dict)
    signal: int | None = None


class Sink:
    """Writes one stream's chunks to a fd, blocking, off the loop thread.

    The loop thread calls :meth:`put`, :meth:`end` and :meth:`take`; the sink's thread (made
    and started with the first chunk: a job that writes nothing on a stream, most no-ops,
    costs no thread) writes and pokes ``wake_fd`` after each chunk so that the loop returns
    credit promptly.
    """

    def __init__(self, name: str, fd: int, wake_fd: int, transform=None):
        """A sink for ``fd`` named after its stream; ``transform`` (if given) rewrites each
        chunk just before it is written."""
        self.name = f"offloadfs-{name}-sink"
        self.fd, self.wake_fd, self.transform = fd, wake_fd, transform
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()   # bytes, a callable, or None
        self.lock = threading.Lock()
        self.written = 0
        self.broken = False
        self.thread: threading.Thread | None = None

    def put(self, data: bytes) -> None:
        """Queue a chunk for writing (the first starts the sink's thread)."""
        heap.keep_stream_buffers()
        self.chunks.put(data)
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
            self.thread.start()

    def is_alive(self) -> bool:
        """True while the sink's thread runs."""
        return self.thread is not None and self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the sink's thread (if it ever started) to end."""
        if self.thread is not None:
            self.thread.join(timeout)

    def then(self, action, wait: bool = False) -> None:
        """Run ``action()`` on the sink's thread after the chunks queued before it (a terminal
        mode change must not overtake output meant for the old mode); ``wait`` until done."""
        if not self.is_alive():   # nothing queued before it (not started, or ended)
            action()
            return
        done = threading.Event()
        self.chunks.put(lambda: (action(), done.set()))
        if wait:
            done.wait(SINK_WAIT)

    def end(self) -> None:
        """No more chunks: the thread ends after the queued ones."""
        self.chunks.put(None)

    def take(self) -> int:
        """Bytes written (or discarded after EPIPE) since the last call."""
        with self.lock:
            n, self.written = self.written, 0
        return n

    def run(self) -> None:
        """Write chunks until :meth:`end`."""
        while (data := self.chunks.get()) is not None:
            if callable(data):
                data()
                _poke(self.wake_fd)
                continue
            if not self.broken:
                out = data if self.transform is None else self.transform(data)
                self.broken = not _write_all(self.fd, out)
            with self.lock:
                self.written += len(data)
            _poke(self.wake_fd)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to ``fd``; False when the reader is gone (EPIPE) or fd is bad."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except BlockingIOError:
            _wait_writable(fd)
        except OSError:
            return False
    return True


def _wait_writable(fd: int) -> None:
    """Block until ``fd`` (someone else's non-blocking fd) takes data."""
    poller = zmq.Poller()
    poller.register(fd, zmq.POLLOUT)
    poller.poll(1000)


def _poke(fd: int) -> None:
    """Wake the loop thread (a full pipe already means it will wake)."""
    try:
        os.write(fd, b"w")
    except (BlockingIOError, OSError):
        pass


class JobRun:
    """A job submitted on a channel, relaying stdio between the caller's fds and the daemon."""

    def __init__(self, channel: Channel, spec: JobSpec, stdio: tuple[int, int, int],
                 wake_fd: int, debug=None,
                 staged: tuple[staging.Outbox, staging.Inbox] | None = None,
                 as_caller=contextlib.nullcontext, terminal: Terminal | None = None,
                 caller: int | None = None):
        """Prepare the job; nothing is sent until :meth:`submit`. ``caller`` is the pid whose
        foreground state decides whether a terminal on stdin may be read (ours by default);
        ``terminal`` gives the job a pty on the host."""
        self.id = os.urandom(8).hex()
        self.channel, self.spec, self.debug = channel, spec, debug or (lambda text: None)
        self.terminal = terminal
        self.caller = os.getpid() if caller is None else caller
        self.stdin_fd = stdio[0] if self._reads_stdin(stdio[0]) else None
        self.eof_sent = False       # the daemon knows stdin's end (stdin-eof, or stdin_null)
        for fd in {self.stdin_fd, stdio[1]}:   # stderr rarely carries bulk
            _grow_pipe(fd)
        self.sinks = {"stdout": Sink("stdout", stdio[1], wake_fd),
                      "stderr": Sink("stderr", stdio[2], wake_fd)}
        if terminal is not None:
            self.sinks["tty"] = Sink("tty", terminal.out_fd, wake_fd, terminal.for_screen)
        self.on_stop = lambda signum: None
        self.waits = notice.SILENT        # the queue notice at the caller's terminal
        self.raw = False                  # the caller's terminal is (to be) raw
        self.stopped: int | None = None   # the signal the job stopped with, until continued
        self.state = JobState.NEW
        self.credit = self.owed = 0
        self.closed: set[str] = set()
        self.outbox, self.inbox = staged or (None, None)
        self.as_caller = as_caller   # context for staged file I/O with the caller's ids
        self.stage_credit = 0
        self.ran_on = ""
        self.outcome: Outcome | None = None
        self.submitted = self.last_ping = self.resumed = 0.0
        self.listed = 0.0           # when the host last named this job in its pings
        self.heard_of = False       # the host said anything about the job (then it may run)
        self.received = self.drained = 0    # output bytes received, and written out since
        self.ending: float | None = None    # when an ending signal was forwarded

    # --- sending -------------------------------------------------------------------------------

    def submit(self) -> None:
        """Send the job (each sink starts with its first chunk)."""
        s = self.spec
        extra = {"data": s.data} if s.data else {}
        if self.terminal is not None:
            extra["tty"] = self.terminal.spec()
        if self._no_stdin() and protocol.STDIN_NULL in self._features():
            extra["stdin_null"] = self.eof_sent = True   # no stdin-eof to send, nor to lose
        self.submitted = self.last_ping = self.listed = time.monotonic()
        sent = self.channel.send(protocol.encode(
            "submit", self.id, argv=s.argv, cwd=s.cwd, uid=s.uid, gid=s.gid, groups=s.groups,
            env=s.env, window=protocol.WINDOW, tags=s.tags, **extra))
        if not sent:
            self.fail(OffloadError(f"cannot reach {self.channel.host}; the job never ran",
                                   "no-host", False))

    def _no_stdin(self) -> bool:
        """True if the job gets no stdin from us: none relayed (/dev/null, or withheld),
        and not the host's terminal's."""
        return self.stdin_fd is None and not (self.terminal and self.terminal.mask
                                              & protocol.TTY_STDIN)

    def _features(self) -> list[str]:
        """What the daemon's welcome offers (through a broker: the broker's)."""
        welcome = self.channel.welcome
        return welcome.get("features", []) if welcome is not None else []

    def may_have_started(self) -> bool:
        """True from the moment a host could have received the submit: the rule that a job
        is never run twice hangs on this (docs/decisions.md)."""
        return self.submitted > 0

    def _reads_stdin(self, fd: int) -> bool:
        """Whether the caller's stdin is relayed: not a terminal the host's pty does not take
        over while the caller is in the background (its stdin is then closed on the host)."""
        if self.terminal is not None and self.terminal.mask & protocol.TTY_STDIN:
            return self.terminal.reads_keys
        return _readable_fd(fd, self.caller)

    def send(self, kind: str, payload: bytes | None = None, **fields) -> None:
        """Send a message about this job."""
        self.channel.send(protocol.encode(kind, self.id, payload, **fields))

    def signal(self, signum: int) -> None:
        """The caller got a signal: forward it, or give up on a job not yet started. With a
        pty on the host, a window change is a resize of it instead."""
        if signum == signal.SIGCONT or (signum == signal.SIGWINCH and self.terminal):
            self.check_terminal()
        elif signum == signal.SIGTSTP and self.state in (JobState.NEW, JobState.QUEUED):
            self.stop_here(signum)   # nothing runs yet: only the caller stops
        elif self.state == JobState.RUNNING and signum in ENDING and self.ending is not None:
            self.cancel()   # a second one: the user wants out now, whatever the host does
            self.fail(OffloadError(f"stopped by a second signal; the job on {self.host()} "
                                   f"was cancelled, its outcome is unknown", "cancelled", True))
        elif self.state == JobState.RUNNING:
            self.debug(f"forwarding signal {signum} to the job")
            self.send("signal", signum=signum)
            if signum in ENDING:
                self.ending = time.monotonic()
        elif not self.state.final and signum in ENDING:
            self.send("cancel")
            self._finish(Outcome(128 + signum, self.channel.host, signal=signum))

    def host(self) -> str:
        """The host the job runs on (through a broker: the one it chose, once known)."""
        return self.ran_on or self.channel.host

    def cancel(self) -> None:
        """Tell the daemon to drop the job (the caller is going away)."""
        if not self.state.final:
            self.send("cancel")

    # --- the loop's callbacks ------------------------------------------------------------------

    def want(self, poller: zmq.Poller) -> None:
        """Register stdin when the daemon has granted credit for more (a terminal: while the
        job runs in the caller's foreground)."""
        keys = self.terminal is not None and self.terminal.reads_keys
        if self.state == JobState.RUNNING and self.stdin_fd is not None and self.credit > 0 \
                and (not keys or self.raw):
            poller.register(self.stdin_fd, zmq.POLLIN)

    # --- a terminal: foreground, window size, stops ---------------------------------------------

    def check_terminal(self) -> None:
        """Follow the caller's terminal: raw while the job runs in its foreground, the host's
        pty told when the caller moved between fore- and background or resized the window."""
        t = self.terminal
        if t is None or self.state != JobState.RUNNING or self.stopped is not None:
            return
        self._send_size()
        front = t.foreground()
        if front and not self.raw and t.reads_keys:
            self._raw(True)
            self.send("resume", foreground=True)
        elif not front and self.raw:
            self._raw(False)
            self.send("resume", foreground=False)

    def _raw(self, on: bool, wait: bool = False) -> None:
        """Raw mode on or off for the caller's terminal, after the terminal output received
        before (its sink changes the mode; ``raw`` is what this thread asked for)."""
        self.raw = on and self.terminal.reads_keys
        action = self.terminal.enter_raw if on else self.terminal.restore
        self.sinks["tty"].then(action, wait)

    def _on_stopped(self, msg: Message) -> None:
        """The job stopped on the host (Ctrl-Z typed there, SIGTTIN, a forwarded SIGTSTP)."""
        if msg["signal"] not in STOP_SIGNALS:
            raise IllegalTransition(f"stopped by {msg['signal']}, which stops nothing")
        self.stop_here(msg["signal"])

    def stop_here(self, signum: int) -> None:
        """Give the terminal back, say we suspend, and let the owner stop the caller."""
        self.stopped = signum
        if self.terminal is not None:
            self._raw(False, wait=True)
        self.send("suspend")
        self.on_stop(signum)

    def continued(self) -> None:
        """The caller runs again after a stop: so does the job, in the foreground or not."""
        if self.stopped is None or self.state.final:
            return
        self.stopped = None
        self.last_ping = self.resumed = time.monotonic()
        front = self.terminal.foreground() if self.terminal else True
        if front and self.terminal is not None:
            self._raw(True)
            self._send_size()
        self.send("resume", foreground=front)

    def _send_size(self) -> None:
        """Tell the host's pty the caller's window size if it changed."""
        size = self.terminal.resized()
        if size is not None:
            self.send("resize", rows=size[0], cols=size[1], xpixel=size[2], ypixel=size[3])

    def stdin_ready(self) -> None:
        """Read what stdin has (poll said it would not block) and send it."""
        try:
            data = os.read(self.stdin_fd, min(protocol.CHUNK, self.credit))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            heap.keep_stream_buffers()
            self.credit -= len(data)
            self.send("stdin", payload=data)
        else:
            self.stdin_fd = None
            self.eof_sent = True
            self.send("stdin-eof")

    def woken(self) -> None:
        """Sinks made progress: return credit in batches; a sink whose reader left closes it."""
        self._consumed(sum(sink.take() for sink in self.sinks.values()))
        for name, sink in self.sinks.items():
            if sink.broken and name not in self.closed and not self.state.final:
                self.closed.add(name)
                self.send("close", stream=name)

    def _consumed(self, n: int) -> None:
        """``n`` bytes of output were written out: return credit once a batch is owed."""
        self.owed += n
        self.drained += n
        if self.owed >= protocol.CREDIT_BATCH and not self.state.final:
            self.send("credit", n=self.owed)
            self.owed = 0

    def _send_files(self) -> None:
        """Staging: send input file chunks while stage credit lasts."""
        while self.stage_credit > 0:
            try:
                with self.as_caller():
                    chunk = self.outbox.next_chunk(self.stage_credit)
            except OSError as exc:
                self.cancel()
                self.fail(OffloadError(f"cannot read {exc.filename!r}: {exc.strerror}",
                                       "stage", False))
                return
            if chunk is None:
                return
            name, mode, last, data = chunk
            self.send("file", data, name=name, mode=mode, last=last)
            self.stage_credit -= len(data)

    def _on_file(self, msg: Message) -> None:
        """Staging: a chunk of a file the job created or changed."""
        if self.inbox is None:
            self.fail(OffloadError(f"{self.channel.host} sent a file to a job that staged "
                                   f"nothing", "protocol", True))
            return
        try:
            with self.as_caller():
                self.inbox.write(msg["name"], msg["mode"], msg["last"], msg.payload)
        except OSError as exc:
            self.cancel()
            self.fail(OffloadError(f"cannot write {os.fsdecode(msg['name'])}: {exc.strerror}",
                                   "stage", True))
            return
        self._consumed(len(msg.payload))

    def tick(self, now: float, timing: Timing) -> None:
        """Heartbeat the daemon; fail the job when the daemon has been silent too long, or
        never acknowledged it (then nothing ran, and the caller may safely run it elsewhere)."""
        if self.state.final:
            return
        self.waits.tick(now)
        if now - self.last_ping >= timing.heartbeat:
            self.last_ping = now
            self.channel.send(protocol.encode("ping", jobs=[self.id]))
        self.check_terminal()
        since = max(self.submitted, self.resumed)
        silent = now - max(self.channel.heard, since)
        unlisted = now - max(self.listed, since)
        if self.state == JobState.NEW and not self.heard_of and silent > timing.ack_timeout:
            self.cancel()   # no host ever acknowledged it: it never ran
            self.fail(OffloadError(f"{self.channel.host} did not acknowledge the job within "
                                   f"{timing.ack_timeout:g}s; it never ran", "no-ack", False))
        elif silent > timing.liveness:
            self.fail(OffloadError(f"lost contact with {self.host()} (silent for "
                                   f"{silent:.0f}s); the job may have run, its outcome is "
                                   f"unknown", "lost", True))
        elif unlisted > timing.liveness and self.stopped is None:
            self.cancel()
            self.fail(OffloadError(f"{self.host()} stopped reporting the job for "
                                   f"{unlisted:.0f}s; it may have run, its outcome is unknown",
                                   "lost", True))
        elif self.ending is not None and now - self.ending > SIGNAL_GRACE \
                and self.listed < self.ending:
            self.cancel()
            self.fail(OffloadError(f"{self.host()} did not answer within {SIGNAL_GRACE:g}s of "
                                   f"the signal; the job's outcome is unknown", "lost", True))

    def on_ping(self, msg: Message) -> None:
        """A host's heartbeat: does it still name this job?"""
        if self.id in msg.get("jobs", ()):
            self.listed = time.monotonic()
            self.heard_of = True   # it knows the job: the job may run

    def on_message(self, msg: Message) -> None:
        """A message from the daemon about this job; one that breaks the protocol (a kind
        not for a client, a step the job's state does not allow, output past its credit)
        fails this job alone, as one that may have run."""
        self.listed = time.monotonic()
        self.heard_of = True
        handler = getattr(self, "_on_" + msg.kind.replace("-", "_"), None)
        if self.state.final:
            return
        try:
            if handler is None or msg.kind not in FROM_HOST:
                raise IllegalTransition(f"a {msg.kind} message is not for a client")
            if self.state in (JobState.NEW, JobState.QUEUED) and msg.kind in BEFORE_START:
                raise IllegalTransition(f"{msg.kind} before the job started")
            if msg.kind in OUTPUT:
                self.received += len(msg.payload)
            handler(msg)
        except IllegalTransition as exc:
            self.cancel()
            self.fail(OffloadError(f"{self.host()} broke the protocol ({exc}); the job may "
                                   f"have run, its outcome is unknown", "protocol", True))

    def over_window(self) -> bool:
        """True while more output is held here than the credit this client granted: the loop
        then reads no more from the host until the caller's readers catch up (a host that
        ignores its credit cannot make the client's memory grow)."""
        return self.received - self.drained > protocol.WINDOW

    def _on_queued(self, msg: Message) -> None:
        """The job waits for a slot."""
        self.state = advance(self.state, "queued")
        self.waits.queued(time.monotonic(), msg["position"])
        self.debug(f"queued at position {msg['position']} on {self.channel.host}")

    def _on_started(self, msg: Message) -> None:
        """The job runs; stdin may flow."""
        self.state = advance(self.state, "started")
        self.waits.clear()   # before any output of the job
        self.credit = msg["window"]
        self.ran_on = msg["host"]   # through a broker: the host it chose
        self.debug(f"started on {msg['host']} as pid {msg['pid']}")
        if self._no_stdin() and not self.eof_sent:   # withheld or /dev/null: end of file
            self.eof_sent = True
            self.send("stdin-eof")
        if self.terminal is not None and self.terminal.foreground():
            self._raw(True)

    def _on_stdout(self, msg: Message) -> None:
        """Output for the caller's stdout."""
        self.sinks["stdout"].put(msg.payload)

    def _on_stderr(self, msg: Message) -> None:
        """Output for the caller's stderr."""
        self.sinks["stderr"].put(msg.payload)

    def _on_tty(self, msg: Message) -> None:
        """What the job's pty shows, for the caller's terminal."""
        sink = self.sinks.get("tty")
        if sink is None:
            self.fail(OffloadError(f"{self.channel.host} sent terminal output to a job "
                                   f"without a terminal", "protocol", True))
            return
        sink.put(msg.payload)

    def _on_credit(self, msg: Message) -> None:
        """Before the start: room for staged files; after: the daemon wrote stdin to the job."""
        if self.state == JobState.NEW and self.outbox is not None:
            self.stage_credit += msg["n"]
            self._send_files()
        else:
            self.credit += msg["n"]

    def _on_exit(self, msg: Message) -> None:
        """The job ended with a status."""
        self.state = advance(self.state, "exit")
        self._finish(Outcome(msg["status"], self.ran_on or self.channel.host, None,
                             _numbers(msg.get("timings", {})), _numbers(msg.get("rusage", {})),
                             msg.get("signal")))

    def _on_error(self, msg: Message) -> None:
        """The daemon refused or lost the job: it never ran only if the sender says so."""
        running = self.state not in (JobState.NEW, JobState.QUEUED)   # a host saying it never
        self.fail(OffloadError(f"{self.channel.host}: {msg['text']}", msg["kind"],   # ran
                               msg.get("started", True) or running))   # after started: a lie

    def fail(self, error: OffloadError) -> None:
        """End the job with an offload error (exit 255)."""
        if not self.state.final:
            self.state = advance(self.state, "error")
        self._finish(Outcome(255, self.channel.host, error))

    def _finish(self, outcome: Outcome) -> None:
        """Record the outcome once and let the sinks end after what they hold."""
        if self.outcome is None:
            self.outcome = outcome
            self.waits.clear()
            if self.terminal is not None:
                self._raw(False)
            if self.outbox is not None:
                self.outbox.close()
            if self.inbox is not None:
                self.inbox.discard()
            if not self.state.final:
                self.state = advance(self.state, "cancel")
            for sink in self.sinks.values():
                sink.end()

    def join(self) -> None:
        """Wait for the sinks to write everything they were given."""
        for sink in self.sinks.values():
            if sink.is_alive():
                sink.join()


def _numbers(fields: dict) -> dict:
    """The numeric entries of a host's timings or rusage (the rest is dropped: callers add
    and round them)."""
    return {k: v for k, v in fields.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _grow_pipe(fd: int | None) -> None:
    """Let a pipe hold a whole chunk, so one poll gives one full read of stdin and the stdout
    sink writes a chunk in one go, not in sixteen wake-ups of its reader (best effort: a user
    past fs.pipe-user-pages-soft keeps the size there is)."""
    try:
        if fd is not None and stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, protocol.CHUNK)
    except OSError:
        pass


def _readable_fd(fd: int, caller: int) -> bool:
    """True if ``fd`` is open and worth reading: not /dev/null (its end needs no message
    even), nor a terminal in whose background the ``caller`` is (reading it would stop us
    with SIGTTIN, or take another job's keys)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev != DEV_NULL and (not os.isatty(fd) or foreground(caller))
    return True
