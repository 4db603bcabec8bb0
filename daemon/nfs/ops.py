"""The FUSE operations of the NFS client (``raw_fi``, paths decoded as latin-1).

Every NFS call is made with the credentials of the process that asked (uid, gid and up to 16
supplementary groups read from /proc/PID/status), so files a job creates belong to the job's
user and the server enforces its permissions too; the kernel checks mode bits against the
attributes we return (``default_permissions``). Reads and writes on an open file use the
opener's credentials, as the kernel NFS client does. Operations that run as root instead, and
why: docs/nfs-client.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time

from offloadfs import fusebinding as fuse

from .binding import (
    OPEN_FLAGS,
    READ_MAX,
    NfsError,
    NfsStat64,
    NfsStatvfs64,
    Timeval,
    chown_path,
    libc,
)
from .context import Context
from .creds import ROOT, caller
from .logs import log, show_args, show_path, show_result, warn
from .pool import Handle, Server
from .retry import once_more_if_broken
from .rpc import FILE_SYNC4, UNSTABLE4, RawRefused

IO_SIZE = 1024 * 1024      # what we ask FUSE for (libfuse 2 caps requests at 128 KiB)
RENEW_AFTER = 15.0         # seconds an open file may stay idle before a keepalive READ
KEEPALIVE_EVERY = 5.0      # how often the keepalive thread looks
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _stat_dict(st: NfsStat64) -> dict:
    """FUSE attributes (times in ns) from an nfs_stat_64."""
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
    """The FUSE operations, each made on the NFS server as the calling process.

    libfuse (multithreaded) calls them from its threads, one request each; ``init`` starts the
    keepalive thread, which renews idle open files' leases; ``destroy`` stops it."""

    use_ns = True
    reads_into_buffer = True   # mfusepy (fusebinding): read(..., into=libfuse's buffer)
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
        if log.isEnabledFor(logging.DEBUG):
            self._log_requests()

    # -- plumbing ------------------------------------------------------------------------

    def _log_requests(self) -> None:
        """Wrap every FUSE operation we define so that it logs a debug line per request (in
        the instance: mfusepy calls the operations directly, fusepy through getattr)."""
        for op, method in vars(NfsFuse).items():
            if callable(method) and not op.startswith("_") and op in vars(fuse.Operations):
                setattr(self, op, self._logged(op, getattr(self, op)))

    @staticmethod
    def _logged(op: str, fn):
        """``fn`` with a debug line per call: arguments, result or errno, time taken."""
        @functools.wraps(fn)
        def logged(*args):
            start = time.monotonic()
            try:
                result = fn(*args)
            except fuse.FuseOSError as exc:
                log.debug("%s %s -> %s (%.1f ms)", op, show_args(args),
                          errno.errorcode.get(exc.errno), (time.monotonic() - start) * 1000)
                raise
            log.debug("%s %s -> %s (%.1f ms)", op, show_args(args), show_result(result),
                      (time.monotonic() - start) * 1000)
            return result
        return logged

    @contextlib.contextmanager
    def _meta_context(self):
        """A locked context of the meta pool, given back afterwards."""
        ctx = self.server.take("meta")
        try:
            with ctx.lock:
                yield ctx
        finally:
            self.server.give("meta", ctx)

    @contextlib.contextmanager
    def _file_context(self):
        """A locked context of the file pool, given back if the body fails with NfsError (else
        the caller keeps it for the file it opened)."""
        ctx = self.server.take("file")
        try:
            with ctx.lock:
                yield ctx
        except NfsError:
            self.server.give("file", ctx)
            raise

    def _on_meta(self, what: str, creds: tuple, fn):
        """``fn(ctx)`` on a meta context as ``creds``; a context that broke is replaced and the
        call tried once more."""
        def attempt(ctx: Context):
            ctx.use(creds)
            return fn(ctx)

        return once_more_if_broken(
            self._meta_context, attempt,
            lambda _ctx: log.debug("retrying %s on a new connection", what))

    def _meta(self, fname: str, *args, creds: tuple | None = None) -> int:
        """``fname`` on a meta context as ``creds`` (default: the caller), see _on_meta."""
        creds = caller() if creds is None else creds
        return self._on_meta(fname, creds, lambda ctx: ctx.call(fname, *args))

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

    def _as_opener(self, handle: Handle, what: str, path: str | None, fn):
        """``fn(ctx)`` on the handle's (locked) context as its opener; if the context broke or
        the server lost our open state, reopen by path and try once more."""
        def attempt(ctx: Context):
            if ctx.broken:
                raise NfsError(errno.EIO, "connection lost", what)
            ctx.use(handle.creds)
            return fn(ctx)

        return once_more_if_broken(lambda: self._locked(handle), attempt,
                                   lambda ctx: self._reopen(handle, ctx, path))

    def _in_parallel(self, handle: Handle, what: str, path: str | None, fn):
        """``fn(ctx)`` on a meta context as the handle's opener, so that an open file has as
        many requests in flight as FUSE sends (the open's stateid is good on any connection:
        NFSv4.0 has no sessions); if that context broke or the server lost our open state,
        reopen by path and try once more (on another meta context)."""
        owner = handle.ctx

        def attempt(ctx: Context):
            nonlocal owner
            owner = handle.ctx
            ctx.use(handle.creds)
            return fn(ctx)

        return once_more_if_broken(self._meta_context, attempt,
                                   lambda _ctx: self._reopen(handle, owner, path))

    def _on_handle(self, handle: Handle, fname: str, *args, path: str | None = None) -> int:
        """``fname(nfs, fh, *args)`` on the handle's context, see _as_opener."""
        def call(ctx: Context) -> int:
            ret = ctx.call(fname, handle.fh, *args)
            handle.renewed()
            return ret

        return self._as_opener(handle, fname, path, call)

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
        log.info("reopened %r after losing its NFS state", show_path(handle.path))

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
                      show_path(path), creds[0])
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
                    warn("renewal", "lease renewal for %r failed: %s",
                         show_path(handle.path), exc.message)
                finally:
                    ctx.lock.release()
            self.server.expire_idle()

    def _renew(self, handle: Handle, ctx: Context) -> None:
        """A 0-byte READ with the open's stateid: renews the lease of ``ctx``'s NFSv4 client
        (libnfs 4.0 never sends RENEW), on ``ctx``: the handle's own or a meta context. Caller
        holds ``ctx.lock``."""
        ctx.use(handle.creds)
        ctx.call("nfs_pread", handle.fh, 0, 0, self._zero)
        handle.renewed()

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
        uid, gid, groups = caller()
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
        self._meta("nfs_chown", chown_path(self.server.abi, _b(path)), uid, gid, creds=ROOT)

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
        def listing(ctx: Context) -> list:
            entries = [(".", None, 0), ("..", None, 0)]
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
                    attrs = {"st_mode": stat.S_IFMT(ent.contents.mode), "st_ino": 0xFFFFFFFF}
                    entries.append((name.decode("latin-1"), attrs, 0))
            finally:
                self.server.lib.nfs_closedir(ctx.nfs, d)
            return entries

        return self._on_meta("nfs_opendir", caller(), listing)

    def readlink(self, path):
        """The symlink's target."""
        out = ctypes.c_void_p()
        self._meta("nfs_readlink2", _b(path), ctypes.byref(out))
        try:
            return ctypes.string_at(out.value).decode("latin-1")
        finally:
            libc.free(out)

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
        return once_more_if_broken(self._file_context, lambda ctx: (ctx, fn(ctx)),
                                   lambda _ctx: None)

    def open(self, path, fi):
        """Open on a context of its own, as the caller."""
        handle = Handle(_b(path), fi.flags, caller())
        ctx, fh = self._on_file_context(
            lambda ctx: self._nfs_open(ctx, handle.path, fi.flags, handle.creds))
        handle.opened(ctx, fh)
        return self._register(handle, fi)

    def create(self, path, mode, fi):
        """Create as the caller: an exclusive create (the only kind that honours ``mode`` in
        libnfs 4.0), else open the file that exists (EEXIST if O_EXCL); then fix the times."""
        creds = caller()
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

    def read(self, path, size, offset, fi, into: int | None = None):
        """pread, READ_MAX bytes at most per READ, until ``size`` bytes or EOF, into memory at
        ``into`` (the byte count; fusebinding gives libfuse's buffer) or a new bytes object; on
        a meta context, so that reads of one file run in parallel."""
        handle = self._handle(fi)
        size = min(size, IO_SIZE)
        buf = None if into else ctypes.create_string_buffer(size)
        base = into or ctypes.addressof(buf)

        def read(ctx: Context) -> int:
            got = 0
            while got < size:
                n = ctx.call("nfs_pread", handle.fh, offset + got, min(size - got, READ_MAX),
                             base + got)
                if n == 0:
                    break
                got += n
            handle.renewed()
            return got

        got = self._in_parallel(handle, "nfs_pread", path, read)
        return got if into else ctypes.string_at(buf, got)

    def write(self, path, data, offset, fi):
        """pwrite (at the server's end of file with O_APPEND); on a meta context, so that writes
        of one file run in parallel, except with O_APPEND: its fstat and write stay together on
        the handle's context."""
        handle = self._handle(fi)

        def write(ctx: Context) -> int:
            at = offset
            if handle.flags & os.O_APPEND:
                st = NfsStat64()
                ctx.call("nfs_fstat64", handle.fh, ctypes.byref(st))
                at = st.nfs_size
            handle.dirty = True
            if handle.raw:
                stable = FILE_SYNC4 if handle.flags & os.O_SYNC else UNSTABLE4
                try:
                    n = ctx.raw.write(handle.fh_bytes, at, data, handle.creds, stable)
                    if time.monotonic() - handle.ctx.renewed > RENEW_AFTER:
                        self._renew(handle, ctx)  # raw WRITEs renew no lease
                    return n
                except RawRefused as exc:
                    handle.raw = False
                    log.info("raw WRITE of %r refused (%s): writing through libnfs",
                             show_path(handle.path), exc)
            n = ctx.pwrite(handle.fh, at, data)
            handle.renewed()
            return n

        if handle.flags & os.O_APPEND:
            return self._as_opener(handle, "nfs_pwrite", path, write)
        return self._in_parallel(handle, "nfs_pwrite", path, write)

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
                        log.info("raw COMMIT of %r refused (%s)", show_path(handle.path), exc)
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
                    warn("close", "close of %r failed: %s", show_path(handle.path),
                         exc.message)
                    ctx.broken = True
        self.server.give("file", ctx)
