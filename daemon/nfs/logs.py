"""What the NFS client logs: the shared logger, throttled warnings, and paths, requests and
results shown for debug lines."""
from __future__ import annotations

import logging
import time

from offloadfs import fusebinding as fuse

log = logging.getLogger("nfsfuse")

WARN_EVERY = 5.0
_warned: dict[str, float] = {}


def warn(kind: str, fmt: str, *args) -> None:
    """log.warning, at most once per WARN_EVERY seconds for each ``kind`` (a server that went
    away fails every request); the others go to the debug log."""
    now = time.monotonic()
    if now - _warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
        _warned[kind] = now
        log.warning(fmt, *args)
    else:
        log.debug(fmt, *args)


def show_path(path) -> str:
    """A path for the log."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "replace")
    if isinstance(path, str):
        return path.encode("latin-1", "replace").decode("utf-8", "replace")
    return repr(path)


def show_args(args) -> str:
    """Request arguments for a debug line (data as its length)."""
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            out.append(f"<{len(arg)} bytes>")
        elif isinstance(arg, str):
            out.append(show_path(arg))
        elif isinstance(arg, fuse.fuse_file_info):
            out.append(f"fh={arg.fh} flags={arg.flags:#o}")
        else:
            out.append(repr(arg))
    return " ".join(out)


def show_result(result) -> str:
    """A result for a debug line."""
    if isinstance(result, bytes):
        return f"<{len(result)} bytes>"
    if isinstance(result, list):
        return f"<{len(result)} entries>"
    return repr(result)
