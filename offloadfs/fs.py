"""The FUSE filesystem of shims (fusebinding: mfusepy or fusepy, ``raw_fi`` mode).

libfuse calls these methods on its worker threads. Every answer comes from memory (the
:class:`~offloadfs.registry.Registry` and the shim text); no callback waits on the network.
The one callback that blocks is the read of a shim's *control open* (its own file opened
read-write): that read is the shim waiting for its job, and it returns the reply line once the
agent (another thread) has decided. Errors are raised as FuseOSError with a specific errno.
"""
from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time

from . import mountinfo, shim
from . import registry as reg
from . import request as rules
from .agent import Agent
from .caller import Caller, CallerGone
from .fusebinding import FuseOSError, Operations, fuse_get_context, loop_ended_probe
from .request import ShimRequest

log = logging.getLogger("offloadfs")

MAX_ARGS = 2 * 1024 * 1024   # bytes a shim may write as its arguments (like ARG_MAX)
XATTR_STATUS = "user.offload.status"
CTL_DIR = "/" + shim.CTL


class Session:
    """A shim's control open: the caller, its stdio, the arguments it wrote, then its reply.

    The caller's fds 0-2 are captured at open time: later the shim's ``read <&3`` points its
    fd 0 at the control file itself for the length of the read."""

    def __init__(self, name: str, pid: int, dev: int):
        """A session for shim ``name`` opened by ``pid``; ``dev`` is this filesystem's device."""
        self.stamps = {"open": time.monotonic_ns()}   # its moments (ShimRequest.stamp)
        self.name = name
        self.args = bytearray()
        self.out = bytearray()        # the reply lines so far
        self.ended = False            # the last line is in ``out``
        self.request: ShimRequest | None = None
        self.pos = 0
        self.lock = threading.Lock()
        self.stdio: tuple[int, int, int] | None = None
        try:
            self.caller: Caller | None = Caller(pid)
            self.stdio = _outside(self.caller.stdio(), dev)
        except CallerGone:
            self.caller = None
        self.stamps["opened"] = time.monotonic_ns()

    def take_stdio(self) -> tuple[int, int, int] | None:
        """Hand the captured fds over (the taker closes them)."""
        stdio, self.stdio = self.stdio, None
        return stdio

    def close(self) -> None:
        """Close captured fds nobody took."""
        for fd in self.take_stdio() or ():
            os.close(fd)


class OpCounts:
    """How many FUSE callbacks of each kind ran and the time they took in here (any FUSE
    thread adds; the mount's status shows them)."""

    def __init__(self):
        """No calls yet."""
        self.lock = threading.Lock()
        self.counts: dict[str, list[int]] = {}

    def add(self, op: str, ns: int) -> None:
        """One call of ``op`` that took ``ns``."""
        with self.lock:
            entry = self.counts.setdefault(op, [0, 0])
            entry[0] += 1
            entry[1] += ns

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{op: {"calls": n, "ns": total}}."""
        with self.lock:
            return {op: {"calls": n, "ns": ns} for op, (n, ns) in self.counts.items()}


def counted(method):
    """A FUSE callback that counts its calls and their time in ``self.ops``."""
    op = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.ops.add(op, time.perf_counter_ns() - start)
    return wrapper


def _outside(fds: tuple[int, int, int], dev: int) -> tuple[int, int, int] | None:
    """``fds`` unless one of them is a file of this very filesystem (then None, after closing
    them): serving the caller's stdio from our own mount could deadlock on ourselves."""
    if all(os.fstat(fd).st_dev != dev for fd in fds):
        return fds
    for fd in fds:
        os.close(fd)
    return None


class ShimFS(Operations):
    """A read-only directory of executable shims whose xattrs hold their policy."""

    use_ns = True   # times in ns

    def __init__(self, registry: reg.Registry, agent: Agent | None, owner: int = 0,
                 root: str = "", debug: bool = False, program: bytes | None = None):
        """Serve ``registry``'s shims at mount point ``root``; ``agent`` runs their jobs
        (None: always local); ``debug`` tells every caller where its job ran and why;
        ``program`` is every shim's content (``shim.program()``), None: each its script."""
        self.registry, self.agent, self.owner, self.root = registry, agent, owner, root
        self.debug, self.program = debug, program
        self.dev: int | None = None
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.mounted = time.time_ns()
        self.ops = OpCounts()

    # --- lifecycle (libfuse's thread) -----------------------------------------------------------

    def init(self, path):
        """Start the agent once libfuse runs (after it has daemonized, if it does), then tell
        systemd (Type=notify) that the mount is ready."""
        if self.agent is not None:
            self.agent.loop_ended = loop_ended_probe()
            self.agent.start()
        sd_notify(b"READY=1")

    def destroy(self, path):
        """Stop the agent when the filesystem goes away."""
        if self.agent is not None:
            self.agent.stop()

    # --- the directory --------------------------------------------------------------------------

    @counted
    def getattr(self, path, fh=None):
        """A 0555 directory, a 0555 regular file per shim, and the hidden control directory
        ``.ctl`` with a 0666 control file per shim."""
        if path in ("/", CTL_DIR):
            return self._attrs(stat.S_IFDIR | 0o555, 0, 2)
        if path.startswith(CTL_DIR + "/"):
            self._ctl_name(path)
            return self._attrs(stat.S_IFREG | 0o666, 0, 1)
        return self._attrs(stat.S_IFREG | 0o555, len(self._content(self._name(path))), 1)

    @property
    def shims(self) -> str:
        """What the shim files are: "program" (the compiled shim) or "script"."""
        return "script" if self.program is None else "program"

    def _content(self, name: str) -> bytes:
        """The bytes of shim ``name``: the program, or its script."""
        return self.program if self.program is not None else shim.script(name, self.root)

    def _ctl_name(self, path: str) -> str:
        """The shim a control path names, or ENOENT."""
        return self._name(path[len(CTL_DIR):])

    def _attrs(self, mode: int, size: int, nlink: int) -> dict:
        """Attributes with the mount's time and root as owner."""
        t = self.mounted
        return {"st_mode": mode, "st_size": size, "st_nlink": nlink, "st_uid": 0, "st_gid": 0,
                "st_atime": t, "st_mtime": t, "st_ctime": t}

    @counted
    def readdir(self, path, fh):
        """The shims (the control directory lists the same names)."""
        if path not in ("/", CTL_DIR):
            raise FuseOSError(errno.ENOTDIR)
        return [".", ".."] + self.registry.names()

    @counted
    def access(self, path, amode):
        """Reading and running shims is allowed to all; writing only to control files."""
        if path.startswith(CTL_DIR + "/"):
            self._ctl_name(path)
            return 0
        if path not in ("/", CTL_DIR):
            self._name(path)
        if amode & os.W_OK:
            raise FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path):
        """An empty, read-only-looking filesystem."""
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0,
                "f_bavail": 0, "f_files": len(self.registry.names()), "f_ffree": 0,
                "f_namemax": 255}

    def _name(self, path: str) -> str:
        """The shim a path names, or ENOENT."""
        name = path[1:]
        if "/" in name or not self.registry.has(name):
            raise FuseOSError(errno.ENOENT)
        return name

    # --- files ----------------------------------------------------------------------------------

    @counted
    def open(self, path, fi):
        """Shims open read-only (their program or script); control files read-write (a shim
        asking for its job)."""
        mode = fi.flags & os.O_ACCMODE
        if not path.startswith(CTL_DIR + "/"):
            self._name(path)
            if mode != os.O_RDONLY:
                raise FuseOSError(errno.EACCES)
            fi.keep_cache = 1
            fi.fh = 0
            return 0
        name = self._ctl_name(path)
        if mode != os.O_RDWR or fi.flags & (os.O_TRUNC | os.O_APPEND):
            raise FuseOSError(errno.EACCES)
        _, _, pid = fuse_get_context()
        session = Session(name, pid, self._dev())
        with self._lock:
            fh = next(self._ids)
            self._sessions[fh] = session
        fi.fh, fi.direct_io = fh, 1
        return 0

    @counted
    def read(self, path, size, offset, fi):
        """The shim's bytes, or (control open) the next reply line, once the agent has one."""
        if fi.fh == 0:
            return self._content(self._name(path))[offset:offset + size]
        session = self._session(fi.fh)
        with session.lock:
            while session.pos >= len(session.out) and not session.ended:
                line, session.ended = self._next_line(session)
                session.out += line
            data = bytes(session.out[session.pos:session.pos + size])
            session.pos += len(data)
        session.stamps["read_last"] = time.monotonic_ns()
        return data

    @counted
    def write(self, path, data, offset, fi):
        """A shim writes its NUL-terminated arguments to its control open; later, ``c`` when
        it runs again after stopping with its job."""
        if fi.fh == 0:
            raise FuseOSError(errno.EBADF)
        session = self._session(fi.fh)
        if session.request is not None:
            if data.rstrip(b"\0") == shim.CONTINUED and self.agent is not None:
                self.agent.continued(session.request)
            return len(data)
        if len(session.args) + len(data) > MAX_ARGS:
            raise FuseOSError(errno.E2BIG)
        session.stamps.setdefault("args", time.monotonic_ns())
        session.args += data
        return len(data)

    @counted
    def release(self, path, fi):
        """Forget a control open."""
        with self._lock:
            session = self._sessions.pop(fi.fh, None)
        if session is not None:
            session.close()
        return 0

    def truncate(self, path, length, fh=None):
        """Shims cannot be changed."""
        raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        """Shims cannot be changed."""
        raise FuseOSError(errno.EPERM)

    def chown(self, path, uid, gid):
        """Shims cannot be changed."""
        raise FuseOSError(errno.EPERM)

    def utimens(self, path, times=None):
        """Shims cannot be changed."""
        raise FuseOSError(errno.EPERM)

    def _read_only(self, *args):
        """The directory cannot be changed (said here: mfusepy leaves what is not defined to
        libfuse, which answers ENOSYS)."""
        raise FuseOSError(errno.EROFS)

    mkdir = rmdir = unlink = rename = symlink = link = mknod = create = _read_only

    def _session(self, fh: int) -> Session:
        """The control session of ``fh``, or EBADF."""
        with self._lock:
            session = self._sessions.get(fh)
        if session is None:
            raise FuseOSError(errno.EBADF)
        return session

    def _next_line(self, session: Session) -> tuple[bytes, bool]:
        """The shim's next reply line (blocking this FUSE thread only), and whether it is the
        last; the first read starts the shim's request."""
        if session.request is None:
            session.request = self._start(session)
            if session.request is None:
                return shim.reply_status(255), True
        return session.request.next_line()

    def _start(self, session: Session) -> ShimRequest | None:
        """Hand a shim's request to the agent, or decide it here; None if it is malformed."""
        session.stamps["read"] = time.monotonic_ns()
        policy = self.registry.policy(session.name)
        if session.caller is None:
            return None
        try:
            args, early = shim.parse_request(bytes(session.args))
        except shim.BadRequest as exc:
            log.warning("%s: bad request from pid %d: %s", session.name, session.caller.pid, exc)
            return None
        request = ShimRequest(session.name, args, session.caller, policy,
                              session.take_stdio(), self.debug, session.stamps)
        request.early_signals = early
        decision = rules.decide(policy, stdio=request.stdio is not None,
                                agent=self.agent is not None and self.agent.thread.is_alive())
        if decision.route == rules.REMOTE:
            self.agent.submit(request)
            return request
        self.registry.record(session.name, decision.counted, {})
        request.decide(decision)
        return request

    def _dev(self) -> int:
        """The device number of this filesystem, from mountinfo (a stat of our own root from
        a callback would be a request to ourselves); -1 when unknown."""
        if self.dev is None:
            self.dev = mountinfo.device(self.root) if self.root else None
        return -1 if self.dev is None else self.dev

    # --- xattrs ---------------------------------------------------------------------------------

    @counted
    def getxattr(self, path, name, position=0):
        """user.offload.policy, .hosts, .stats on shims; user.offload.status on the root
        (hosts and recent jobs, JSON); ENODATA for any other name."""
        if path == "/":
            if name != XATTR_STATUS or self.agent is None:
                raise FuseOSError(errno.ENODATA)
            status = {**self.agent.status(), "fuse_ops": self.ops.snapshot(),
                      "shims": self.shims}
            return json.dumps(status, sort_keys=True).encode()
        shim_name = self._name(path)
        try:
            return self.registry.xattr(shim_name, name)
        except KeyError:
            raise FuseOSError(errno.ENODATA) from None

    @counted
    def listxattr(self, path):
        """The three offload attributes of a shim; the status of the root."""
        return list(reg.XATTRS) if path != "/" and self._name(path) else [XATTR_STATUS]

    def setxattr(self, path, name, value, options, position=0):
        """Only the policy is writable, by root or the mount's owner, to auto|always|never."""
        shim_name = self._name(path)
        if name not in reg.XATTRS:
            raise FuseOSError(errno.ENOTSUP)
        if name != reg.XATTR_POLICY:
            raise FuseOSError(errno.EPERM)
        self._check_owner()
        try:
            self.registry.set_policy(shim_name, value)
        except reg.BadValue:
            raise FuseOSError(errno.EINVAL) from None
        return 0

    def removexattr(self, path, name):
        """Removing the policy sets it back to auto."""
        shim_name = self._name(path)
        if name != reg.XATTR_POLICY:
            raise FuseOSError(errno.ENODATA if name not in reg.XATTRS else errno.EPERM)
        self._check_owner()
        self.registry.reset_policy(shim_name)
        return 0

    def _check_owner(self) -> None:
        """EPERM unless the caller is root or the mount's owner."""
        uid, _, _ = fuse_get_context()
        if uid not in (0, self.owner):
            raise FuseOSError(errno.EPERM)


def sd_notify(state: bytes) -> None:
    """Send ``state`` to systemd's notification socket, if there is one."""
    import socket
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state, address)
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)
