"""NFSv4 WRITE and COMMIT built by hand: the ONC RPC record, AUTH_SYS and COMPOUND XDR, on a TCP
connection of their own (libnfs 4.0 cannot send a WRITE larger than ~3.9 KiB; see
docs/nfs-client.md)."""
from __future__ import annotations

import errno
import random
import socket
import struct
from typing import TYPE_CHECKING

from .binding import NFS_V4, NfsError
from .creds import MACHINE
from .logs import warn

if TYPE_CHECKING:
    from .context import Context
    from .pool import Server

NFS4_PROGRAM, NFSPROC4_COMPOUND = 100003, 1
OP_COMMIT, OP_PUTFH, OP_WRITE = 5, 22, 38
UNSTABLE4, FILE_SYNC4 = 0, 2
RAW_WRITE_MAX = 1024 * 1024  # nfs-ganesha's default MaxWrite


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
    allow) raises RawRefused and the caller falls back to libnfs for that handle. Called from
    FUSE threads (write, flush, fsync) holding the owner context's lock."""

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
            warn("raw", "%s: raw WRITE/COMMIT failed: %s", self.server, what)
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
