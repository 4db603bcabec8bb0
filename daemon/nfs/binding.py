"""The ctypes binding of libnfs 4.0 (Debian 12's libnfs13) and 5.x (Debian 13's libnfs14): which
one loads and what it can do, its structs, the prototypes of every function we call, its limits,
and how its return values map to errno (see docs/nfs-client.md)."""
from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

from offloadfs import fusebinding as fuse

LIBNFS_ENV = "OFFLOADFS_LIBNFS"          # a path to load instead (tests, a private build)
SONAMES = ("libnfs.so.14", "libnfs.so.13")  # libnfs 5.x, 4.0: the newest that loads
NFS_V4 = 4
WRITE_CHUNK = 3744         # fits libnfs 4.0's 4 KiB encode buffer with a 128-byte fh, 16 groups
READ_MAX = 1024 * 1024     # a larger READ breaks libnfs 4.0's connection
OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC  # what libnfs understands
TRANSPORT = {errno.EIO, errno.EFAULT, errno.EINTR}  # libnfs: lost connection, RPC error, timeout
STATE = errno.ERANGE       # libnfs maps NFSv4 state errors (EXPIRED, BAD_STATEID...) to ERANGE


class LibnfsUnavailable(Exception):
    """No libnfs we can use; the text is one line for the log."""


class Abi(NamedTuple):
    """What the loaded libnfs is and can do (from the symbols it exports, not its name)."""

    name: str              # what was loaded (a soname or the OFFLOADFS_LIBNFS path)
    large_writes: bool     # libnfs >= 5.0: an NFSv4 WRITE may carry more than ~3.9 KiB

    @property
    def chown_sets_parent(self) -> bool:
        """libnfs 5.x's nfs_chown(path) SETATTRs the path's *parent* (1336b52 made it look up
        the split path's directory; 4.0 opened the file): give it PATH/- instead."""
        return self.large_writes

    def __str__(self) -> str:
        return f"{self.name} (libnfs {'5' if self.large_writes else '4.0'})"


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


class NfsFh(ctypes.Structure):
    """struct nfs_fh (what nfs_get_fh returns): the NFS file handle of an open file."""

    _fields_ = [("len", ctypes.c_int), ("val", ctypes.c_void_p)]


# void (*nfs_cb)(int err, struct nfs_context *nfs, void *data, void *private_data)
NFS_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

_P, _S, _I, _U64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64
_PP = ctypes.POINTER(ctypes.c_void_p)
SIGNATURES = {  # name: (restype, argtypes), from nfsc/libnfs.h of libnfs 4.0.0 (same in 5.x)
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


def open_libnfs(override: str | None, dlopen=ctypes.CDLL):
    """(library, name): ``override`` if given, else the first of SONAMES that ``dlopen``
    loads; LibnfsUnavailable with every loader error otherwise."""
    errors = []
    for name in [override] if override else SONAMES:
        try:
            return dlopen(name), name
        except OSError as exc:
            errors.append(str(exc))
    raise LibnfsUnavailable("the userspace NFS client needs libnfs (libnfs13 or libnfs14): "
                            + "; ".join(errors))


def abi_of(lib, name: str) -> Abi:
    """What ``lib`` can do: libnfs 5.0 added rpc_nfs4_compound_async2 (the NFSv4 WRITE buffer
    sized for its data); libnfs 6 dropped nfs_create and reordered nfs_pread/nfs_pwrite's
    arguments (buffer, count, offset), which this binding does not speak."""
    if not hasattr(lib, "nfs_create"):
        raise LibnfsUnavailable(f"{name} is libnfs 6 or later (no nfs_create, nfs_pwrite's "
                                "arguments reordered); the userspace NFS client needs libnfs "
                                "4.0 or 5.x (libnfs13 or libnfs14)")
    return Abi(name, hasattr(lib, "rpc_nfs4_compound_async2"))


def chown_path(abi: Abi, path: bytes) -> bytes:
    """What to give nfs_chown to change ``path`` (see Abi.chown_sets_parent)."""
    return path.rstrip(b"/") + b"/-" if abi.chown_sets_parent else path


def load_libnfs(override: str | None = None, dlopen=ctypes.CDLL) -> tuple[ctypes.CDLL, Abi]:
    """libnfs (``override``, else $OFFLOADFS_LIBNFS, else the newest of SONAMES) with the
    prototypes of every function we call, and its Abi; LibnfsUnavailable if none fits."""
    lib, name = open_libnfs(override or os.environ.get(LIBNFS_ENV), dlopen)
    abi = abi_of(lib, name)
    for fname, (restype, argtypes) in SIGNATURES.items():
        try:
            func = getattr(lib, fname)
        except AttributeError:
            raise LibnfsUnavailable(f"{name} has no {fname}: not libnfs 4.0 or 5.x") from None
        func.restype, func.argtypes = restype, argtypes
    return lib, abi


libc = ctypes.CDLL(None)  # free() for what libnfs allocates for us (nfs_readlink2)
libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None


class NfsError(fuse.FuseOSError):
    """A failed libnfs call: ``errno`` for the caller, ``message`` from nfs_get_error."""

    def __init__(self, err: int, message: str, call: str):
        super().__init__(err)
        self.message = message
        self.call = call


def errno_of(ret: int, message: str) -> int:
    """The errno for a negative libnfs return value."""
    err = -ret
    if err == errno.EPERM and "NFS4ERR_PERM" not in message:
        return errno.EIO  # -1: the call could not even be queued (encode error, no memory)
    return err
