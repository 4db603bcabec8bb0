"""One libnfs context: its setup, AUTH_SYS credentials, calls and their errors, and the pipelined
nfs_pwrite_async writes (the libnfs write path; see docs/nfs-client.md)."""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING

from .binding import NFS_CB, NFS_V4, STATE, TRANSPORT, WRITE_CHUNK, NfsError, errno_of
from .creds import MACHINE, ROOT
from .logs import log, warn
from .rpc import RawWriter

if TYPE_CHECKING:
    from .pool import Server

WRITE_INFLIGHT = 256       # async WRITEs queued at once on one context

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


class Context:
    """One nfs_context (one TCP connection, one NFSv4 client) and its RawWriter.

    Not thread-safe: whoever uses it (a FUSE thread, the keepalive thread) holds ``lock``; the
    pool (Server) hands it out and takes it back."""

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
        err = errno.EACCES if "Insufficient ACCESS" in message else errno_of(ret, message)
        if err in TRANSPORT or err == STATE:
            self.broken = True
        if err == errno.EINTR:
            warn("timeout", "%s: %s timed out after %gs", self.server, fname,
                 self.server.timeout_ms / 1000)
        elif err in TRANSPORT or err == STATE:
            warn(fname, "%s: %s failed: %s", self.server, fname, message)
        raise NfsError(errno.EIO if err in TRANSPORT or err == STATE else err, message, fname)

    def pwrite(self, fh: ctypes.c_void_p, offset: int, data: bytes) -> int:
        """Write all of ``data`` at ``offset``: in one nfs_pwrite where libnfs can send it
        (5.0 on), else as a pipeline of WRITE_CHUNK-byte WRITEs."""
        if self.server.abi.large_writes:
            self.pwrite_sync(fh, offset, data, len(data))
            return len(data)
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
                self.pwrite_sync(fh, offset, data, WRITE_CHUNK)
            return len(data)
        finally:
            _batches.pop(token, None)

    def pwrite_sync(self, fh: ctypes.c_void_p, offset: int, data: bytes, chunk: int) -> None:
        """Write ``data`` with nfs_pwrite, ``chunk`` bytes at most per call (short WRITEs
        continued)."""
        for pos in range(0, len(data), chunk or 1):
            piece = data[pos:pos + chunk]
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
