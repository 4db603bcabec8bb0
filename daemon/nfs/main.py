"""The entry point of the host's userspace NFSv4 client: a FUSE filesystem over libnfs.

The host's kernel has no NFS client, so the daemon starts one of these per (server, export)::

    python -m offloadd.nfs SERVER[:PORT] EXPORT MOUNTPOINT [--foreground] [-v]
                           [--timeout SECONDS] [--write-path raw|libnfs]

It mounts EXPORT of SERVER (NFSv4 over TCP, AUTH_SYS) at MOUNTPOINT with ``allow_other`` and
``default_permissions`` (whose credentials each call carries: ops.py).

Readiness: the mount point shows up in /proc/self/mountinfo (fstype ``fuse.offloadnfs``) once the
kernel mount exists (requests made before libfuse answers the kernel's INIT wait for it), and
the process logs ``mounted SERVER:PORT:EXPORT`` right after that answer. On SIGTERM/SIGINT
libfuse leaves its loop, the file system is unmounted, ``unmounted ...`` is logged and the
process exits 0 (a signal in the instant between the mount and libfuse installing its handlers,
i.e. before the ``mounted`` line, kills it instead). ``auto_unmount`` unmounts the file system
if the process dies. Exit status 1: bad arguments or the server could not be reached at start
(the last line on stderr says why). The process does not exit when the server goes away: calls
fail with EIO and work again once it is back.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os

from offloadfs import fusebinding as fuse
from offloadfs import logsetup
from offloadfs.settings import ConfigError, host_port

from .binding import LibnfsUnavailable, NfsError, NfsStat64, load_libnfs
from .logs import log
from .ops import IO_SIZE, NfsFuse
from .pool import Server

DEFAULT_PORT = 2049


def parse_server(text: str) -> tuple[str, int]:
    """SERVER[:PORT] -> (host, port); ValueError if malformed."""
    try:
        return host_port(text, DEFAULT_PORT)
    except ConfigError:
        raise ValueError(f"bad server {text!r}: expected HOST[:PORT]") from None


def mount_options(server: str, export: str) -> dict:
    """The mount's options (as for libfuse 2: fusebinding adapts them to libfuse 3)."""
    fsname = f"offloadnfs#{server}:{export}".replace(",", "_").replace(" ", "_")
    return {"allow_other": True, "default_permissions": True, "auto_unmount": True,
            "fsname": fsname, "subtype": "offloadnfs", "use_ino": True,
            "attr_timeout": 1, "entry_timeout": 1, "negative_timeout": 0,
            "big_writes": True, "max_read": IO_SIZE, "max_write": IO_SIZE,
            "max_readahead": IO_SIZE}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m offloadd.nfs",
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
    parser.add_argument("--write-path", choices=("raw", "libnfs"), default=None,
                        help="libnfs: through libnfs (one WRITE per FUSE write with libnfs 5, "
                             "pipelined 3.7 KiB WRITEs with libnfs 4.0); raw: one WRITE per "
                             "FUSE write, sent by hand (default with libnfs 4.0 only)")
    return parser.parse_args(argv)


def probe(server: Server) -> None:
    """lstat the export's root on a meta context: NfsError now if the server cannot be
    reached."""
    ctx = server.take("meta")
    with ctx.lock:
        ctx.call("nfs_lstat64", b"/", ctypes.byref(NfsStat64()))
    server.give("meta", ctx)


def main(argv: list[str] | None = None) -> int:
    """Mount, serve until unmounted or signalled, exit 0."""
    args = parse_args(argv)
    logsetup.setup("nfsfuse[%(process)d]", args.verbose, timestamps=True)
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
        lib, abi = load_libnfs()
    except LibnfsUnavailable as exc:
        log.error("%s", exc)
        return 1
    raw = args.write_path == "raw" if args.write_path else not abi.large_writes
    log.info("using %s, %s writes; FUSE: %s on libfuse %d.%d", abi, "raw" if raw else "libnfs",
             fuse.BINDING, *fuse.LIBFUSE)
    server = Server(lib, abi, host, port, args.export, args.timeout, raw)
    try:  # fail now, with a clear line, if the server cannot be reached
        probe(server)
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
