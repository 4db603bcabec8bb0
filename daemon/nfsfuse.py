"""A userspace NFSv4 client for the compute host: a FUSE filesystem over libnfs (ctypes).

The host's kernel has no NFS client, so the daemon starts one of these per (server, export)::

    python -m offloadd.nfsfuse SERVER[:PORT] EXPORT MOUNTPOINT [--foreground] [-v]
                               [--timeout SECONDS] [--write-path raw|libnfs]

It mounts EXPORT of SERVER (NFSv4 over TCP, AUTH_SYS) at MOUNTPOINT with ``allow_other`` and
``default_permissions``: the kernel checks mode bits against the attributes we return, and every
NFS call is made with the credentials of the process that asked (uid, gid and up to 16
supplementary groups read from /proc/PID/status), so files a job creates belong to the job's
user and the server enforces its permissions too. Reads and writes on an open file use the
opener's credentials, as the kernel NFS client does.

Readiness: the mount point shows up in /proc/self/mountinfo (fstype ``fuse.offloadnfs``) once the
kernel mount exists (requests made before libfuse answers the kernel's INIT wait for it), and
the process logs ``mounted SERVER:PORT:EXPORT`` right after that answer. On SIGTERM/SIGINT
libfuse leaves its loop, the file system is unmounted, ``unmounted ...`` is logged and the
process exits 0 (a signal in the instant between the mount and libfuse installing its handlers,
i.e. before the ``mounted`` line, kills it instead). ``auto_unmount`` unmounts the file system
if the process dies. Exit status 1: bad arguments or the server could not be reached at start
(the last line on stderr says why). The process does not exit when the server goes away: calls
fail with EIO and work again once it is back.

libnfs 4.0.0 (Debian libnfs13) and its NFSv4 support, as found by testing against nfs-ganesha
4.3 -- each limit below is worked around here:

* ``nfs_set_version(nfs, NFS_V4)``; 4.0 has no ``nfs_set_nfsport``: the port is set by parsing
  the URL ``nfs://HOST/?nfsport=PORT`` with ``nfs_parse_url_incomplete`` on the context, then
  ``nfs_mount(nfs, host, export)``. ``nfs_get_readmax/writemax`` return 0 for NFSv4.
* A WRITE is encoded into a fixed 4 KiB buffer, so one NFSv4 WRITE carries at most ~3.9 KiB
  (larger ``nfs_pwrite`` calls fail with "Failed to encode COMPOUND4args"), and the server then
  spends its time per RPC (~50 MB/s). So writes do not go through libnfs by default: each FUSE
  write (128 KiB with libfuse 2, whatever max_write says) is one COMPOUND(PUTFH, WRITE) built
  here (:class:`RawWriter`, ~4x faster), on a TCP connection of its own, with the file handle
  from ``nfs_get_fh``, the anonymous stateid and the opener's AUTH_SYS credentials; COMMIT
  likewise. If the server refuses one (e.g. NFS4ERR_ACCESS: a file created read-only, which its
  open allows writing), that file falls back to libnfs: a pipeline of ``nfs_pwrite_async``
  chunks of :data:`WRITE_CHUNK` bytes, all in flight at once (``--write-path libnfs`` forces
  it). A READ larger than 1 MiB breaks the connection; reads are capped at :data:`READ_MAX`.
* The NFSv4 state of a context is one client and one open-owner: a second open of the same file
  on it shares the stateid, the first close kills it, and path-based chmod/chown/utimes/truncate
  do their own OPEN+CLOSE and kill it too. So every open file gets its own context (TCP
  connection, client name) from a pool; path operations run on separate "meta" contexts that
  never hold opens.
* Contexts need unique NFSv4 client names (``nfs4_set_client_name``): two contexts with the
  default name make the server expire the first one's state.
* libnfs never sends RENEW: a lease (60 s on ganesha) expires on an idle open file. A keepalive
  thread sends a 0-byte READ on open files idle for :data:`RENEW_AFTER` seconds (any stateful op
  renews), and a handle whose state was lost anyway (server restart, expiry) is reopened by path
  and the operation retried once.
* ``nfs_open`` checks ACCESS on the *parent directory* (read for O_RDONLY, modify for write), so
  a user cannot open a file in a directory they may not list/write. The open is tried as the
  caller; if libnfs fails with its own "Insufficient ACCESS", it is retried as root -- the
  kernel has already checked the file's mode bits for the caller (default_permissions).
* Path-based chmod/chown/utimes/truncate do an OPEN for write and so need write permission on
  the file and its directory (chmod of one's own read-only file fails). They run as root: the
  kernel applied the POSIX rules (owner, CAP_CHOWN, write permission) before calling us.
  ftruncate on an open file runs on its handle, as its opener.
* A create without O_EXCL ignores the mode (files come out 0600) and every create leaves garbage
  times (the exclusive-create verifier). Creates are done as exclusive creates (falling back to
  opening the existing file unless O_EXCL was asked), then the times are set to now.
* ``nfs_utimes(path, NULL)`` crashes: "now" is sent as explicit client time. Times of symlinks
  themselves, and their ownership, cannot be set (libnfs follows the link): those requests
  succeed without effect. Special files (mknod of fifos, sockets, devices) are not supported.
* READDIR returns garbage inode numbers: readdir reports names and types only (``stat`` gives
  the real inode numbers, ``use_ino``). ``st_blocks`` is computed from space used (libnfs
  reports 4 KiB units). rmdir of a non-directory would remove it (NFSv4 REMOVE): checked first.
* ``nfs_set_timeout`` works for the sync API (and for ``nfs_mount``): a call to a hung server
  fails after ``--timeout`` seconds, whole seconds only; a dead server fails at once (connection
  refused). A context that timed out or lost its connection is discarded and the call is tried
  once more on a new one, so the caller gets EIO within about twice ``--timeout``. (A retried
  mkdir/rename/... that had in fact been done may then fail with EEXIST/ENOENT, as on a soft
  NFS mount.) A host that drops packets should make a connect give up after ~15 s
  (``nfs_set_tcp_syncnt`` 3; not tested here).

The server should not cache attributes or names: nfs-ganesha's default (Attr_Expiration_Time
60 s, VFS FSAL) keeps serving a file's old size, a deleted file or a renamed file's old name
after the VM changed them locally; ``Attr_Expiration_Time = 0`` in its EXPORT block fixes that.

Not supported: byte-range locks (flock/fcntl locks stay local to this host), xattrs/ACLs,
special files. Supplementary groups: at most 16 are sent (the AUTH_SYS limit).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import random
import select
import socket
import stat
import struct
import sys
import threading
import time

import fuse

from offloadfs.settings import ConfigError, host_port

log = logging.getLogger("nfsfuse")

LIBNFS = "libnfs.so.13"
NFS_V4 = 4
DEFAULT_PORT = 2049
WRITE_CHUNK = 3744         # fits libnfs 4.0's 4 KiB encode buffer with a 128-byte fh, 16 groups
WRITE_INFLIGHT = 256       # async WRITEs queued at once on one context
READ_MAX = 1024 * 1024     # a larger READ breaks libnfs 4.0's connection
IO_SIZE = 1024 * 1024      # what we ask FUSE for (libfuse 2 caps requests at 128 KiB)
RENEW_AFTER = 15.0         # seconds an open file may stay idle before a keepalive READ
KEEPALIVE_EVERY = 5.0      # how often the keepalive thread looks
IDLE_CONTEXTS = 8          # idle contexts kept per pool
IDLE_MAX = 30.0            # an idle context older than this is closed (its lease would lapse)
MAX_GROUPS = 16            # AUTH_SYS carries at most 16 supplementary groups
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MACHINE = b"offloadnfs"
NFS4_PROGRAM, NFSPROC4_COMPOUND = 100003, 1
OP_COMMIT, OP_PUTFH, OP_WRITE = 5, 22, 38
UNSTABLE4, FILE_SYNC4 = 0, 2
RAW_WRITE_MAX = 1024 * 1024  # nfs-ganesha's default MaxWrite
OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC  # what libnfs understands
TRANSPORT = {errno.EIO, errno.EFAULT, errno.EINTR}  # libnfs: lost connection, RPC error, timeout
STATE = errno.ERANGE       # libnfs maps NFSv4 state errors (EXPIRED, BAD_STATEID...) to ERANGE


class NfsStat64(ctypes.Structure):
    """struct nfs_stat_64 (libnfs.h): all fields uint64_t."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nfs_dev", "nfs_ino", "nfs_mode", "nfs_nlink", "nfs_uid", "nfs_gid", "nfs_rdev",
        "nfs_size", "nfs_blksize", "nfs_blocks", "nfs_atime", "nfs_mtime", "nfs_ctime",
        "nfs_atime_nsec", "nfs_mtime_nsec", "nfs_ctime_nsec", "nfs_used")]


class NfsStatvfs64(ctypes.Structure):
    """struct nfs_statvfs_64 (libnfs.h): all fields uint64_t."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
        "f_favail", "f_fsid", "f_flag", "f_namemax")]


class Timeval(ctypes.Structure):
    """struct timeval."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class NfsDirent(ctypes.Structure):
    """struct nfsdirent (libnfs.h, 4.0)."""


NfsDirent._fields_ = [
    ("next", ctypes.POINTER(NfsDirent)), ("name", ctypes.c_char_p), ("inode", ctypes.c_uint64),
    ("type", ctypes.c_uint32), ("mode", ctypes.c_uint32), ("size", ctypes.c_uint64),
    ("atime", Timeval), ("mtime", Timeval), ("ctime", Timeval),
    ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("nlink", ctypes.c_uint32),
    ("dev", ctypes.c_uint64), ("rdev", ctypes.c_uint64), ("blksize", ctypes.c_uint64),
    ("blocks", ctypes.c_uint64), ("used", ctypes.c_uint64),
    ("atime_nsec", ctypes.c_uint32), ("mtime_nsec", ctypes.c_uint32),
    ("ctime_nsec", ctypes.c_uint32)]


class NfsUrl(ctypes.Structure):
    """struct nfs_url (libnfs.h)."""

    _fields_ = [("server", ctypes.c_char_p), ("path", ctypes.c_char_p), ("file", ctypes.c_char_p)]


# void (*nfs_cb)(int err, struct nfs_context *nfs, void *data, void *private_data)
NFS_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

_P, _S, _I, _U64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64
_PP = ctypes.POINTER(ctypes.c_void_p)
SIGNATURES = {  # name: (restype, argtypes), from /usr/include/nfsc/libnfs.h of libnfs 4.0.0
    "nfs_init_context": (_P, []),
    "nfs_destroy_context": (None, [_P]),
    "nfs_get_error": (_S, [_P]),
    "nfs_parse_url_incomplete": (ctypes.POINTER(NfsUrl), [_P, _S]),
    "nfs_destroy_url": (None, [ctypes.POINTER(NfsUrl)]),
    "nfs_set_version": (_I, [_P, _I]),
    "nfs_set_timeout": (None, [_P, _I]),
    "nfs_set_tcp_syncnt": (None, [_P, _I]),
    "nfs_set_autoreconnect": (None, [_P, _I]),
    "nfs_set_dircache": (None, [_P, _I]),
    "nfs_umask": (ctypes.c_uint16, [_P, ctypes.c_uint16]),
    "nfs4_set_client_name": (None, [_P, _S]),
    "nfs4_set_verifier": (None, [_P, _S]),
    "nfs_set_auth": (None, [_P, _P]),
    "libnfs_authunix_create": (_P, [_S, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                    ctypes.POINTER(ctypes.c_uint32)]),
    "nfs_mount": (_I, [_P, _S, _S]),
    "nfs_get_fd": (_I, [_P]),
    "nfs_which_events": (_I, [_P]),
    "nfs_service": (_I, [_P, _I]),
    "nfs_stat64": (_I, [_P, _S, ctypes.POINTER(NfsStat64)]),
    "nfs_lstat64": (_I, [_P, _S, ctypes.POINTER(NfsStat64)]),
    "nfs_fstat64": (_I, [_P, _P, ctypes.POINTER(NfsStat64)]),
    "nfs_open2": (_I, [_P, _S, _I, _I, _PP]),
    "nfs_create": (_I, [_P, _S, _I, _I, _PP]),
    "nfs_close": (_I, [_P, _P]),
    "nfs_pread": (_I, [_P, _P, _U64, _U64, _P]),            # (nfs, fh, offset, count, buf)
    "nfs_pwrite": (_I, [_P, _P, _U64, _U64, _P]),           # (nfs, fh, offset, count, buf)
    "nfs_pwrite_async": (_I, [_P, _P, _U64, _U64, _P, NFS_CB, _P]),
    "nfs_fsync": (_I, [_P, _P]),
    "nfs_truncate": (_I, [_P, _S, _U64]),
    "nfs_ftruncate": (_I, [_P, _P, _U64]),
    "nfs_mkdir2": (_I, [_P, _S, _I]),
    "nfs_rmdir": (_I, [_P, _S]),
    "nfs_unlink": (_I, [_P, _S]),
    "nfs_opendir": (_I, [_P, _S, _PP]),
    "nfs_readdir": (ctypes.POINTER(NfsDirent), [_P, _P]),
    "nfs_closedir": (None, [_P, _P]),
    "nfs_statvfs64": (_I, [_P, _S, ctypes.POINTER(NfsStatvfs64)]),
    "nfs_readlink2": (_I, [_P, _S, _PP]),
    "nfs_chmod": (_I, [_P, _S, _I]),
    "nfs_chown": (_I, [_P, _S, _I, _I]),
    "nfs_utimes": (_I, [_P, _S, ctypes.POINTER(Timeval)]),  # struct timeval[2], never NULL
    "nfs_symlink": (_I, [_P, _S, _S]),                      # (nfs, target, linkname)
    "nfs_rename": (_I, [_P, _S, _S]),
    "nfs_link": (_I, [_P, _S, _S]),                         # (nfs, oldpath, newpath)
    "nfs_get_fh": (_P, [_P]),               # libnfs-raw.h: struct nfs_fh * {int len; char *val}
}


def load_libnfs(name: str = LIBNFS) -> ctypes.CDLL:
    """libnfs with the prototypes of every function we call."""
    lib = ctypes.CDLL(name)
    for fname, (restype, argtypes) in SIGNATURES.items():
        func = getattr(lib, fname)
        func.restype, func.argtypes = restype, argtypes
    return lib


_libc = ctypes.CDLL(None)
_libc.free.argtypes, _libc.free.restype = [ctypes.c_void_p], None


class NfsError(fuse.FuseOSError):
    """A failed libnfs call: ``errno`` for the caller, ``message`` from nfs_get_error."""

    def __init__(self, err: int, message: str, call: str):
        super().__init__(err)
        self.message = message
        self.call = call


_warned: dict[str, float] = {}
WARN_EVERY = 5.0


def _warn(kind: str, fmt: str, *args) -> None:
    """log.warning, at most once per WARN_EVERY seconds for each ``kind`` (a server that went
    away fails every request); the others go to the debug log."""
    now = time.monotonic()
    if now - _warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
        _warned[kind] = now
        log.warning(fmt, *args)
    else:
        log.debug(fmt, *args)


def _errno(ret: int, message: str) -> int:
    """The errno for a negative libnfs return value."""
    err = -ret
    if err == errno.EPERM and "NFS4ERR_PERM" not in message:
        return errno.EIO  # -1: the call could not even be queued (encode error, no memory)
    return err


# ---------------------------------------------------------------------------------------------
# Pipelined writes: nfs_pwrite_async callbacks find their batch by a token.

_batches: dict[int, dict] = {}
_tokens = itertools.count(1)


@NFS_CB
def _write_done(err, _nfs, _data, private):
    """A WRITE finished: count it in its batch (late calls after a failed batch are ignored)."""
    batch = _batches.get(private or 0)
    if batch is None:
        return
    batch["pending"] -= 1
    if err < 0:
        batch["err"] = batch["err"] or err
    else:
        batch["written"] += err


class NfsFh(ctypes.Structure):
    """struct nfs_fh (what nfs_get_fh returns): the NFS file handle of an open file."""

    _fields_ = [("len", ctypes.c_int), ("val", ctypes.c_void_p)]


class RawRefused(Exception):
    """The server refused a hand-made WRITE/COMMIT (NFS or RPC status): use libnfs instead."""


def _opaque(data: bytes) -> bytes:
    """XDR opaque<>: length, bytes, padding."""
    return struct.pack(">I", len(data)) + data + bytes(-len(data) % 4)


class RawWriter:
    """WRITE and COMMIT compounds built by hand, on a TCP connection of their own.

    libnfs 4.0 cannot send an NFSv4 WRITE larger than ~3.9 KiB; the server then spends most of
    its time per RPC (50 MB/s here). This sends each FUSE write as one WRITE (up to
    RAW_WRITE_MAX), one RPC at a time, with the anonymous stateid (no open state needed: the
    server checks the credentials, AUTH_SYS of the file's opener, against the file). Anything the
    server refuses (e.g. NFS4ERR_ACCESS on a file created read-only, which the open stateid would
    allow) raises RawRefused and the caller falls back to libnfs for that handle."""

    def __init__(self, server: Server, owner: Context):
        """Not connected until the first call; a transport failure marks ``owner`` broken."""
        self.server, self.owner = server, owner
        self.sock: socket.socket | None = None
        self.xid = random.getrandbits(32)

    def close(self) -> None:
        """Drop the connection."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def write(self, fh: bytes, offset: int, data: bytes, creds: tuple, stable: int) -> int:
        """WRITE ``data`` at ``offset`` (as many RPCs as needed); the byte count."""
        done = 0
        while done < len(data):
            piece = memoryview(data)[done:done + RAW_WRITE_MAX]
            head = (struct.pack(">I", OP_PUTFH) + _opaque(fh) + struct.pack(">I", OP_WRITE)
                    + bytes(16) + struct.pack(">QII", offset + done, stable, len(piece)))
            body = self._call(creds, 2, [head, piece, bytes(-len(piece) % 4)])
            count = struct.unpack_from(">I", body, 0)[0]
            if count == 0:
                raise RawRefused("WRITE wrote nothing")
            done += count
        return done

    def commit(self, fh: bytes, creds: tuple) -> None:
        """COMMIT the whole file."""
        self._call(creds, 2, [struct.pack(">I", OP_PUTFH) + _opaque(fh)
                              + struct.pack(">IQI", OP_COMMIT, 0, 0)])

    def _call(self, creds: tuple, nops: int, parts: list) -> bytes:
        """Send a COMPOUND of ``nops`` operations (``parts`` joined); the last result's body.
        NfsError (EIO) on a transport failure or timeout, RawRefused on an error status."""
        uid, gid, groups = creds
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        cred = struct.pack(">I", 0) + _opaque(MACHINE) + struct.pack(">III", uid, gid, len(groups))
        cred += b"".join(struct.pack(">I", g) for g in groups)
        head = (struct.pack(">IIIIII", self.xid, 0, 2, NFS4_PROGRAM, NFS_V4, NFSPROC4_COMPOUND)
                + struct.pack(">I", 1) + _opaque(cred) + struct.pack(">II", 0, 0)
                + _opaque(b"") + struct.pack(">II", 0, nops))
        size = len(head) + sum(len(p) for p in parts)
        try:
            if self.sock is None:
                self.sock = socket.create_connection((self.server.host, self.server.port),
                                                     timeout=self.server.timeout_ms / 1000)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send([struct.pack(">I", 0x80000000 | size), head, *parts])
            while True:
                reply = self._record()
                if struct.unpack_from(">I", reply, 0)[0] == self.xid:
                    break  # else: the late answer to a call that timed out
        except OSError as exc:  # socket.timeout included
            self.close()
            self.owner.broken = True
            what = "timed out" if isinstance(exc, socket.timeout) else str(exc)
            _warn("raw", "%s: raw WRITE/COMMIT failed: %s", self.server, what)
            raise NfsError(errno.EIO, f"raw RPC: {what}", "raw") from None
        return self._results(reply, nops)

    def _send(self, parts: list) -> None:
        """sendmsg all of ``parts`` (it may send less than asked)."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _record(self) -> bytes:
        """One RPC record (its fragments joined)."""
        out = bytearray()
        while True:
            marker = struct.unpack(">I", self._exact(4))[0]
            out += self._exact(marker & 0x7FFFFFFF)
            if marker & 0x80000000:
                return bytes(out)

    def _exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes from the socket."""
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            buf += chunk
        return bytes(buf)

    @staticmethod
    def _results(reply: bytes, nops: int) -> bytes:
        """Check an RPC reply holding a COMPOUND4res; the body of the last result."""
        msg_type, reply_stat = struct.unpack_from(">II", reply, 4)
        if msg_type != 1 or reply_stat != 0:
            raise RawRefused(f"RPC reply {msg_type}/{reply_stat}")
        verf_len = struct.unpack_from(">I", reply, 16)[0]
        pos = 20 + verf_len + (-verf_len % 4)
        accept_stat, status, tag_len = struct.unpack_from(">III", reply, pos)
        if accept_stat != 0:
            raise RawRefused(f"RPC accept_stat {accept_stat}")
        if status != 0:
            raise RawRefused(f"NFS4 status {status}")
        pos += 12 + tag_len + (-tag_len % 4)
        count = struct.unpack_from(">I", reply, pos)[0]
        if count != nops:
            raise RawRefused(f"{count} results for {nops} operations")
        pos += 4 + 8  # number of results, then PUTFH: op, status
        return reply[pos + 8:]  # last op: op, status (0: checked above), body


class Context:
    """One nfs_context (one TCP connection, one NFSv4 client). Callers hold ``lock``."""

    _names = itertools.count(1)

    def __init__(self, lib: ctypes.CDLL, server: Server):
        """Connect and mount; NfsError if the server cannot be reached."""
        self.lib, self.server = lib, server
        self.lock = threading.Lock()
        self.creds: tuple | None = None
        self.broken = False
        self.renewed = self.used = time.monotonic()
        self.raw = RawWriter(server, self)
        self.nfs = lib.nfs_init_context()
        if not self.nfs:
            raise NfsError(errno.ENOMEM, "nfs_init_context failed", "init")
        name = f"offloadnfs-{socket.gethostname()}-{os.getpid()}-{next(self._names)}-" \
               f"{os.urandom(4).hex()}"
        try:
            self._setup(name.encode())
        except NfsError:
            self.destroy()
            raise

    def _setup(self, name: bytes) -> None:
        """Options, then mount."""
        lib, nfs, srv = self.lib, self.nfs, self.server
        url = lib.nfs_parse_url_incomplete(nfs, f"nfs://x/?nfsport={srv.port}".encode())
        if not url:
            raise NfsError(errno.EINVAL, self.error(), "nfs_parse_url_incomplete")
        lib.nfs_destroy_url(url)
        if lib.nfs_set_version(nfs, NFS_V4) != 0:
            raise NfsError(errno.EINVAL, self.error(), "nfs_set_version")
        lib.nfs4_set_client_name(nfs, name)
        lib.nfs4_set_verifier(nfs, os.urandom(8).hex()[:8].encode())
        lib.nfs_set_timeout(nfs, srv.timeout_ms)
        lib.nfs_set_tcp_syncnt(nfs, 3)
        lib.nfs_set_autoreconnect(nfs, 0)
        lib.nfs_set_dircache(nfs, 0)
        lib.nfs_umask(nfs, 0)
        self.use(ROOT)
        ret = lib.nfs_mount(nfs, srv.host.encode(), srv.export.encode())
        if ret != 0:
            self.fail(ret if ret < 0 else -errno.EIO, "nfs_mount")

    def error(self) -> str:
        """libnfs's message for the last failure."""
        msg = self.lib.nfs_get_error(self.nfs) if self.nfs else None
        return msg.decode(errors="replace") if msg else "unknown error"

    def use(self, creds: tuple) -> None:
        """Make the next calls with ``creds`` = (uid, gid, groups) (AUTH_SYS)."""
        if creds == self.creds:
            return
        uid, gid, groups = creds
        arr = (ctypes.c_uint32 * len(groups))(*groups)
        auth = self.lib.libnfs_authunix_create(MACHINE, uid, gid, len(groups), arr)
        if not auth:
            raise NfsError(errno.ENOMEM, "libnfs_authunix_create failed", "auth")
        self.lib.nfs_set_auth(self.nfs, auth)  # frees the previous AUTH
        self.creds = creds

    def call(self, fname: str, *args) -> int:
        """Call libnfs ``fname(nfs, *args)``; NfsError (marking the context broken on transport
        and state errors) if it returns < 0."""
        if not self.nfs:
            self.broken = True
            raise NfsError(errno.EIO, "connection closed", fname)
        ret = getattr(self.lib, fname)(self.nfs, *args)
        self.used = time.monotonic()
        if ret < 0:
            self.fail(ret, fname)
        return ret

    def fail(self, ret: int, fname: str):
        """Raise NfsError for ``ret``; a timeout or a lost connection marks us broken."""
        message = self.error()
        err = errno.EACCES if "Insufficient ACCESS" in message else _errno(ret, message)
        if err in TRANSPORT or err == STATE:
            self.broken = True
        if err == errno.EINTR:
            _warn("timeout", "%s: %s timed out after %gs", self.server, fname,
                  self.server.timeout_ms / 1000)
        elif err in TRANSPORT or err == STATE:
            _warn(fname, "%s: %s failed: %s", self.server, fname, message)
        raise NfsError(errno.EIO if err in TRANSPORT or err == STATE else err, message, fname)

    def pwrite(self, fh: ctypes.c_void_p, offset: int, data: bytes) -> int:
        """Write all of ``data`` at ``offset`` as a pipeline of WRITE_CHUNK-byte WRITEs."""
        lib, nfs = self.lib, self.nfs
        token = next(_tokens)
        batch = _batches[token] = {"pending": 0, "err": 0, "written": 0}
        buf = ctypes.create_string_buffer(data, len(data))
        base = ctypes.addressof(buf)
        try:
            pos = 0
            while pos < len(data) or batch["pending"]:
                while pos < len(data) and batch["pending"] < WRITE_INFLIGHT and not batch["err"]:
                    n = min(WRITE_CHUNK, len(data) - pos)
                    if lib.nfs_pwrite_async(nfs, fh, offset + pos, n, base + pos, _write_done,
                                            token) != 0:
                        self.broken = True
                        raise NfsError(errno.EIO, self.error(), "nfs_pwrite_async")
                    batch["pending"] += 1
                    pos += n
                if batch["err"] and not batch["pending"]:
                    break
                if batch["pending"]:
                    self._service()
                if batch["err"] and not batch["pending"]:
                    break
            self.used = time.monotonic()
            if batch["err"]:
                self.fail(batch["err"], "nfs_pwrite")
            if batch["written"] != len(data):  # short WRITEs: very unlikely, fix up slowly
                log.debug("short pipelined write (%d of %d): rewriting synchronously",
                          batch["written"], len(data))
                self.pwrite_sync(fh, offset, data)
            return len(data)
        finally:
            _batches.pop(token, None)

    def pwrite_sync(self, fh: ctypes.c_void_p, offset: int, data: bytes) -> None:
        """Write ``data`` one chunk at a time (fallback)."""
        for pos in range(0, len(data), WRITE_CHUNK):
            piece = data[pos:pos + WRITE_CHUNK]
            done = 0
            while done < len(piece):
                n = self.call("nfs_pwrite", fh, offset + pos + done, len(piece) - done,
                              piece[done:])
                if n == 0:
                    raise NfsError(errno.EIO, "WRITE wrote nothing", "nfs_pwrite")
                done += n

    def _service(self) -> None:
        """Wait (at most 100 ms) for the socket, then let libnfs process it (and its timeouts)."""
        lib, nfs = self.lib, self.nfs
        poller = select.poll()
        poller.register(lib.nfs_get_fd(nfs), lib.nfs_which_events(nfs))
        ready = poller.poll(100)
        if lib.nfs_service(nfs, ready[0][1] if ready else 0) < 0:
            self.broken = True
            raise NfsError(errno.EIO, self.error(), "nfs_service")

    def destroy(self) -> None:
        """Close the connections (libnfs cancels what is pending)."""
        self.raw.close()
        if self.nfs:
            self.lib.nfs_destroy_context(self.nfs)
            self.nfs = None


ROOT = (0, 0, ())


class Server:
    """Where the export lives, and pools of connected contexts."""

    def __init__(self, lib: ctypes.CDLL, host: str, port: int, export: str, timeout: float,
                 raw_writes: bool = True):
        """Nothing is connected until a context is asked for. ``raw_writes``: WRITE through
        :class:`RawWriter` (else only through libnfs)."""
        self.lib, self.host, self.port, self.export = lib, host, port, export
        self.raw_writes = raw_writes
        self.timeout_ms = max(1000, int(round(timeout)) * 1000)  # libnfs: whole seconds
        self.lock = threading.Lock()
        self.idle: dict[str, list[Context]] = {"meta": [], "file": []}
        self.closed = False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.export}"

    def take(self, kind: str) -> Context:
        """An idle context of ``kind`` ("meta" or "file"), or a new one."""
        with self.lock:
            pool = self.idle[kind]
            while pool:
                ctx = pool.pop()
                if time.monotonic() - ctx.used < IDLE_MAX:
                    return ctx
                ctx.destroy()
        return Context(self.lib, self)

    def give(self, kind: str, ctx: Context) -> None:
        """Return a context; broken or surplus ones are closed."""
        with self.lock:
            if not ctx.broken and not self.closed and len(self.idle[kind]) < IDLE_CONTEXTS:
                self.idle[kind].append(ctx)
                return
        ctx.destroy()

    def expire_idle(self) -> None:
        """Close idle contexts unused for IDLE_MAX seconds."""
        now = time.monotonic()
        with self.lock:
            for kind, pool in self.idle.items():
                keep = [c for c in pool if now - c.used < IDLE_MAX]
                for ctx in pool:
                    if ctx not in keep:
                        ctx.destroy()
                self.idle[kind] = keep

    def close(self) -> None:
        """Close every idle context; later returns are closed too."""
        with self.lock:
            self.closed = True
            for pool in self.idle.values():
                for ctx in pool:
                    ctx.destroy()
                pool.clear()


class Handle:
    """An open file: its own context and libnfs file handle."""

    def __init__(self, path: bytes, flags: int, creds: tuple):
        """Not open yet: see :meth:`opened`."""
        self.path, self.flags, self.creds = path, flags, creds
        self.ctx: Context | None = None
        self.fh = ctypes.c_void_p()
        self.fh_bytes = b""        # the NFS file handle, for RawWriter
        self.raw = False           # write through RawWriter
        self.dirty = False         # written since the last COMMIT

    def opened(self, ctx: Context, fh: ctypes.c_void_p) -> None:
        """Now open as ``fh`` on ``ctx``."""
        self.ctx, self.fh = ctx, fh
        nfh = NfsFh.from_address(ctx.lib.nfs_get_fh(fh))
        self.fh_bytes = ctypes.string_at(nfh.val, nfh.len) if 0 < nfh.len <= 128 else b""
        self.raw = ctx.server.raw_writes and bool(self.fh_bytes) and \
            self.flags & os.O_ACCMODE != os.O_RDONLY
        ctx.renewed = time.monotonic()


def _caller() -> tuple:
    """(uid, gid, groups) of the process making the current FUSE request."""
    uid, gid, pid = fuse.fuse_get_context()
    return uid, gid, _groups(pid, gid)


def _groups(pid: int, gid: int) -> tuple:
    """Supplementary groups of thread ``pid`` (at most MAX_GROUPS), from /proc."""
    if pid <= 0:
        return ()
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    groups = [int(g) for g in line.split()[1:]]
                    return tuple(g for g in groups if g != gid)[:MAX_GROUPS]
    except (OSError, ValueError):
        pass
    return ()


def _stat_dict(st: NfsStat64) -> dict:
    """fusepy attributes (times in ns) from an nfs_stat_64."""
    return {
        "st_mode": st.nfs_mode, "st_ino": st.nfs_ino, "st_nlink": st.nfs_nlink,
        "st_uid": st.nfs_uid, "st_gid": st.nfs_gid, "st_rdev": st.nfs_rdev,
        "st_size": st.nfs_size, "st_blksize": 128 * 1024, "st_blocks": (st.nfs_used + 511) // 512,
        "st_atime": st.nfs_atime * 10**9 + st.nfs_atime_nsec,
        "st_mtime": st.nfs_mtime * 10**9 + st.nfs_mtime_nsec,
        "st_ctime": st.nfs_ctime * 10**9 + st.nfs_ctime_nsec,
    }


def _b(path: str) -> bytes:
    """A FUSE path (decoded as latin-1, so any bytes round-trip) as libnfs wants it."""
    return path.encode("latin-1")


def _timeval(ns: int) -> Timeval:
    """A struct timeval from nanoseconds."""
    sec, rest = divmod(ns, 10**9)
    return Timeval(sec, rest // 1000)


class NfsFuse(fuse.Operations):
    """The FUSE operations, each made on the NFS server as the calling process."""

    use_ns = True
    # Not provided: libfuse answers ENOSYS and the kernel stops asking (a getxattr of
    # security.capability would otherwise precede every write). Locks stay local to this host.
    getxattr = setxattr = listxattr = removexattr = None
    lock = bmap = ioctl = None

    def __init__(self, server: Server):
        """Serve ``server``; contexts are connected on demand."""
        self.server = server
        self.handles: dict[int, Handle] = {}
        self.handles_lock = threading.Lock()
        self.next_fh = itertools.count(1)
        self.stop = threading.Event()
        self.keepalive: threading.Thread | None = None
        self._zero = ctypes.create_string_buffer(1)

    # -- plumbing ------------------------------------------------------------------------

    def __call__(self, op, *args):
        """Dispatch with a debug line per request."""
        if not log.isEnabledFor(logging.DEBUG):
            return super().__call__(op, *args)
        start = time.monotonic()
        try:
            result = super().__call__(op, *args)
        except fuse.FuseOSError as exc:
            log.debug("%s %s -> %s (%.1f ms)", op, _show(args), errno.errorcode.get(exc.errno),
                      (time.monotonic() - start) * 1000)
            raise
        log.debug("%s %s -> %s (%.1f ms)", op, _show(args), _show_result(result),
                  (time.monotonic() - start) * 1000)
        return result

    def _meta(self, fname: str, *args, creds: tuple | None = None) -> int:
        """``fname`` on a meta context as ``creds`` (default: the caller); a context that broke
        is replaced and the call tried once more."""
        creds = _caller() if creds is None else creds
        for attempt in (1, 2):
            ctx = self.server.take("meta")
            try:
                with ctx.lock:
                    ctx.use(creds)
                    return ctx.call(fname, *args)
            except NfsError:
                if not ctx.broken or attempt == 2:
                    raise
                log.debug("retrying %s on a new connection", fname)
            finally:
                self.server.give("meta", ctx)
        raise AssertionError("unreachable")

    def _lstat(self, path: bytes, creds: tuple | None = None) -> NfsStat64:
        """lstat on the server."""
        st = NfsStat64()
        self._meta("nfs_lstat64", path, ctypes.byref(st), creds=creds)
        return st

    def _handle(self, fi) -> Handle:
        """The Handle behind a fuse_file_info."""
        handle = self.handles.get(fi.fh)
        if handle is None:
            raise fuse.FuseOSError(errno.EBADF)
        return handle

    @contextlib.contextmanager
    def _locked(self, handle: Handle):
        """Hold the lock of the handle's current context (it may be replaced meanwhile)."""
        while True:
            ctx = handle.ctx
            ctx.lock.acquire()
            if ctx is handle.ctx:
                break
            ctx.lock.release()
        try:
            yield ctx
        finally:
            ctx.lock.release()

    def _on_handle(self, handle: Handle, fname: str, *args, path: str | None = None) -> int:
        """``fname(nfs, fh, *args)`` on the handle's context as its opener; if the context broke
        or the server lost our open state, reopen by path and try once more."""
        for attempt in (1, 2):
            with self._locked(handle) as ctx:
                try:
                    if ctx.broken:
                        raise NfsError(errno.EIO, "connection lost", fname)
                    ctx.use(handle.creds)
                    ret = ctx.call(fname, handle.fh, *args)
                    ctx.renewed = time.monotonic()
                    return ret
                except NfsError:
                    if not ctx.broken or attempt == 2:
                        raise
            self._reopen(handle, ctx, path)
        raise AssertionError("unreachable")

    def _reopen(self, handle: Handle, old: Context, path: str | None) -> None:
        """Open the file again on a fresh context (its state on the server is gone)."""
        with old.lock:
            if handle.ctx is not old:
                return  # another thread did it
            if path is not None:
                handle.path = _b(path)
            fresh = Context(self.server.lib, self.server)
            flags = handle.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
            try:
                with fresh.lock:
                    handle.opened(fresh, self._nfs_open(fresh, handle.path, flags, handle.creds))
            except NfsError:
                fresh.destroy()
                raise
            old.destroy()
        log.info("reopened %r after losing its NFS state", _show_path(handle.path))

    def _nfs_open(self, ctx: Context, path: bytes, flags: int, creds: tuple) -> ctypes.c_void_p:
        """nfs_open2 as ``creds``; as root if libnfs rejects it for lack of access to the
        parent directory (its bug: the kernel has checked the file's permissions)."""
        fh = ctypes.c_void_p()
        ctx.use(creds)
        try:
            ctx.call("nfs_open2", path, flags & OPEN_FLAGS, 0, ctypes.byref(fh))
        except NfsError as exc:
            if creds == ROOT or "Insufficient ACCESS" not in exc.message:
                raise
            log.debug("open %r: parent directory ACCESS denied to uid %d; opening as root",
                      _show_path(path), creds[0])
            ctx.use(ROOT)
            ctx.call("nfs_open2", path, flags & OPEN_FLAGS, 0, ctypes.byref(fh))
        return fh

    def _register(self, handle: Handle, fi) -> int:
        """Give ``handle`` a FUSE file handle number."""
        with self.handles_lock:
            fh = next(self.next_fh)
            self.handles[fh] = handle
        fi.fh = fh
        return 0

    # -- life cycle ----------------------------------------------------------------------

    def init(self, path):
        """Mounted: start the keepalive thread."""
        self.keepalive = threading.Thread(target=self._keepalive, name="nfs-keepalive",
                                          daemon=True)
        self.keepalive.start()
        log.info("mounted %s", self.server)

    def destroy(self, path):
        """Unmounted: stop the keepalive thread, close every file and connection."""
        self.stop.set()
        if self.keepalive is not None:
            self.keepalive.join(5)
        with self.handles_lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for handle in handles:
            with handle.ctx.lock:
                handle.ctx.destroy()
        self.server.close()

    def _keepalive(self) -> None:
        """Renew the leases of idle open files; close contexts idle too long."""
        while not self.stop.wait(KEEPALIVE_EVERY):
            now = time.monotonic()
            with self.handles_lock:
                handles = list(self.handles.values())
            for handle in handles:
                ctx = handle.ctx
                if ctx is None or now - ctx.renewed < RENEW_AFTER or ctx.broken:
                    continue
                if not ctx.lock.acquire(timeout=1):
                    continue  # busy for long: try again next round
                try:
                    if ctx.nfs and handle.ctx is ctx and not ctx.broken:
                        self._renew(handle, ctx)
                except NfsError as exc:
                    _warn("renewal", "lease renewal for %r failed: %s",
                          _show_path(handle.path), exc.message)
                finally:
                    ctx.lock.release()
            self.server.expire_idle()

    def _renew(self, handle: Handle, ctx: Context) -> None:
        """A 0-byte READ with the open's stateid: renews the lease of ``ctx``'s NFSv4 client
        (libnfs 4.0 never sends RENEW). Caller holds ``ctx.lock``."""
        ctx.use(handle.creds)
        ctx.call("nfs_pread", handle.fh, 0, 0, self._zero)
        ctx.renewed = time.monotonic()

    # -- attributes ----------------------------------------------------------------------

    def getattr(self, path, fh=None):
        """lstat (or fstat on an open file)."""
        if fh is not None and fh.fh in self.handles:
            st = NfsStat64()
            self._on_handle(self._handle(fh), "nfs_fstat64", ctypes.byref(st), path=path)
            return _stat_dict(st)
        st = self._lstat(_b(path))
        if st.nfs_nlink == 0:  # a deleted file a caching server still resolves: not there
            raise fuse.FuseOSError(errno.ENOENT)
        return _stat_dict(st)

    def statfs(self, path):
        """statvfs of the export."""
        sv = NfsStatvfs64()
        self._meta("nfs_statvfs64", _b(path), ctypes.byref(sv))
        return {"f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks,
                "f_bfree": sv.f_bfree, "f_bavail": sv.f_bavail, "f_files": sv.f_files,
                "f_ffree": sv.f_ffree, "f_favail": sv.f_favail,
                "f_namemax": min(sv.f_namemax, 255) or 255}

    def access(self, path, amode):
        """default_permissions: the kernel checks access itself; nothing to do."""
        return 0

    def chmod(self, path, mode):
        """chmod, as root (the kernel checked that the caller owns the file). As on a local
        file system, the set-group-ID bit is dropped unless the caller is root or in the file's
        group (as root, the server would not do it)."""
        mode &= 0o7777
        uid, gid, groups = _caller()
        if mode & stat.S_ISGID and uid != 0:
            file_gid = self._lstat(_b(path)).nfs_gid
            if file_gid != gid and file_gid not in groups:
                mode &= ~stat.S_ISGID
        self._meta("nfs_chmod", _b(path), mode, creds=ROOT)

    def chown(self, path, uid, gid):
        """chown, as root (the kernel applied the chown rules); -1 keeps a value."""
        st = self._lstat(_b(path))
        if stat.S_ISLNK(st.nfs_mode):
            log.debug("chown of symlink %r ignored (libnfs would follow it)", path)
            return
        uid = st.nfs_uid if uid == -1 else uid
        gid = st.nfs_gid if gid == -1 else gid
        self._meta("nfs_chown", _b(path), uid, gid, creds=ROOT)

    def utimens(self, path, times=None):
        """Set atime and mtime (UTIME_NOW, UTIME_OMIT understood), as root (the kernel
        checked ownership or write access)."""
        now = time.time_ns()
        st = self._lstat(_b(path))
        if stat.S_ISLNK(st.nfs_mode):
            log.debug("utimens of symlink %r ignored (libnfs would follow it)", path)
            return
        old = (st.nfs_atime * 10**9 + st.nfs_atime_nsec, st.nfs_mtime * 10**9 + st.nfs_mtime_nsec)
        new = [now if t == UTIME_NOW else old[i] if t == UTIME_OMIT else t
               for i, t in enumerate(times if times is not None else (UTIME_NOW, UTIME_NOW))]
        tv = (Timeval * 2)(_timeval(new[0]), _timeval(new[1]))
        self._meta("nfs_utimes", _b(path), tv, creds=ROOT)

    def truncate(self, path, length, fh=None):
        """ftruncate on the open file if FUSE gives one, else truncate by path as root (the
        kernel checked write permission)."""
        if fh is not None and fh.fh in self.handles:
            handle = self._handle(fh)
            self._on_handle(handle, "nfs_ftruncate", length, path=path)
            return
        self._meta("nfs_truncate", _b(path), length, creds=ROOT)

    # -- namespace -----------------------------------------------------------------------

    def readdir(self, path, fh):
        """Names and types (no inode numbers: libnfs 4.0 reports garbage ones)."""
        creds = _caller()
        entries = [(".", None, 0), ("..", None, 0)]
        for attempt in (1, 2):
            ctx = self.server.take("meta")
            try:
                with ctx.lock:
                    ctx.use(creds)
                    d = ctypes.c_void_p()
                    ctx.call("nfs_opendir", _b(path), ctypes.byref(d))
                    try:
                        while True:
                            ent = self.server.lib.nfs_readdir(ctx.nfs, d)
                            if not ent:
                                break
                            name = ent.contents.name
                            if name in (b".", b".."):
                                continue
                            attrs = {"st_mode": stat.S_IFMT(ent.contents.mode),
                                     "st_ino": 0xFFFFFFFF}
                            entries.append((name.decode("latin-1"), attrs, 0))
                    finally:
                        self.server.lib.nfs_closedir(ctx.nfs, d)
                    return entries
            except NfsError:
                if not ctx.broken or attempt == 2:
                    raise
            finally:
                self.server.give("meta", ctx)
        raise AssertionError("unreachable")

    def readlink(self, path):
        """The symlink's target."""
        out = ctypes.c_void_p()
        self._meta("nfs_readlink2", _b(path), ctypes.byref(out))
        try:
            return ctypes.string_at(out.value).decode("latin-1")
        finally:
            _libc.free(out)

    def mknod(self, path, mode, dev):
        """Regular files only (libnfs 4.0 cannot make NFSv4 special files)."""
        if not stat.S_ISREG(mode):
            raise fuse.FuseOSError(errno.EOPNOTSUPP)
        fi = fuse.fuse_file_info()
        fi.flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.create(path, stat.S_IMODE(mode), fi)
        self.release(path, fi)

    def mkdir(self, path, mode):
        """mkdir as the caller."""
        self._meta("nfs_mkdir2", _b(path), mode & 0o7777)

    def rmdir(self, path):
        """rmdir as the caller (ENOTDIR for a non-directory: NFSv4 REMOVE would remove it)."""
        if not stat.S_ISDIR(self._lstat(_b(path)).nfs_mode):
            raise fuse.FuseOSError(errno.ENOTDIR)
        self._meta("nfs_rmdir", _b(path))

    def unlink(self, path):
        """unlink as the caller."""
        self._meta("nfs_unlink", _b(path))

    def rename(self, old, new):
        """rename (replacing ``new``) as the caller."""
        self._meta("nfs_rename", _b(old), _b(new))

    def symlink(self, target, source):
        """Make symlink ``target`` pointing to ``source``, as the caller."""
        self._meta("nfs_symlink", _b(source), _b(target))

    def link(self, target, source):
        """Make hard link ``target`` to the existing ``source``, as the caller."""
        self._meta("nfs_link", _b(source), _b(target))

    # -- files ---------------------------------------------------------------------------

    def _on_file_context(self, fn):
        """``fn(ctx)`` on a locked context of the file pool; if that context turns out broken
        (e.g. the server restarted while it sat in the pool), once more on a new one. Returns
        (ctx, result): the caller owns ctx."""
        for attempt in (1, 2):
            ctx = self.server.take("file")
            try:
                with ctx.lock:
                    return ctx, fn(ctx)
            except NfsError:
                self.server.give("file", ctx)
                if not ctx.broken or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def open(self, path, fi):
        """Open on a context of its own, as the caller."""
        handle = Handle(_b(path), fi.flags, _caller())
        ctx, fh = self._on_file_context(
            lambda ctx: self._nfs_open(ctx, handle.path, fi.flags, handle.creds))
        handle.opened(ctx, fh)
        return self._register(handle, fi)

    def create(self, path, mode, fi):
        """Create as the caller: an exclusive create (the only kind that honours ``mode`` in
        libnfs 4.0), else open the file that exists (EEXIST if O_EXCL); then fix the times."""
        creds = _caller()
        handle = Handle(_b(path), fi.flags, creds)

        def create(ctx: Context) -> tuple[ctypes.c_void_p, bool]:
            ctx.use(creds)
            flags = (fi.flags & (os.O_ACCMODE | os.O_APPEND | os.O_SYNC)) | os.O_EXCL
            fh = ctypes.c_void_p()
            try:
                ctx.call("nfs_create", handle.path, flags, mode & 0o7777, ctypes.byref(fh))
                return fh, True
            except NfsError as exc:
                if exc.errno != errno.EEXIST or fi.flags & os.O_EXCL:
                    raise
            return self._nfs_open(ctx, handle.path, fi.flags & ~os.O_CREAT, creds), False

        ctx, (fh, created) = self._on_file_context(create)
        handle.opened(ctx, fh)
        self._register(handle, fi)
        if created:
            try:
                tv = (Timeval * 2)(_timeval(time.time_ns()), _timeval(time.time_ns()))
                self._meta("nfs_utimes", handle.path, tv, creds=ROOT)
            except NfsError as exc:
                log.warning("could not set the times of new file %r: %s", path, exc.message)
        return 0

    def read(self, path, size, offset, fi):
        """pread, READ_MAX bytes at most per READ, until ``size`` bytes or EOF."""
        handle = self._handle(fi)
        size = min(size, IO_SIZE)
        buf = ctypes.create_string_buffer(size)
        got = 0
        while got < size:
            n = self._on_handle(handle, "nfs_pread", offset + got, min(size - got, READ_MAX),
                                ctypes.addressof(buf) + got, path=path)
            if n == 0:
                break
            got += n
        return buf.raw[:got]

    def write(self, path, data, offset, fi):
        """pwrite (at the server's end of file with O_APPEND) as a pipeline of WRITEs."""
        handle = self._handle(fi)
        for attempt in (1, 2):
            with self._locked(handle) as ctx:
                try:
                    if ctx.broken:
                        raise NfsError(errno.EIO, "connection lost", "nfs_pwrite")
                    ctx.use(handle.creds)
                    if handle.flags & os.O_APPEND:
                        st = NfsStat64()
                        ctx.call("nfs_fstat64", handle.fh, ctypes.byref(st))
                        offset = st.nfs_size
                    handle.dirty = True
                    if handle.raw:
                        stable = FILE_SYNC4 if handle.flags & os.O_SYNC else UNSTABLE4
                        try:
                            n = ctx.raw.write(handle.fh_bytes, offset, data, handle.creds, stable)
                            if time.monotonic() - ctx.renewed > RENEW_AFTER:
                                self._renew(handle, ctx)  # raw WRITEs renew no lease
                            return n
                        except RawRefused as exc:
                            handle.raw = False
                            log.info("raw WRITE of %r refused (%s): writing through libnfs",
                                     _show_path(handle.path), exc)
                    n = ctx.pwrite(handle.fh, offset, data)
                    ctx.renewed = time.monotonic()
                    return n
                except NfsError:
                    if not ctx.broken or attempt == 2:
                        raise
            self._reopen(handle, ctx, path)
        raise AssertionError("unreachable")

    def flush(self, path, fi):
        """close(2): COMMIT what was written, so errors reach close()."""
        handle = self.handles.get(fi.fh)
        if handle is not None and handle.dirty:
            self._commit(handle, path)

    def fsync(self, path, datasync, fi):
        """COMMIT (nothing to do for a file open read-only)."""
        handle = self._handle(fi)
        if handle.flags & os.O_ACCMODE != os.O_RDONLY:
            self._commit(handle, path)

    def _commit(self, handle: Handle, path: str) -> None:
        """COMMIT the file: by hand if it can, else through libnfs."""
        if handle.raw:
            with self._locked(handle) as ctx:
                if not ctx.broken:
                    try:
                        ctx.raw.commit(handle.fh_bytes, handle.creds)
                        handle.dirty = False
                        return
                    except RawRefused as exc:
                        log.info("raw COMMIT of %r refused (%s)", _show_path(handle.path), exc)
        self._on_handle(handle, "nfs_fsync", path=path)
        handle.dirty = False

    def release(self, path, fi):
        """Last close: CLOSE the NFS open and give its context back to the pool."""
        with self.handles_lock:
            handle = self.handles.pop(fi.fh, None)
        if handle is None:
            return
        ctx = handle.ctx
        with ctx.lock:
            if not ctx.broken and ctx.nfs:
                try:
                    ctx.use(handle.creds)
                    ctx.call("nfs_close", handle.fh)
                except NfsError as exc:
                    _warn("close", "close of %r failed: %s", _show_path(handle.path),
                          exc.message)
                    ctx.broken = True
        self.server.give("file", ctx)


def _show_path(path) -> str:
    """A path for the log."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "replace")
    if isinstance(path, str):
        return path.encode("latin-1", "replace").decode("utf-8", "replace")
    return repr(path)


def _show(args) -> str:
    """Request arguments for a debug line (data as its length)."""
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            out.append(f"<{len(arg)} bytes>")
        elif isinstance(arg, str):
            out.append(_show_path(arg))
        elif isinstance(arg, fuse.fuse_file_info):
            out.append(f"fh={arg.fh} flags={arg.flags:#o}")
        else:
            out.append(repr(arg))
    return " ".join(out)


def _show_result(result) -> str:
    """A result for a debug line."""
    if isinstance(result, bytes):
        return f"<{len(result)} bytes>"
    if isinstance(result, list):
        return f"<{len(result)} entries>"
    return repr(result)


def parse_server(text: str) -> tuple[str, int]:
    """SERVER[:PORT] -> (host, port); ValueError if malformed."""
    try:
        return host_port(text, DEFAULT_PORT)
    except ConfigError:
        raise ValueError(f"bad server {text!r}: expected HOST[:PORT]") from None


def mount_options(server: str, export: str) -> dict:
    """fusepy keyword options for the mount."""
    fsname = f"offloadnfs#{server}:{export}".replace(",", "_").replace(" ", "_")
    return {"allow_other": True, "default_permissions": True, "auto_unmount": True,
            "fsname": fsname, "subtype": "offloadnfs", "use_ino": True,
            "attr_timeout": 1, "entry_timeout": 1, "negative_timeout": 0,
            "big_writes": True, "max_read": IO_SIZE, "max_write": IO_SIZE,
            "max_readahead": IO_SIZE}


def main(argv: list[str] | None = None) -> int:
    """Mount, serve until unmounted or signalled, exit 0."""
    parser = argparse.ArgumentParser(prog="python -m offloadd.nfsfuse",
                                     description="Mount an NFSv4 export with FUSE (libnfs).")
    parser.add_argument("server", help="HOST[:PORT] of the NFSv4 server (port 2049 if omitted)")
    parser.add_argument("export", help="the export's path on the server (its NFSv4 pseudo path)")
    parser.add_argument("mountpoint")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (logs go to stderr)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds before a call to an unresponsive server fails with EIO "
                             "(whole seconds; default 15)")
    parser.add_argument("--write-path", choices=("raw", "libnfs"), default="raw",
                        help="raw (default): one WRITE per FUSE write, sent by hand; libnfs: "
                             "pipelined 3.7 KiB WRITEs through libnfs only (slower)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s nfsfuse[%(process)d] %(levelname)s %(message)s")
    logging.getLogger("fuse").setLevel(logging.ERROR)  # we log requests ourselves
    try:
        host, port = parse_server(args.server)
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    if not os.path.isdir(args.mountpoint):
        log.error("mount point %s is not a directory", args.mountpoint)
        return 1
    try:
        lib = load_libnfs()
    except (OSError, AttributeError) as exc:
        log.error("cannot load %s: %s", LIBNFS, exc)
        return 1
    server = Server(lib, host, port, args.export, args.timeout, args.write_path == "raw")
    try:  # fail now, with a clear line, if the server cannot be reached
        probe = server.take("meta")
        with probe.lock:
            probe.call("nfs_lstat64", b"/", ctypes.byref(NfsStat64()))
        server.give("meta", probe)
    except NfsError as exc:
        log.error("cannot mount %s from %s:%d: %s", args.export, host, port, exc.message)
        return 1
    ops = NfsFuse(server)
    try:
        fuse.FUSE(ops, args.mountpoint, raw_fi=True, foreground=args.foreground,
                  nothreads=False, encoding="latin-1",
                  **mount_options(f"{host}:{port}", args.export))
    except RuntimeError as exc:
        log.error("FUSE mount of %s failed: %s", args.mountpoint, exc)
        server.close()
        return 1
    server.close()
    log.info("unmounted %s", server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
