"""Start-up floor of the two shim designs: a Python shim passing its fds vs the sh shim.

The question the shim issue weighed: is a shim written in Python (``python3 -I -S``, which
connects to a Unix socket and hands over its stdin, stdout and stderr with SCM_RIGHTS) fast
enough, or must it be a ``/bin/sh`` script that talks to the mount through its own file? Every
row below runs a command to completion from this process (fork, exec, wait: the same harness
for every row, whose own floor is the ``/bin/true`` row), interleaved one of each per round.

- The Python shim rows are a *floor*: the echo server is a thread of this process that only
  receives the fds and the arguments, reads SO_PEERCRED, closes the fds and replies one status
  byte at once. No job runs, nothing is looked up in /proc, no network.
- ``sh_control`` is the sh design's equivalent floor against the real mount: a sh script opens
  ``MOUNTPOINT/true`` read-write, writes its arguments and reads the reply, on a second mount of
  the same daemon where ``true``'s policy is ``never``. The mount does its real per-call work
  (reads the caller's /proc entries, takes its fds with pidfd_getfd, decides "run locally",
  finds ``true`` on the caller's PATH) and replies at once; the script checks that the reply is
  ``x PATH`` and exits without running it.
- ``sh_shim`` is the sh shim end to end: ``MOUNTPOINT/true`` of a mount serving the script
  (``OFFLOADFS_SHIM=script``), the job run by the daemon; the mount's counters must show every
  run offloaded. ``program_shim`` is the same through the compiled shim (``offloadfs/_shim``,
  what a mount serves where it was built): the shim a user gets.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from offloadfs import shim

from .common import (
    BenchError,
    Shims,
    daemon,
    machine_info,
    md_table,
    print_table,
    publish,
    pyplot,
    shims,
    summary,
    timed_run,
)

NAME = "shim_designs"
RUNS, QUICK_RUNS = 200, 30
WARMUP, QUICK_WARMUP = 5, 3
DAEMON_COMMANDS = {"true": "/bin/true"}
SYSTEM_PYTHON = "/usr/bin/python3"
ARGS = ["in.png", "-blur", "0x8", "out.png"]   # what every shim row passes as its arguments
PEERCRED = struct.Struct("3i")                # struct ucred: pid, uid, gid

PY_SHIM = """#!{python} -IS
# shim_designs: a Python shim's floor. Connect, hand over fds 0-2 and argv, wait for a status.
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({socket_path!r})
data = b"".join(os.fsencode(a) + b"\\0" for a in sys.argv)
sent = socket.send_fds(s, [data], [0, 1, 2])
s.sendall(data[sent:])
s.shutdown(socket.SHUT_WR)
status = s.recv(1)
sys.exit(status[0] if status else 255)
"""

PY_SHIM_LEAN = """#!{python} -IS
# shim_designs: the leanest Python shim: the _socket extension only, no socket.py (whose
# imports of selectors, enum and collections cost about as much as the interpreter's start).
import _socket, sys
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
s.connect({socket_path!r})
data = b"".join(a.encode("utf-8", "surrogateescape") + b"\\0" for a in sys.argv)
fds = b"".join(n.to_bytes(4, sys.byteorder) for n in (0, 1, 2))
sent = s.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
while sent < len(data):
    sent += s.send(data[sent:])
s.shutdown(_socket.SHUT_WR)
status = s.recv(1)
sys.exit(status[0] if status else 255)
"""

SH_CONTROL = """#!/bin/sh
# shim_designs: the sh shim's protocol without a job. The mount's policy for true is never, so
# its reply is "x PATH" (run locally) at once; check it and exit without running PATH.
trap : {signals}
exec 3<>{control} || exit 255
printf '%s\\0' "$0" $# "$@" >&3
read -r st arg <&3
exec 3<&-
[ "$st" = x ] && [ -n "$arg" ] || exit 1
exit 0
"""


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured command: a short name (the JSON key prefix), a plot label, what it
    measures (one sentence), its argv, its group (baseline, python or sh) and the text of the
    script it runs, if any."""

    name: str
    label: str
    what: str
    argv: list[str]
    group: str
    script: str = ""


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("-n", "--runs", type=int, help=f"runs per row (default {RUNS}, "
                        f"--quick {QUICK_RUNS})")


# --- the Python design's echo server --------------------------------------------------------

class EchoServer:
    """A Unix socket served by a thread: per connection, receive the fds and the NUL-separated
    argv until EOF, read SO_PEERCRED, close the fds, reply one status byte (0)."""

    def __init__(self, path: Path):
        """Listen at ``path``; serve once :meth:`start` is called."""
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.sock.settimeout(0.2)             # accept() wakes up to notice stop()
        self.served = 0
        self.errors: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="echo-server", daemon=True)

    def start(self) -> None:
        """Serve on the thread."""
        self._thread.start()

    def stop(self) -> None:
        """End the thread and close the socket."""
        self._stopping = True
        self._thread.join()
        self.sock.close()

    def _serve(self) -> None:
        """Accept connections until stopped."""
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    self._one(conn)
                except (OSError, ValueError) as exc:
                    self.errors.append(str(exc))

    def _one(self, conn: socket.socket) -> None:
        """One shim: its fds, argv and credentials, then the reply."""
        conn.settimeout(10)
        space = socket.CMSG_SPACE(3 * 4)
        data, ancdata, _, _ = conn.recvmsg(65536, space, socket.MSG_CMSG_CLOEXEC)
        fds = [fd for level, kind, raw in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) // 4 * 4])]
        try:
            while chunk := conn.recv(65536):
                data += chunk
            pid, _, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        PEERCRED.size))
            if len(fds) != 3 or pid <= 0 or data.split(b"\0")[1:-1] != [a.encode() for a in ARGS]:
                raise ValueError(f"got {len(fds)} fds, pid {pid}, argv {data!r}")
        finally:
            for fd in fds:
                os.close(fd)
        conn.sendall(b"\0")
        self.served += 1


@contextlib.contextmanager
def echo_server(path: Path) -> Iterator[EchoServer]:
    """An :class:`EchoServer` at ``path``, always stopped."""
    server = EchoServer(path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the rows -------------------------------------------------------------------------------

def pythons() -> list[tuple[str, str, str]]:
    """(name suffix, interpreter, description) of the venv's Python and the system's."""
    found = [("venv", sys.executable, f"venv Python {python_version(sys.executable)}")]
    if os.access(SYSTEM_PYTHON, os.X_OK):
        found.append(("system", SYSTEM_PYTHON,
                      f"{SYSTEM_PYTHON} {python_version(SYSTEM_PYTHON)}"))
    return found


def python_version(python: str) -> str:
    """The version of the interpreter at ``python``."""
    return subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def write_script(path: Path, text: str) -> tuple[str, str]:
    """Write an executable script; its path and its text."""
    path.write_text(text)
    path.chmod(0o755)
    return str(path), text


def rows(tmp: Path, socket_path: Path, real: Shims, scripted: Shims,
         never: Shims) -> list[Row]:
    """The commands measured, with their scripts written to ``tmp``."""
    interpreters = pythons()
    out = [
        Row("true", "/bin/true (harness floor)",
            "fork+exec+wait of /bin/true from this process: the floor every row includes",
            ["/bin/true"], "baseline"),
        Row("sh_start", "/bin/sh -c :",
            "start-up and exit of the shell the shims run in (dash here)",
            ["/bin/sh", "-c", ":"], "baseline"),
    ]
    for suffix, python, desc in interpreters:
        out.append(Row(f"py_start_{suffix}", f"python3 -I -S -c pass ({suffix})",
                       f"start-up and exit of {desc}, isolated, no site: any Python shim's floor",
                       [python, "-I", "-S", "-c", "pass"], "baseline"))
    for suffix, python, _ in interpreters:
        script, text = write_script(tmp / f"py-shim-{suffix}", PY_SHIM.format(
            python=python, socket_path=str(socket_path)))
        out.append(Row(f"py_shim_{suffix}", f"Python shim -> echo thread ({suffix})",
                       f"Python design, floor: a '#!{python} -IS' script connects to a Unix "
                       "socket, sends fds 0-2 (SCM_RIGHTS) and argv, waits for a status byte "
                       "the in-process echo thread sends at once (no job)",
                       [script, *ARGS], "python", text))
    for suffix, python, _ in interpreters:
        script, text = write_script(tmp / f"py-shim-lean-{suffix}", PY_SHIM_LEAN.format(
            python=python, socket_path=str(socket_path)))
        out.append(Row(f"py_shim_lean_{suffix}", f"Python shim, _socket only ({suffix})",
                       "Python design, best case: the same with only the _socket extension "
                       "imported (raw sendmsg with SCM_RIGHTS), not socket.py",
                       [script, *ARGS], "python", text))
    control, text = write_script(tmp / "sh-control", SH_CONTROL.format(
        signals=" ".join(shim.FORWARDED), control=shlex.quote(str(never.path / shim.CTL / "true"))))
    out.append(Row("sh_control", "sh shim protocol, no job (policy never)",
                   "sh design, floor: a sh script opens MOUNTPOINT/.ctl/true read-write, "
                   "writes argv, reads the reply of a mount whose policy for true is never "
                   "(caller's /proc and fds taken, local run decided and not done; no "
                   "network, no job)",
                   [control, *ARGS], "sh", text))
    out.append(Row("sh_shim", "sh shim, real job on offloadd",
                   "sh design, end to end: the script MOUNTPOINT/true, its job run by "
                   "offloadd on this machine (loopback TCP), exit status relayed",
                   [scripted.shim("true"), *ARGS], "sh",
                   shim.script("true", str(scripted.path)).decode()))
    out.append(Row("program_shim", "compiled shim, real job on offloadd",
                   "the sh design's protocol in a static program (offloadfs/_shim.c), end to "
                   "end: MOUNTPOINT/true, its job run by offloadd on this machine",
                   [real.shim("true"), *ARGS], "sh"))
    return out


# --- running --------------------------------------------------------------------------------

def run(opts) -> dict:
    """Measure, print the table, write shim_designs.json and shim_designs.png."""
    runs = opts.runs or (QUICK_RUNS if opts.quick else RUNS)
    warmup = QUICK_WARMUP if opts.quick else WARMUP
    names = list(DAEMON_COMMANDS)
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-shims-") as tmp, \
            daemon(DAEMON_COMMANDS) as d, shims(d, names) as real, shims(d, names) as never, \
            shims(d, names, env={shim.CHOICE: "script"}) as scripted, \
            echo_server(Path(tmp) / "echo.sock") as server:
        never.set_policy("true", "never")
        if shim.program() is None:
            raise BenchError(f"{shim.PROGRAM} is not built (make install builds it)")
        measured = rows(Path(tmp), server.path, real, scripted, never)
        print(f"shim_designs: {runs} runs of each row after {warmup} warm-up, interleaved ...")
        samples = measure(measured, runs, warmup, d.client_env())
        check(measured, server, (real, scripted), never, warmup + runs)
    result = results(measured, samples, warmup)
    report(measured, result)
    publish(NAME, result, plot(measured, result))
    return result


def measure(measured: list[Row], runs: int, warmup: int, env: dict[str, str]) -> dict:
    """Wall times (ms) per row, one of each row per round."""
    samples: dict[str, list[float]] = {r.name: [] for r in measured}
    for i in range(warmup + runs):
        for r in measured:
            ms, _ = timed_run(r.argv, env)
            if i >= warmup:
                samples[r.name].append(ms)
    return samples


def check(measured: list[Row], server: EchoServer, real: tuple[Shims, ...], never: Shims,
          total: int) -> None:
    """Every run did what its row claims: the echo thread served each Python shim run, the
    real shims' jobs all ran on the daemon, the policy-never mount only decided locally."""
    py_rows = sum(r.group == "python" for r in measured)
    if server.errors or server.served != py_rows * total:
        raise BenchError(f"echo server served {server.served} of {py_rows * total}: "
                         f"{server.errors[:3]}")
    for m, want in (*((m, {"jobs": total, "failures": 0, "fallbacks": 0}) for m in real),
                    (never, {"jobs": 0, "failures": 0, "fallbacks": total})):
        stats = m.stats("true")
        if {k: stats[k] for k in want} != want:
            raise BenchError(f"{m.path}/true: expected {want}, the mount counted {stats}:\n"
                             + m.log_tail())


def results(measured: list[Row], samples: dict, warmup: int) -> dict:
    """The JSON record: p50/p99 per row, what each measures, its command, the samples."""
    out: dict = {"benchmark": NAME, "n": len(samples[measured[0].name]), "warmup": warmup,
                 "args": ARGS}
    for r in measured:
        stats = summary(samples[r.name])
        out[f"{r.name}_p50_ms"] = round(stats["p50"], 3)
        out[f"{r.name}_p99_ms"] = round(stats["p99"], 3)
    out["rows"] = {r.name: {"label": r.label, "what": r.what, "group": r.group, "argv": r.argv}
                   for r in measured}
    out["scripts"] = {r.name: r.script for r in measured if r.script}
    out["samples_ms"] = {k: [round(v, 3) for v in s] for k, s in samples.items()}
    out["machine"] = machine_info()
    return out


def table_rows(r: dict) -> list[list]:
    """One row per measured command: p50 and p99."""
    return [[name, r[f"{name}_p50_ms"], r[f"{name}_p99_ms"]] for name in r["rows"]]


def report(measured: list[Row], r: dict) -> None:
    """Print the table, then what each row measures."""
    print()
    print_table(["row", "p50 ms", "p99 ms"], table_rows(r))
    print()
    for m in measured:
        print(f"{m.name}: {m.what}")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    return [f"{r['n']} runs per row after {r['warmup']} warm-up, interleaved "
            "([docs/shim.md](../../docs/shim.md) says why the shim is a sh script).", "",
            md_table(["row", "p50 ms", "p99 ms", "what it measures"],
                     [[*row, r["rows"][row[0]]["what"]] for row in table_rows(r)])]


COLORS = {"baseline": "0.6", "python": "tab:blue", "sh": "tab:green"}


def plot(measured: list[Row], r: dict):
    """Horizontal box plots, one per row (log scale), coloured by design."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(measured) + 1.8))
    order = list(reversed(measured))          # first row at the top
    box = ax.boxplot([r["samples_ms"][m.name] for m in order], vert=False, widths=0.55,
                     patch_artist=True, showfliers=True)
    for patch, m in zip(box["boxes"], order, strict=True):
        patch.set_facecolor(COLORS[m.group])
        patch.set_alpha(0.6)
    ax.set_yticks(range(1, len(order) + 1), [m.label for m in order])
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    high = max(max(s) for s in r["samples_ms"].values())
    ax.set_xlim(right=high * 4)               # room for the labels right of the boxes
    for i, m in enumerate(order, start=1):
        ax.annotate(f"p50 {r[f'{m.name}_p50_ms']:.1f}  p99 {r[f'{m.name}_p99_ms']:.1f} ms",
                    (max(r["samples_ms"][m.name]) * 1.15, i), va="center", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in COLORS.values()]
    ax.legend(handles, ["baselines (start-up only)", "Python design (floor)",
                        "sh design (real mount)"], loc="upper right", fontsize=9)
    ax.set_xlabel("wall time of the whole command (ms, log scale)")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_title(f"Shim designs: start-up floor and the real shim ({r['n']} runs per row) — "
                 f"{r['machine']['cpu']}, {r['machine']['nproc']} CPUs", fontsize=11)
    return fig
