"""The hand-off: ``offld`` gives its job to the mount's agent over a local Unix socket.

When an offloadfs mount is present (on PATH, else the first in mountinfo), ``offld`` connects to
that mount's agent instead of opening its own ZeroMQ connection: no zmq, no config and no
export to load, and no need to read the VM's CURVE key (the agent holds it). The kernel says
who is calling (``SO_PEERCRED``: pid, uid, gid; never the message), the caller's stdio travels
as fds (``SCM_RIGHTS``), and the agent runs the job exactly as a shim's (``listener.Listener``
makes the same ``request.ShimRequest`` a FUSE thread makes, cwd and environment from
/proc/PID, the same policy rules). Used by ``offld`` (one thread) and by the agent's listener
threads; the rules here are plain functions and classes, the socket calls thin helpers.

Wire format, version :data:`VERSION`. The socket is ``AF_UNIX``, ``SOCK_STREAM``, in the
abstract namespace, named by :func:`address` after the mount point. Every frame is::

    length   4 bytes, big-endian: the bytes that follow (1 .. MAX_FRAME)
    kind     1 byte: one of KINDS
    body     length - 1 bytes: a JSON object (UTF-8), its fields

offld to the agent:

    J  job        {"v": VERSION, "argv": [str, ...], "tty": "auto"|"force"|"never",
                   "quiet": bool}; exactly three fds ride on it (SCM_RIGHTS): the job's
                   stdin, stdout, stderr. argv items are the bytes decoded with
                   surrogateescape (``os.fsdecode``).
    C  continued  {} once offld runs again after a ``Z`` (fg, bg)

the agent to offld:

    Z  stop       {"signal": N}: the job stopped on the host; stop your process group so
                  (the shell shows it Stopped), then send ``C`` once continued
    E  end        {"status": int, "signal": int|null, "host": str, "ending": one of
                   request.Ending's values, "error": str ("" when it ran to its exit),
                   "timings": {str: number}, and optionally "log": str, the job log's line
                   for this job (``joblog.line``, made by the agent from the caller's cwd),
                   with "job_log": str, the file the mount's config names for it ("" for
                   the caller's default, $XDG_STATE_HOME's)}: the last frame; the agent
                   closes after it. Without "log" (a refusal before the job was read),
                   offld makes the line and finds the file itself.

A peer's bad input (a short or oversized frame, an unknown kind, bad JSON, missing or mistyped
fields, a wrong fd count) raises :class:`HandoffError` with one line; the agent answers it with
an ``E`` (``ending`` "never ran") and goes on serving others. Signals are not frames: ``offld``
blocks the forwarded ones while its job runs, so they stay pending in /proc/PID/status and the
agent forwards them as it does a waiting shim's.
"""
from __future__ import annotations

# The C halves of socket, signal, struct and json only: their Python modules (enum, re and
# what these import) cost offld about 20 ms of each start on a slow VM, more than its job
# (issue 16). Signals here are plain ints.
import _json
import _signal
import _socket
import _struct
import os

VERSION = 1
MAX_FRAME = 4 * 1024 * 1024    # an argv up to ARG_MAX (2 MiB) and its JSON escapes
JOB, CONTINUED, STOP, END = b"J", b"C", b"Z", b"E"
KINDS = frozenset({JOB, CONTINUED, STOP, END})
STDIO_FDS = 3
TTY_MODES = ("auto", "force", "never")
# request.Ending's values (offld must not import request: test_handoff checks they agree)
ENDINGS = ("exited", "never ran", "may have run", "cancelled")
PREFIX = b"\0offloadfs-handoff:"
MAX_ADDRESS = 107              # sun_path's 108 bytes, the abstract name's NUL included
# Signals a client relays to its job as they are, by name (``protocol.FORWARDED_SIGNALS``:
# the shim's traps, offld's handlers, and what offld blocks while the agent runs its job).
FORWARDED_SIGNALS = ("INT", "TERM", "HUP", "QUIT", "USR1", "USR2", "WINCH")
# ... and a stop (TSTP), handled apart: every signal a client gives its job (jobrun.FORWARDED).
RELAYED = tuple(getattr(_signal, "SIG" + name) for name in FORWARDED_SIGNALS + ("TSTP",))
JOB_CONTROL = (_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU)   # stops a caller mirrors
_HEADER = _struct.Struct(">I")
_CREDS = _struct.Struct("3i")    # struct ucred: pid, uid, gid


class HandoffError(Exception):
    """Bad input on the hand-off socket; the text is one line for a log or the caller."""


def address(mountpoint: str) -> bytes:
    """The abstract socket name of the agent of the mount at ``mountpoint``."""
    name = PREFIX + os.fsencode(mountpoint)
    if len(name) <= MAX_ADDRESS:
        return name
    import hashlib  # a very long mount point: its digest (rare, so imported here)
    return PREFIX + b"sha256:" + hashlib.sha256(os.fsencode(mountpoint)).hexdigest().encode()


def choose_mount(path: str, owners: dict[str, int | None], uid: int) -> str | None:
    """The mount whose agent takes the job of ``uid``: of the mounts in ``owners`` (mount
    point: the uid that mounted it) that root or ``uid`` mounted, the first on ``path`` (a
    PATH value), else the first; None without any. Another user's agent could not read the
    caller's /proc (so it would refuse the job); it is not asked."""
    mounts = [m for m, owner in owners.items() if owner in (0, uid)]
    for entry in path.split(":"):
        for mount in mounts:
            if entry and os.path.normpath(entry) == mount:
                return mount
    return mounts[0] if mounts else None


def reason_not(opts, command: list[str]) -> str | None:
    """Why this run of offld cannot be handed off (it takes its own ZeroMQ path), or None.
    The agent has the mount's hosts, settings and keys: a run that names its own (-c, -H,
    -L, $OFFLOADFS_CONFIG), stages files (-n), prints stages or debug lines the agent does
    not have (-p, -d) or names its program by a path cannot go through it."""
    if opts.config or os.environ.get("OFFLOADFS_CONFIG"):
        return "a config of its own"
    if opts.host or getattr(opts, "load_balancer", None):
        return "hosts of its own"
    if opts.no_mount:
        return "staging (-n)"
    if opts.profile or opts.debug or os.environ.get("OFFLOADFS_DEBUG") == "1":
        return "-p or -d"
    if "/" in command[0]:
        return "a command given by its path"
    return None


def _not_json(value):
    """The encoder's answer to a value JSON has no form for (json.dumps's TypeError)."""
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _Syntax:
    """What ``_json.make_scanner`` reads of a decoder: json.loads's defaults."""

    strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                      "-Infinity": float("-inf")}.__getitem__


_ENCODE = _json.make_encoder(None, _not_json, _json.encode_basestring_ascii, None, ":", ",",
                             False, False, True)
_SCAN = _json.make_scanner(_Syntax)
_BLANK = " \t\n\r"


def dumps(value) -> str:
    """``json.dumps(value, separators=(",", ":"))``, by json's own C encoder (test_handoff
    checks that they agree)."""
    return "".join(_ENCODE(value, 0))


def loads(text: str):
    """``json.loads(text)`` by json's own C scanner; ValueError if ``text`` is not one JSON
    value (json.JSONDecodeError, a ValueError, for an error inside it)."""
    start, end = len(text) - len(text.lstrip(_BLANK)), len(text.rstrip(_BLANK))
    try:
        value, stop = _SCAN(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value at char {exc.value}") from None
    if stop != end:
        raise ValueError(f"Extra data at char {stop}")
    return value


def encode(kind: bytes, **fields) -> bytes:
    """One frame: length, kind, the fields as JSON."""
    body = kind + dumps(fields).encode()
    if len(body) > MAX_FRAME:
        raise HandoffError(f"a {kind.decode()} frame of {len(body)} bytes is over "
                           f"{MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class Decoder:
    """Cuts a byte stream into (kind, fields) frames; one per connection, on its thread."""

    def __init__(self):
        """An empty buffer."""
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, dict]]:
        """The frames completed by ``data``; HandoffError on a bad one."""
        self.buffer += data
        frames = []
        while len(self.buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self.buffer)
            if not 1 <= length <= MAX_FRAME:
                raise HandoffError(f"a frame of {length} bytes (1 to {MAX_FRAME} allowed)")
            if len(self.buffer) < _HEADER.size + length:
                break
            body = bytes(self.buffer[_HEADER.size:_HEADER.size + length])
            del self.buffer[:_HEADER.size + length]
            frames.append(_frame(body))
        return frames


def _frame(body: bytes) -> tuple[bytes, dict]:
    """(kind, fields) of one frame's body, checked."""
    kind = body[:1]
    if kind not in KINDS:
        raise HandoffError(f"unknown frame kind {kind!r}")
    try:
        fields = loads(body[1:].decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoffError(f"a {kind.decode()} frame that is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise HandoffError(f"a {kind.decode()} frame whose body is not an object")
    return kind, fields


def _field(fields: dict, name: str, types, kind: str):
    """``fields[name]`` if it has the type ``types`` (a bool is no int here), else
    HandoffError."""
    value = fields.get(name)
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise HandoffError(f"a {kind} frame without a valid {name!r}")
    return value


class Job:
    """A checked ``J`` frame: the argv (bytes), the tty mode, quiet."""

    def __init__(self, fields: dict, nfds: int):
        """Check a job frame that came with ``nfds`` fds; HandoffError if it is bad."""
        version = fields.get("v")
        if version != VERSION:
            raise HandoffError(f"hand-off version {version!r}; this agent speaks {VERSION}")
        argv = _field(fields, "argv", list, "job")
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) \
                or not argv[0] or "/" in argv[0]:
            raise HandoffError("a job frame whose argv is not a command name and strings")
        self.argv = [os.fsencode(a) for a in argv]
        self.tty = _field(fields, "tty", str, "job")
        if self.tty not in TTY_MODES:
            raise HandoffError(f"a job frame with tty {self.tty!r}")
        self.quiet = _field(fields, "quiet", bool, "job")
        if nfds != STDIO_FDS:
            raise HandoffError(f"a job frame with {nfds} fds ({STDIO_FDS} expected)")

    @staticmethod
    def frame(argv: list[str], tty: str, quiet: bool) -> bytes:
        """The ``J`` frame offld sends (its fds go with it)."""
        return encode(JOB, v=VERSION, argv=argv, tty=tty, quiet=quiet)


class End:
    """A checked ``E`` frame: how the job ended, as offld reports it (``joblog.entry`` reads
    ``host``, ``status``, ``error``, ``timings``)."""

    def __init__(self, fields: dict):
        """Check an end frame; HandoffError if it is bad."""
        self.status = _field(fields, "status", int, "end")
        self.signal = fields.get("signal")
        if self.signal is not None and not isinstance(self.signal, int):
            raise HandoffError("an end frame with a signal that is not a number")
        self.host = _field(fields, "host", str, "end")
        self.ending = _field(fields, "ending", str, "end")
        if self.ending not in ENDINGS:
            raise HandoffError(f"an end frame with ending {self.ending!r}")
        self.error = _field(fields, "error", str, "end") or None
        timings = _field(fields, "timings", dict, "end")
        self.timings = {k: v for k, v in timings.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool)}
        self.log = _optional(fields, "log", "end")          # None: offld makes its own
        self.job_log = _optional(fields, "job_log", "end") or ""

    def __str__(self) -> str:
        """The error line (empty for a job that ran to its exit)."""
        return self.error or ""

    @staticmethod
    def frame(status: int, signum: int | None, host: str, ending: str, error: str,
              timings: dict, log: str | None = None, job_log: str = "") -> bytes:
        """The ``E`` frame the agent sends last (with the job log line, when it made one)."""
        extra = {} if log is None else {"log": log, "job_log": job_log}
        return encode(END, status=status, signal=signum, host=host, ending=ending,
                      error=error, timings=timings, **extra)


def _optional(fields: dict, name: str, kind: str) -> str | None:
    """``fields[name]``, a string, or None when absent; HandoffError if it is not a string."""
    if fields.get(name) is None:
        return None
    return _field(fields, name, str, kind)


def stop_signal(fields: dict) -> int:
    """The signal of a checked ``Z`` frame."""
    signum = _field(fields, "signal", int, "stop")
    if not 1 <= signum < 65:
        raise HandoffError(f"a stop frame with signal {signum}")
    return signum


# --- the socket calls, both sides --------------------------------------------------------------

def connect(address: bytes):
    """A connected stream socket to ``address`` (OSError if nobody listens there)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def peer(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it at
    connect (or listen) time."""
    return _CREDS.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CREDS.size))


def send(sock, frame: bytes, fds: tuple[int, ...] = ()) -> None:
    """Send one frame (with ``fds`` on its first byte)."""
    view = memoryview(frame)
    if fds:
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack(f"{len(fds)}i", *fds))]
        view = view[sock.sendmsg([view], ancillary):]
    if view:   # (an empty send to a peer that answered and closed would be EPIPE)
        sock.sendall(view)


class Reader:
    """Frames from one connection, with the fds that came with them; one thread reads."""

    MAX_FDS = 8   # room for more than expected, so that extra fds are seen (and closed)

    def __init__(self, sock):
        """Read from ``sock``."""
        self.sock, self.decoder, self.frames = sock, Decoder(), []
        self.fds: list[int] = []

    def next(self) -> tuple[bytes, dict] | None:
        """The next frame, None at the end of the stream; HandoffError on a bad one. fds
        received meanwhile are added to ``fds`` (the caller owns them)."""
        space = _socket.CMSG_SPACE(self.MAX_FDS * 4)
        while not self.frames:
            data, ancillary, flags, _ = self.sock.recvmsg(65536, space, _socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    self.fds += _struct.unpack(f"{usable // 4}i", payload[:usable])
            if flags & _socket.MSG_CTRUNC:
                raise HandoffError("more fds than a job has")
            if not data:
                if self.decoder.buffer:
                    raise HandoffError("the stream ended inside a frame")
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)


def suspend(signum: int) -> None:
    """Stop our process group as the job stopped (the shell shows it Stopped): with
    ``signum`` if it is a job-control stop, else SIGSTOP; returns once we are continued.
    offld does this for a job it drives itself and for one the agent drives."""
    if signum not in JOB_CONTROL:
        signum = _signal.SIGSTOP
    old = None if signum == _signal.SIGSTOP else _signal.signal(signum, _signal.SIG_DFL)
    if signum != _signal.SIGSTOP:
        _signal.sigtimedwait({signum}, 0)   # one still pending here (blocked) is the same stop
    unblocked = _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {signum})
    try:
        os.kill(0, signum)    # returns once we are continued
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, unblocked)
        if old is not None:
            _signal.signal(signum, old)
