"""The program inside each shim file, and the little protocol it speaks with the mount.

A shim is a ``/bin/sh`` script (dash starts in ~1.5 ms; ``python3 -I -S`` needs ~11 ms here,
see docs/shim.md). Run as ``convert in.png out.png`` it:

1. opens its own file read-write (``exec 3<>"$0"``): the mount sees a *control open* and, from
   the FUSE request, the shim's pid; from then on the agent knows the caller (credentials, cwd,
   environment from /proc, stdio through pidfd_getfd);
2. writes its path and its arguments, each followed by a NUL byte (the path first, so that
   no arguments is not one empty argument);
3. reads one reply line, which blocks until the job is over:

       <status>          exit with this status (the job's, or 255 for an offload error)
       s <signal>        the job died of this signal: die of it too
       x <path>          run locally: exec this command (the next one on PATH after the mount)

Signals the shim receives stay pending while it waits in the read; the agent sees them in
/proc/PID/status and forwards them to the job. The traps only keep the shim alive until the
reply tells it how to end.
"""
from __future__ import annotations

import os
import signal

FORWARDED = ("INT", "TERM", "HUP", "QUIT", "USR1", "USR2", "WINCH")
# Signals the shim re-raises on itself when the job died of them; the rest (those that dump
# core, or are not fatal) end it with 128+N instead.
RERAISED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL,
                      signal.SIGPIPE, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2})

TEMPLATE = """#!/bin/sh
# offloadfs shim for {name}: runs it on a compute host (see: offloadfs status).
trap : {signals}
exec 3<>"$0" || exit 255
printf '%s\\0' "$0" "$@" >&3
read -r st arg <&3
exec 3<&-
case $st in
x) trap - {signals}; exec "$arg" "$@" ;;
s) trap - "$arg"; kill -s "$arg" $$ ;;
esac
exit "$st"
"""


def script(name: str) -> bytes:
    """The shim file's content for command ``name``."""
    return TEMPLATE.format(name=name, signals=" ".join(FORWARDED)).encode()


def parse_args(data: bytes) -> list[bytes]:
    """The arguments the shim wrote (NUL-terminated, after its own path)."""
    return data.split(b"\0")[1:-1]


def reply_status(status: int) -> bytes:
    """Reply: exit with ``status``."""
    return f"{status & 0xFF}\n".encode()


def reply_signal(signum: int) -> bytes:
    """Reply: the job died of ``signum``; the shim dies of it too when that is safe."""
    if signum in RERAISED:
        return f"s {signal.Signals(signum).name[3:]}\n".encode()
    return reply_status(128 + signum)


def reply_local(path: str) -> bytes:
    """Reply: run ``path`` locally with the shim's own arguments, environment and fds."""
    return b"x " + os.fsencode(path) + b"\n"
