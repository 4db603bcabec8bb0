"""The program inside each shim file, and the little protocol it speaks with the mount.

A shim is the compiled program ``offloadfs/_shim`` (``_shim.c``, built by setup.py where a C
compiler is: it starts in ~0.4 ms) or else a ``/bin/sh`` script (dash and the script ~0.7 ms;
``python3 -I -S`` needs ~11 ms here, see docs/shim.md); both speak the protocol below, the
program step for step as the script. Run as ``convert in.png out.png`` it:

1. opens its control file ``MOUNT/.ctl/NAME`` read-write: the mount sees a *control open* and,
   from the FUSE request, the shim's pid; from then on the agent knows the caller (credentials,
   cwd, environment from /proc, stdio through pidfd_getfd). Not the shim file itself: the
   kernel refuses to exec a file open for writing, so a second run of the same command would
   fail with ETXTBSY while the first waits. An open that fails (the mount died after the exec)
   ends the shim with 255 and the shell's line saying why (``command exec``: a plain ``exec``
   whose redirection fails ends dash with 2 before ``|| exit 255`` runs);
2. writes its path, the number of its arguments and the arguments, each followed by a NUL
   byte, then the name of a signal it caught before now, if any;
3. reads reply lines, each read blocking until the mount has one; the last comes when the
   job is over:

       t <settings>      the caller's terminal settings (``stty -g``), sent before the mount
                         makes the terminal raw: restored with stty if the mount dies
       z <signal>        the job stopped on the host: stop the caller's process group with
                         this signal (the shell shows it Stopped); once continued, write
                         ``c`` NUL and read on
       <status>          exit with this status (the job's, or 255 for an offload error);
                         an empty line is status 0: dash reads a byte per read(2), each a
                         FUSE request, so the commonest reply is one byte, one request
       s <signal>        the job died of this signal: die of it too
       x <path>          run locally: exec this command (the next one on PATH after the mount)

   A read that fails (the mount is gone) ends the shim with 255 and one line (unless the
   mount's own line came with part of a reply), after putting the terminal's settings back
   with the system's stty (``command -p``: not a shim of the mount).

Signals the shim receives stay pending while it waits in the read; the agent sees them in
/proc/PID/status and forwards them to the job. A signal that arrives before the read is caught
by a trap and written after the arguments. The traps keep the shim alive until the reply tells
it how to end.
"""
from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

from .protocol import FORWARDED_SIGNALS as FORWARDED  # what the traps catch, by name

CONTINUED = b"c"   # what a shim writes when it runs again after a ``z`` reply
# Signals the shim re-raises on itself when the job died of them; the rest (those that dump
# core, or are not fatal) end it with 128+N instead.
RERAISED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL,
                      signal.SIGPIPE, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2})

# The traps record the first signal caught before the blocking read, which is then sent after
# the arguments: a Ctrl-C in the first moments is not lost. Signals during the read stay
# pending and the agent sees them in /proc.
TEMPLATE = """#!/bin/sh
# offloadfs shim for {name}: runs it on a compute host (see: offloadfs status).
s='' t=''
{traps}
trap : TSTP
command exec 3<>{ctl} || exit 255
printf '%s\\0' "$0" $# "$@" >&3
[ -z "$s" ] || printf '%s\\0' "$s" >&3
while read -r st arg <&3; do
case $st in
t) t=$arg ;;
z) trap - TSTP; kill -s "$arg" 0; trap : TSTP; printf 'c\\0' >&3 ;;
x) exec 3<&-; trap - {signals} TSTP; [ -z "$s" ] || kill -s "$s" $$; exec "$arg" "$@" ;;
s) exec 3<&-; trap - "$arg"; kill -s "$arg" $$; exit 255 ;;
*) exec 3<&-; exit "${{st:-0}}" ;;
esac
done
[ -z "$t" ] || command -p stty "$t" 2>/dev/null
[ -n "$st" ] || echo "offloadfs: $0: the offloadfs mount went away while it ran" >&2
exit 255
"""


CTL = ".ctl"
PROGRAM = Path(__file__).with_name("_shim")   # setup.py builds it from _shim.c
CHOICE = "OFFLOADFS_SHIM"                     # "script": serve the script even so


def program() -> bytes | None:
    """The compiled shim's bytes (every shim file's content), or None: not built, or the
    environment asks for the script."""
    if os.environ.get(CHOICE) == "script":
        return None
    try:
        return PROGRAM.read_bytes()
    except OSError:
        return None


def script(name: str, root: str) -> bytes:
    """The content of shim ``name`` in the mount at ``root``."""
    traps = "\n".join(f"trap 's=${{s:-{sig}}}' {sig}" for sig in FORWARDED)
    ctl = shlex.quote(os.path.join(root, CTL, name))
    return TEMPLATE.format(name=name, signals=" ".join(FORWARDED), traps=traps, ctl=ctl).encode()


class BadRequest(ValueError):
    """What a shim wrote is not path, count, arguments and signal names."""


def parse_request(data: bytes) -> tuple[list[bytes], list[int]]:
    """(arguments, signals caught before the read) from what the shim wrote: its path, the
    number of arguments, the arguments, then signal names, each NUL-terminated."""
    fields = data.split(b"\0")
    if len(fields) < 3 or fields[-1] != b"" or not fields[1].isdigit():
        raise BadRequest("expected path, count and arguments")
    count, body = int(fields[1]), fields[2:-1]
    args, rest = body[:count], body[count:]
    if len(args) != count:
        raise BadRequest(f"expected {count} arguments, got {len(args)}")
    return args, [_signum(name) for name in rest]


def _signum(name: bytes) -> int:
    """The number of a forwarded signal's name (INT), or BadRequest."""
    text = name.decode(errors="replace")
    if text not in FORWARDED:
        raise BadRequest(f"unexpected signal name {text!r}")
    return int(signal.Signals["SIG" + text])


def reply_status(status: int) -> bytes:
    """Reply: exit with ``status`` (0: an empty line, one byte for the shim to read)."""
    status &= 0xFF
    return f"{status}\n".encode() if status else b"\n"


def reply_signal(signum: int) -> bytes:
    """Reply: the job died of ``signum``; the shim dies of it too when that is safe."""
    if signum in RERAISED:
        return f"s {signal.Signals(signum).name[3:]}\n".encode()
    return reply_status(128 + signum)


def reply_stopped(signum: int) -> bytes:
    """Line: the job stopped on the host; the shim stops its process group likewise."""
    return f"z {signal.Signals(signum).name[3:]}\n".encode()


def reply_settings(stty: str) -> bytes:
    """Line: the caller's terminal settings, for the shim to restore if the mount dies."""
    return f"t {stty}\n".encode()


def reply_local(path: str) -> bytes:
    """Reply: run ``path`` locally with the shim's own arguments, environment and fds."""
    return b"x " + os.fsencode(path) + b"\n"
