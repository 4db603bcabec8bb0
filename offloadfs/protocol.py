"""The offloadfs wire protocol: one module, one version, shared by client, daemon and broker.

Transport: ZeroMQ. The client (``offld``, the mount's agent) holds a DEALER socket; the daemon
(``offloadd serve``) and the broker hold ROUTER sockets, so on their side every message is
preceded by the peer's routing identity frame, which this module never sees.

Frame layout of one message (ZeroMQ multipart)::

    frame 0   header   msgpack map  {"v": VERSION, "t": KIND, "job": JOB-ID?, ...fields}
    frame 1   payload  raw bytes    only for KIND in PAYLOAD_KINDS; never msgpack

Strings are msgpack str (UTF-8); argv, cwd and environment values are msgpack bin, because
Unix paths and arguments are bytes, and bytes stay bytes. Every header carries the protocol
version; a peer speaking another version gets an ``error`` of kind ``version``.

Messages, by stage (C = client, D = daemon or broker on the client's behalf)::

    C->D hello        {}                                    ask who is there
    D->C welcome      {host, commands, slots, tags, busy, queued, features[str]?}
                      (``features``: what this daemon takes beyond the kinds below, e.g.
                      ``stdin-null``; a client uses one only when its peer names it)
    C->D submit       job, argv[bin], cwd bin, uid, gid, groups[int], env{bin:bin},
                      window int (output credit granted up front), tags[str]?, data map?,
                      vm str? (only broker->host: the z85 CURVE key the broker authenticated
                      the client by; a daemon ignores it from anyone but its brokers),
                      tty map? (the job gets a pseudo-terminal, see "Terminals" below),
                      stdin_null bool? (feature ``stdin-null``: the job's stdin is /dev/null
                      on the host; the client sends no stdin and no stdin-eof)
    D->C queued       job, position int (1 = next to start)
    D->C started      job, host str, pid int, window int (stdin credit granted up front)
    C->D file         job, name bin, mode int, last bool + payload   staging (-n): an input
                      file's next chunk, before the job starts (spends stage credit)
    D->C file         the same for a file the job created or changed (spends output credit)
    C->D stdin        job + payload                        (spends stdin credit)
    C->D stdin-eof    job
    D->C stdout       job + payload                        (spends output credit)
    D->C stderr       job + payload                        (spends output credit)
    D->C tty          job + payload   what the job's pty shows (echo included; spends output
                      credit); the client writes it to the caller's terminal
    *->* credit       job, n int                           grant n more bytes of the peer's stream
    C->D close        job, stream "stdout"|"stderr"        the reader went away (EPIPE)
    C->D signal       job, signum int
    C->D cancel       job                                  the client gives up on the job
                      (a host answers a broker's with ``error`` kind ``cancelled``: the
                      job is gone and its slot free)
    C->D resize       job, rows, cols, xpixel, ypixel      the caller's window changed
    D->C stopped      job, signal int    the job stopped on the host (Ctrl-Z, SIGTTIN, ...)
    C->D suspend      job                the client stops itself now: its silence is no death
                      (until resume, at most the host's [serve] suspend_limit)
    C->D resume       job, foreground bool                 the client runs again: continue
                      the job, in the fore- or background of its pty (also sent when the
                      caller alone moved between fore- and background)
    D->C exit         job, status int, signal int|nil, rusage map, timings map
    D->C error        job?, kind str, text str, started bool? (about a job: whether it may
                      have started; false only when the sender knows it never did, e.g. a
                      refusal before any spawn; absent: the client assumes it may have)
    *->* ping         jobs[str]                            heartbeat; lists the sender's live jobs
    H->B ready        {host, commands, slots, tags}       a host offers itself to a broker
                      (H = a daemon's DEALER to a broker B; B forwards jobs to H as a client
                      would, with job ids of its own, and relays H's replies to the client)
    B->H error        job?, kind, text     a broker refuses a host's ready (``ready``), asks
                      it to announce itself again (``reannounce``), or refuses its bad input
    C->D status       {}
    D->C status-reply {host, slots, busy, queued, commands, tags, jobs[map], done, failed}

As data: ``SCHEMA`` (each kind's job id and fields), ``ROUTES`` (the roles CLIENT, HOST and
BROKER that may send and receive each kind; ``SENDERS``, ``RECEIVERS``, ``may_send``,
``sent_by``, ``accepted_by``, and ``dispatch_check`` for a handler table), ``ERROR_KINDS``
(each ``error.kind``: its meaning, and whether its job ran; ``may_have_run``), and
``check_data`` (the rules of a submit's ``data``).

Staging (``data`` = {"mode": "stage", "bytes": total}): the daemon answers the submit with a
``credit`` for the input files, which come as ``file`` messages; the job runs in a scratch
directory once the last one is in; after it ends, every file it created or changed comes back
as ``file`` messages before ``exit``, and the client writes each one atomically.

Terminals: a submit's ``tty`` = {fds int (bit 0, 1, 2: the job's stdin, stdout, stderr are the
pty; others stay pipes), rows, cols, xpixel, ypixel, iflag, oflag, cflag, lflag, ispeed,
ospeed, cc bin (the caller's termios), foreground bool}. The host runs the job in a new
session whose controlling terminal is a new pty with those settings; its output comes as
``tty``, stdin (when bit 0 is set) goes to the pty; the job's process group is the pty's
foreground group while ``foreground``, so ^C, ^Z and ^\\ typed on the caller's (raw) terminal
become signals there, and a job in the background that reads the terminal stops (SIGTTIN).

Flow control is credit based: a sender never has more than the granted number of payload bytes
in flight per stream, so memory stays bounded whatever the producer's speed.

Every malformed input raises a subclass of :class:`ProtocolError`; nothing here asserts.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable
from typing import Any

import msgpack

VERSION = 1

MAX_HEADER = 4 * 1024 * 1024       # bytes in frame 0
MAX_PAYLOAD = 1024 * 1024          # bytes in frame 1
MAX_FRAMES = 2
MAX_ARGV_BYTES = 2 * 1024 * 1024   # sum of argv lengths, like Linux ARG_MAX
MAX_ARGS = 65536
MAX_ENV_BYTES = 256 * 1024
MAX_ENV_ITEMS = 4096
MAX_GROUPS = 1024
MAX_TEXT = 64 * 1024
CHUNK = 1024 * 1024                # payload size senders use for stream data (at most)
WINDOW = 8 * 1024 * 1024           # default credit window per stream
CREDIT_BATCH = WINDOW // 8         # receivers return credit in batches of at least this

JOB_ID_MAX = 64
# Stage timings, in the order a job goes through them: exit carries queue, attach, run, drain
# (the daemon's); the client adds start (its own process start-up), connect and total.
STAGES = ("start", "connect", "queue", "attach", "run", "drain", "total")
STREAMS = ("stdout", "stderr", "tty")
PAYLOAD_KINDS = frozenset({"stdin", "stdout", "stderr", "tty", "file"})
TTY_STDIN, TTY_STDOUT, TTY_STDERR = 1, 2, 4   # bits of a tty's ``fds``
# A submit's ``data.mode``: how the host reaches the caller's files (no ``data``: the host sees
# the caller's cwd at the same path, e.g. a shared NFS tree).
DATA_STAGE = "stage"   # the files travel as ``file`` messages, the job runs in a scratch dir
DATA_NFS = "nfs"       # the host mounts the caller's export (server, export, path, nonce)
DATA_MODES = (DATA_STAGE, DATA_NFS)
# What a daemon's welcome may name in ``features`` (a client uses one only if named there).
STDIN_NULL = "stdin-null"   # a submit's ``stdin_null``: the job's stdin is /dev/null
MAX_STAGE_BYTES = 2**40   # a staged job's announced input (``data.bytes``)
# Signals a client relays to its job as they are (by name, as ``kill -l`` and ``trap`` spell
# them); a stop (TSTP) is relayed too but handled apart, see "Terminals".
# (Defined in ``handoff``, which offld's fast path imports without this module.)
from .handoff import FORWARDED_SIGNALS  # noqa: E402, F401


class ProtocolError(Exception):
    """Bad input from the wire; ``kind`` names the class of fault for the ``error`` reply."""

    kind = "protocol"

    def __init_subclass__(cls, kind: str = "", **kw):
        """A subclass names its ``error`` kind as ``class X(ProtocolError, kind="x")``."""
        super().__init_subclass__(**kw)
        cls.kind = kind or cls.kind


class FrameError(ProtocolError, kind="frame"):
    """Wrong number or size of frames."""


class DecodeError(ProtocolError, kind="decode"):
    """Frame 0 is not a msgpack map."""


class VersionError(ProtocolError, kind="version"):
    """The peer speaks another protocol version."""


class KindError(ProtocolError, kind="kind"):
    """Unknown message kind."""


class FieldError(ProtocolError, kind="field"):
    """A field is missing, of the wrong type, or out of range."""


class TooLarge(ProtocolError, kind="too-large"):
    """A size limit was exceeded."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One decoded message: its kind, job id (or None), fields, and payload (or None); from a
    relay's decode also its ``header`` as received."""

    kind: str
    job: str | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    payload: bytes | None = None
    # a relay's decode (``decode(frames, reads)``): the whole header map as it came, to pass on
    header: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __getitem__(self, name: str) -> Any:
        """Return field ``name``."""
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        """Return field ``name`` or ``default``."""
        return self.fields.get(name, default)


# --- field checkers: each returns the value or raises FieldError ------------------------------

def _is_int(v: Any) -> bool:
    """True for a msgpack integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: int):
    """Checker for an integer in [lo, hi]."""
    def check(v: Any) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            raise FieldError(f"expected an integer in [{lo}, {hi}], got {_show(v)}")
        return v
    return check


def _str(max_len: int = MAX_TEXT):
    """Checker for a str of bounded length."""
    def check(v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_len:
            raise FieldError(f"expected a string of at most {max_len} chars, got {_show(v)}")
        return v
    return check


def _bin(max_len: int):
    """Checker for bytes of bounded length."""
    def check(v: Any) -> bytes:
        if not isinstance(v, bytes) or len(v) > max_len:
            raise FieldError(f"expected bytes of at most {max_len}, got {_show(v)}")
        return v
    return check


def _opt(checker):
    """Checker that also accepts None."""
    def check(v: Any) -> Any:
        return None if v is None else checker(v)
    return check


def _list(item, max_items: int):
    """Checker for a list of items, each passing ``item``."""
    def check(v: Any) -> list:
        if not isinstance(v, (list, tuple)) or len(v) > max_items:
            raise FieldError(f"expected a list of at most {max_items} items, got {_show(v)}")
        return [item(x) for x in v]
    return check


def _map(key, value, max_items: int):
    """Checker for a map with checked keys and values."""
    def check(v: Any) -> dict:
        if not isinstance(v, dict) or len(v) > max_items:
            raise FieldError(f"expected a map of at most {max_items} entries, got {_show(v)}")
        return {key(k): value(x) for k, x in v.items()}
    return check


def _number(v: Any) -> float:
    """Checker for an int or float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(f"expected a number, got {_show(v)}")
    return v


def _argv(v: Any) -> list[bytes]:
    """Checker for argv: 1..MAX_ARGS byte strings, total under MAX_ARGV_BYTES, no NUL."""
    args = _ARGS(v)
    if not args:
        raise FieldError("argv is empty")
    if sum(map(len, args)) > MAX_ARGV_BYTES:
        raise TooLarge(f"argv is larger than {MAX_ARGV_BYTES} bytes")
    if any(b"\0" in a for a in args) or not args[0]:
        raise FieldError("argv holds a NUL byte or an empty command name")
    return args


def _env(v: Any) -> dict[bytes, bytes]:
    """Checker for the environment: bytes to bytes, bounded, names without '=' or NUL
    (:func:`_env_fine` first; the check item by item names what is wrong)."""
    if _env_fine(v):
        return v
    env = _ENV_MAP(v)
    if sum(len(k) + len(x) for k, x in env.items()) > MAX_ENV_BYTES:
        raise TooLarge(f"environment is larger than {MAX_ENV_BYTES} bytes")
    if any(not k or b"=" in k or b"\0" in k or b"\0" in x for k, x in env.items()):
        raise FieldError("environment holds an empty name, '=' in a name, or a NUL byte")
    return env


def _env_fine(v: Any) -> bool:
    """True if ``v`` keeps every rule of :func:`_env`, checked a whole map at a time (the
    check item by item was most of the cost of decoding a submit)."""
    if type(v) is not dict or len(v) > MAX_ENV_ITEMS or not set(map(type, v)) <= _BYTES \
            or not set(map(type, v.values())) <= _BYTES:
        return False
    names, values = b"".join(v), b"".join(v.values())
    return (len(names) + len(values) <= MAX_ENV_BYTES and b"=" not in names and
            b"\0" not in names and b"\0" not in values and (not v or min(map(len, v)) > 0))


def _path(v: Any) -> bytes:
    """Checker for an absolute path as bytes without NUL."""
    p = _bin(4096)(v)
    if not p.startswith(b"/") or b"\0" in p:
        raise FieldError("cwd must be an absolute path without NUL bytes")
    return p


def _bool(v: Any) -> bool:
    """Checker for a bool."""
    if not isinstance(v, bool):
        raise FieldError(f"expected a bool, got {_show(v)}")
    return v


def _relpath(v: Any) -> bytes:
    """Checker for a relative path below a directory: no leading /, no '..', no NUL."""
    p = _bin(4096)(v)
    parts = p.split(b"/")
    if not p or p.startswith(b"/") or b"\0" in p or any(x in (b"", b".", b"..") for x in parts):
        raise FieldError(f"{_show(v)} is not a plain relative path")
    return p


def _stream(v: Any) -> str:
    """Checker for an output stream name."""
    if v not in STREAMS:
        raise FieldError(f"stream must be one of {STREAMS}, got {_show(v)}")
    return v


def _any_map(v: Any) -> dict:
    """Checker for a small map of str to plain values (timings, rusage, data descriptors)."""
    return _SCALAR_MAP(v)


def _plain(v: Any) -> Any:
    """Checker for a value that is not a container (nor an extension)."""
    return v if isinstance(v, _PLAIN) else _bad(v)


def _bad(v: Any):
    """Raise FieldError for a value that may not be nested."""
    raise FieldError(f"unexpected value {_show(v)}")


def _show(v: Any) -> str:
    """A short, safe description of a bad value for error texts."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _tty(v: Any) -> dict:
    """Checker for a submit's terminal: which fds, window size, termios, foreground."""
    if not isinstance(v, dict):
        raise FieldError(f"expected a map, got {_show(v)}")
    required = {"fds": _int(1, 7), "rows": _int(0, 65535), "cols": _int(0, 65535),
                "foreground": _bool}
    optional = {"xpixel": _int(0, 65535), "ypixel": _int(0, 65535),
                "iflag": _int(0, 2**32 - 1), "oflag": _int(0, 2**32 - 1),
                "cflag": _int(0, 2**32 - 1), "lflag": _int(0, 2**32 - 1),
                "ispeed": _int(0, 2**32 - 1), "ospeed": _int(0, 2**32 - 1), "cc": _bin(64)}
    return _fields(v, required, optional)


_PLAIN = (int, float, str, bytes, bool, type(None))
_SCALAR_MAP = _map(_str(256), _plain, 256)
_ARGS = _list(_bin(MAX_ARGV_BYTES), MAX_ARGS)
_ENV_MAP = _map(_bin(MAX_ENV_BYTES), _bin(MAX_ENV_BYTES), MAX_ENV_ITEMS)
_BYTES = {bytes}
_WINSIZE = {"rows": _int(0, 65535), "cols": _int(0, 65535), "xpixel": _int(0, 65535),
            "ypixel": _int(0, 65535)}
_ID = _int(0, 2**32 - 1)
_JOB = _str(JOB_ID_MAX)
_POS = _int(0, 2**31)
_TAGS = _list(_str(64), 64)
_CMDS = _list(_str(255), 4096)

# kind -> (needs a job id, required fields, optional fields)
SCHEMA: dict[str, tuple[bool, dict, dict]] = {
    "hello": (False, {}, {}),
    "welcome": (False, {"host": _str(255), "commands": _CMDS, "slots": _POS},
                {"tags": _TAGS, "busy": _POS, "queued": _POS, "features": _TAGS}),
    "submit": (True, {"argv": _argv, "cwd": _path, "uid": _ID, "gid": _ID,
                      "groups": _list(_ID, MAX_GROUPS), "env": _env, "window": _int(1, 2**30)},
               {"tags": _TAGS, "data": _opt(_any_map), "vm": _str(40), "tty": _tty,
                "stdin_null": _bool}),
    "queued": (True, {"position": _POS}, {}),
    "started": (True, {"host": _str(255), "pid": _int(0, 2**31), "window": _int(0, 2**30)}, {}),
    "file": (True, {"name": _relpath, "mode": _int(0, 0o7777), "last": _bool}, {}),
    "stdin": (True, {}, {}),
    "stdin-eof": (True, {}, {}),
    "stdout": (True, {}, {}),
    "stderr": (True, {}, {}),
    "tty": (True, {}, {}),
    "credit": (True, {"n": _int(0, 2**30)}, {}),
    "close": (True, {"stream": _stream}, {}),
    "signal": (True, {"signum": _int(1, 64)}, {}),
    "cancel": (True, {}, {}),
    "resize": (True, _WINSIZE, {}),
    "stopped": (True, {"signal": _int(1, 64)}, {}),
    "suspend": (True, {}, {}),
    "resume": (True, {"foreground": _bool}, {}),
    "exit": (True, {"status": _int(0, 255)},
             {"signal": _opt(_int(1, 64)), "rusage": _any_map, "timings": _any_map}),
    "error": (False, {"kind": _str(64), "text": _str()}, {"started": _bool}),
    "ping": (False, {}, {"jobs": _list(_JOB, 65536)}),
    "ready": (False, {"host": _str(255), "commands": _CMDS, "slots": _POS}, {"tags": _TAGS}),
    "status": (False, {}, {}),
    "status-reply": (False, {"host": _str(255), "slots": _POS, "busy": _POS, "queued": _POS},
                     {"commands": _CMDS, "tags": _TAGS, "jobs": _list(_any_map, 1024),
                      "done": _POS, "failed": _POS}),
}
NEEDS_JOB = frozenset(k for k, (needs_job, _, _) in SCHEMA.items() if needs_job)   # carry a job


_SERVER = re.compile(r"[A-Za-z0-9_.%\[:][A-Za-z0-9_.%\[\]:-]*:[0-9]{1,5}")   # host:port, no "-o"


def check_data(data: dict | None) -> None:
    """Raise FieldError for a submit's data descriptor (None: none) of an unknown mode or with a
    field of the wrong type (the mount of an nfs job gets its server and export as arguments)."""
    data = data or {}
    mode, n = data.get("mode"), data.get("bytes", 0)
    if mode == DATA_STAGE:
        ok = type(n) is int and 0 <= n <= MAX_STAGE_BYTES
    elif mode == DATA_NFS:
        server, export = data.get("server"), data.get("export")
        ok = isinstance(server, str) and bool(_SERVER.fullmatch(server)) and \
            isinstance(export, str) and export.startswith("/") and \
            all(isinstance(data.get(k, ""), str) for k in ("path", "nonce"))
    else:
        ok = mode is None
    if not ok:
        raise FieldError(f"bad data descriptor {repr(data)[:80]}")


# --- who sends what ---------------------------------------------------------------------------

# Roles: the client (``offld``, the mount's agent), the host (``offloadd serve``), the broker
# (``offloadd broker``: a host to its clients, a client to its hosts; a host's link to it says
# ``ready``). Two peers of one role never talk to each other.
CLIENT, HOST, BROKER = "client", "host", "broker"
ROLES = frozenset({CLIENT, HOST, BROKER})
_C_TO_D = (frozenset({CLIENT, BROKER}), frozenset({HOST, BROKER}))
_D_TO_C = (frozenset({HOST, BROKER}), frozenset({CLIENT, BROKER}))
_ANY = (ROLES, ROLES)

# kind -> (the roles that may send it, the roles that may receive it)
ROUTES: dict[str, tuple[frozenset, frozenset]] = {
    "hello": (frozenset({CLIENT}), frozenset({HOST, BROKER})),
    "welcome": (frozenset({HOST, BROKER}), frozenset({CLIENT})),
    "submit": _C_TO_D,
    "queued": _D_TO_C,
    "started": _D_TO_C,
    "file": _ANY,
    "stdin": _C_TO_D,
    "stdin-eof": _C_TO_D,
    "stdout": _D_TO_C,
    "stderr": _D_TO_C,
    "tty": _D_TO_C,
    "credit": _ANY,
    "close": _C_TO_D,
    "signal": _C_TO_D,
    "cancel": _C_TO_D,
    "resize": _C_TO_D,
    "stopped": _D_TO_C,
    "suspend": _C_TO_D,
    "resume": _C_TO_D,
    "exit": _D_TO_C,
    "error": (frozenset({HOST, BROKER}), ROLES),
    "ping": _ANY,
    "ready": (frozenset({HOST}), frozenset({BROKER})),
    "status": (frozenset({CLIENT}), frozenset({HOST, BROKER})),
    "status-reply": (frozenset({HOST, BROKER}), frozenset({CLIENT})),
}
SENDERS = {kind: senders for kind, (senders, _) in ROUTES.items()}
RECEIVERS = {kind: receivers for kind, (_, receivers) in ROUTES.items()}


def may_send(role: str, kind: str, to: str | None = None) -> bool:
    """Whether ``role`` may send a message of ``kind`` (to a peer of role ``to``, if given)."""
    senders, receivers = ROUTES.get(kind, ((), ()))
    return role in senders and (to is None or (to in receivers and to != role))


def sent_by(role: str, to: str | None = None) -> frozenset:
    """The kinds ``role`` may send (to a peer of role ``to``, if given)."""
    return frozenset(k for k in ROUTES if may_send(role, k, to))


def accepted_by(role: str, sender: str | None = None) -> frozenset:
    """The kinds ``role`` may receive (from a peer of role ``sender``, if given)."""
    return frozenset(k for k, (senders, receivers) in ROUTES.items() if role in receivers
                     and any(s != role for s in senders if sender in (None, s)))


def dispatch_check(role: str, handled: Iterable[str],
                   sender: str | None = None) -> tuple[frozenset, frozenset]:
    """A handler table's faults: (the kinds ``role`` may receive, from ``sender`` if given, but
    does not handle; the kinds it handles but may never receive)."""
    accepted, handled = accepted_by(role, sender), frozenset(handled)
    return accepted - handled, handled - accepted


def encode(kind: str, job: str | None = None, payload: bytes | None = None, /,
           **fields) -> list:
    """Encode one message as a list of frames, checking it against the schema."""
    header = {"v": VERSION, "t": kind, **fields}
    if job is not None:
        header["job"] = job
    decode_header(header, payload)
    frame0 = msgpack.packb(header, use_bin_type=True)
    return [frame0] if payload is None else [frame0, payload]


def pack(kind: str, job: str | None, payload, fields: dict) -> list:
    """The frames of a message whose fields are known good, as :func:`encode` makes them but
    without its check: a relay passing on what it decoded (``fields``: a decoded message's
    fields, or the ``header`` of a relay's decode, whose receiver checks it)."""
    header = {"v": VERSION, "t": kind, **fields}
    if job is None:
        header.pop("job", None)
    else:
        header["job"] = job
    frame0 = msgpack.packb(header, use_bin_type=True)
    return [frame0] if payload is None else [frame0, payload]


def decode(frames: list, reads: dict[str, tuple[str, ...]] | None = None) -> Message:
    """Decode the frames of one message (without routing identity), or raise ProtocolError.
    ``reads`` makes it a relay's decode (the broker's, of what a host sends): the frames, the
    version, the kind, the job id and the payload are checked as always, but of a kind in
    ``reads`` only the fields named there (those the relay reads; the others are its
    receiver's to check); the message's ``header`` keeps the whole map to pass on."""
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise FrameError(f"expected 1 or 2 frames, got {len(frames)}")
    header = bytes(frames[0])
    if len(header) > MAX_HEADER:
        raise TooLarge(f"header frame of {len(header)} bytes exceeds {MAX_HEADER}")
    payload = _view(frames[1]) if len(frames) == 2 else None
    return decode_header(_unpack(header), payload, reads)


def _view(frame) -> bytes | memoryview:
    """A payload frame as bytes-like, without copying it (a stream chunk is up to 1 MiB: a
    copy per hop was the largest cost of streaming)."""
    return frame if isinstance(frame, bytes) else memoryview(frame).cast("B")


def _unpack(frame: bytes) -> dict:
    """Unpack frame 0 into a dict, with bounded cost, or raise DecodeError. The timestamp
    extension's type byte is 0xff: a frame without that byte cannot hold one and is unpacked
    without the hooks that look for it in every list and map (most of the cost of a small
    header)."""
    hooks = {"list_hook": _no_timestamp, "object_hook": _no_timestamp} if b"\xff" in frame \
        else {}
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                 **hooks)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as exc:
        raise DecodeError(f"frame 0 is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise DecodeError(f"frame 0 is not a map but {type(header).__name__}")
    return header


def _no_ext(code: int, data: bytes):
    """Reject msgpack extension types."""
    raise ValueError(f"extension type {code}")


def _no_timestamp(container):
    """Reject the timestamp extension (type -1), which msgpack decodes without ``ext_hook``."""
    values = container.values() if isinstance(container, dict) else container
    if any(isinstance(x, msgpack.Timestamp) for x in values):
        raise ValueError("extension type -1")
    return container


def decode_header(header: dict, payload: bytes | None,
                  reads: dict[str, tuple[str, ...]] | None = None) -> Message:
    """Check a header map and payload against the schema (of a kind in ``reads``: only the
    fields named there, see :func:`decode`); return the Message."""
    version = header.get("v")
    if not _is_int(version) or version != VERSION:
        raise VersionError(f"protocol version {_show(version)} is not {VERSION}")
    kind = header.get("t")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise KindError(f"unknown message kind {_show(kind)}")
    needs_job, required, optional = SCHEMA[kind]
    _check_payload(kind, payload)
    job = _job_of(header, needs_job)
    if reads is not None and kind in reads:
        required, optional = _relay_schema(kind, reads[kind])
        return Message(kind, job, _fields(header, required, optional), payload, header)
    return Message(kind, job, _fields(header, required, optional), payload)


@functools.cache
def _relay_schema(kind: str, names: tuple[str, ...]) -> tuple[dict, dict]:
    """The required and optional checkers of ``kind`` limited to the fields ``names``."""
    _, required, optional = SCHEMA[kind]
    return ({k: c for k, c in required.items() if k in names},
            {k: c for k, c in optional.items() if k in names})


def _check_payload(kind: str, payload: bytes | None) -> None:
    """Payload frames go with stream kinds only and are bounded."""
    if (payload is not None) != (kind in PAYLOAD_KINDS):
        raise FrameError(f"{kind} {'needs' if kind in PAYLOAD_KINDS else 'takes no'} payload")
    if payload is not None and len(payload) > MAX_PAYLOAD:
        raise TooLarge(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")


def _job_of(header: dict, needs_job: bool) -> str | None:
    """The job id of a header, required or absent as the kind says."""
    job = header.get("job")
    if job is None:
        if needs_job:
            raise FieldError("missing job id")
        return None
    if not isinstance(job, str) or not 0 < len(job) <= JOB_ID_MAX:
        raise FieldError(f"bad job id {_show(job)}")
    return job


def _fields(header: dict, required: dict, optional: dict) -> dict:
    """Check required and optional fields; unknown fields are dropped (forward compatible)."""
    out = {}
    for name, check in required.items():
        if name not in header:
            raise FieldError(f"missing field {name!r}")
        out[name] = _checked(name, check, header[name])
    for name, check in optional.items():
        if name in header:
            out[name] = _checked(name, check, header[name])
    return out


def _checked(name: str, check, value: Any) -> Any:
    """Run one checker, naming the field in the error."""
    try:
        return check(value)
    except FieldError as exc:
        raise FieldError(f"field {name!r}: {exc}") from None


def error_frames(exc: ProtocolError, job: str | None = None) -> list:
    """The frames of an ``error`` reply describing ``exc``."""
    return encode("error", job, kind=exc.kind, text=str(exc)[:MAX_TEXT])


# --- error kinds --------------------------------------------------------------------------------

# What an ``error`` of a kind says of its job: it never ran, it may have, the sender says which
# (its ``started`` field: it knows whether a process was spawned), or it is not about a job.
NEVER, MAY, EITHER, NA = "never", "may have", "started says", "n.a."


@dataclasses.dataclass(frozen=True)
class ErrorKind:
    """One ``error.kind``: what it means, whether its job ran, and whether it goes on the wire
    (``wire=False``: only the kind of a client's own OffloadError)."""

    meaning: str
    ran: str
    wire: bool = True


ERROR_KINDS: dict[str, ErrorKind] = {
    # bad input (ProtocolError kinds), answered without a job id
    "protocol": ErrorKind("the peer broke the protocol (a bad message, or one that its job's "
                          "state does not allow)", EITHER),
    "frame": ErrorKind("wrong number or size of frames", NA),
    "decode": ErrorKind("frame 0 is not a msgpack map", NA),
    "version": ErrorKind("another protocol version", NA),
    "kind": ErrorKind("an unknown kind, or one not for the receiver (about a job: it may "
                      "have run)", MAY),
    "field": ErrorKind("a field missing, mistyped or out of range; a bad data descriptor "
                       "(never ran), a signal the host lacks", EITHER),
    "too-large": ErrorKind("a size limit was exceeded", NA),
    # a submit refused (policy.Refused, the broker's checks): nothing ran
    "not-allowed": ErrorKind("the command is not allowlisted on the host", NEVER),
    "identity": ErrorKind("the uid, groups or export claimed are refused", NEVER),
    "root": ErrorKind("jobs as root are refused on the host", NEVER),
    "unauthorized": ErrorKind("the VM's key is not (or no longer) authorized", NEVER),
    "loop": ErrorKind("the command lies in an offloadfs mount on the host", NEVER),
    "busy": ErrorKind("the peer's or the host's job budget is full", NEVER),
    "cwd": ErrorKind("the working directory is missing or leaves the export", NEVER),
    "attach": ErrorKind("the caller's export could not be mounted, or is not the caller's", NEVER),
    "spawn": ErrorKind("the command could not be started", NEVER),
    "no-host": ErrorKind("no host answered, or none can run the job", NEVER),
    # about a job that is there, or was
    "duplicate": ErrorKind("a submit of a job id already known (the error names that job)", MAY),
    "unknown-job": ErrorKind("the receiver has no such job: it ended, or the receiver "
                             "restarted", MAY),
    "stage": ErrorKind("staging files in or out failed", EITHER),
    "credit": ErrorKind("the client sent more stdin than its credit", MAY),
    "limit": ErrorKind("the job's output passed the host's limit: it was killed", MAY),
    "internal": ErrorKind("a bug in handling one message or job", EITHER),
    "shutdown": ErrorKind("the daemon, broker or mount stopped", EITHER),
    "host-lost": ErrorKind("the broker lost the host that ran the job", MAY),
    # between a broker and its hosts
    "ready": ErrorKind("the broker refused a host's ready", NA),
    "reannounce": ErrorKind("the broker does not know this host: say ready again", NA),
    # the client's own (OffloadError), never sent
    "offload": ErrorKind("an offload error of no other kind", EITHER, wire=False),
    "handshake": ErrorKind("the CURVE handshake failed", NEVER, wire=False),
    "export": ErrorKind("the caller's tree cannot be exported", NEVER, wire=False),
    "no-ack": ErrorKind("no host acknowledged the submit", NEVER, wire=False),
    "lost": ErrorKind("the host went silent, or stopped naming the job", MAY, wire=False),
    "cancelled": ErrorKind("the caller went away or gave up (on the wire: a host tells "
                           "the broker that a job it cancelled is gone)", MAY),
}


def may_have_run(msg: Message, running: bool = False) -> bool:
    """For an ``error`` about a job: whether the job may have run. Its ``started`` field
    says; absent, it may have; ``running`` (the receiver saw it start) overrides a false."""
    return bool(msg.get("started", True)) or running
