"""The pools of libnfs contexts per server ("meta" ones, holding no opens, for path operations and
for the reads and writes of open files; "file" ones that each hold one open file) and the open
file's handle (why so many contexts: docs/nfs-client.md)."""
from __future__ import annotations

import ctypes
import os
import threading
import time

from .binding import Abi, NfsFh
from .context import Context

IDLE_CONTEXTS = {"meta": 64, "file": 8}  # idle contexts kept per pool (meta: one per request
                                         # in flight, e.g. fio's iodepth 32)
IDLE_MAX = 30.0            # an idle context older than this is closed (its lease would lapse)


class Server:
    """Where the export lives, and pools of connected contexts.

    FUSE threads take a context (``take``) and give it back (``give``); the keepalive thread
    calls ``expire_idle``; ``lock`` guards the pools only."""

    def __init__(self, lib: ctypes.CDLL, abi: Abi, host: str, port: int, export: str,
                 timeout: float, raw_writes: bool = True):
        """Nothing is connected until a context is asked for. ``abi``: what ``lib`` can do;
        ``raw_writes``: WRITE through :class:`RawWriter` (else only through libnfs)."""
        self.lib, self.abi, self.host, self.port, self.export = lib, abi, host, port, export
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
            if not ctx.broken and not self.closed and len(self.idle[kind]) < IDLE_CONTEXTS[kind]:
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
    """An open file: the context that opened it (its NFSv4 client holds the open) and the
    libnfs file handle.

    NfsFuse makes it on open/create; FUSE threads read and write with ``fh`` on meta contexts
    (NFSv4.0 has no sessions: the open's stateid is good on any connection), and make the
    other calls on ``ctx`` holding its lock, as does the keepalive thread; NfsFuse._reopen moves
    it to a fresh context when its NFS state is lost."""

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

    def renewed(self) -> None:
        """A call with the open's stateid just renewed the lease of its NFSv4 client (made on
        any context: the stateid names the client)."""
        self.ctx.renewed = time.monotonic()
