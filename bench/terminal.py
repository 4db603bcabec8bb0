"""Keystroke echo latency at an interactive terminal: local cat, the shim, offld and ssh -t.

Each row runs ``cat`` on a real pseudo-terminal of its own (``os.openpty``; the child in a new
session with that pty as its controlling terminal, as a shell would start it), types one letter
at a time on the pty's master and times until that letter comes back on the master: the echo a
user sees. One keystroke of every row per round (interleaved, so that other load on the machine
hits every row alike), a short pause after each, after a warm-up.

- **local**: ``/bin/cat`` here. The local line discipline echoes (the pty stays cooked, ECHO
  on): the floor, what the kernel alone costs.
- **shim**: ``MOUNTPOINT/cat``, the shim of an ``offloadfs mount`` of a real ``offloadd`` on an
  ephemeral loopback port allowing ``cat=/bin/cat``. The caller's terminal must go raw (ECHO
  off: any echo then comes from the host's pty, relayed back), the daemon must log the ``cat``
  job started, and the mount's counters must count it offloaded, not fallen back.
- **offld**: ``offld -p -H 127.0.0.1:PORT -- cat`` through the same daemon; raw terminal,
  a job started on the daemon, and its ``-p`` profile line at the end.
- **ssh**: ``ssh -t`` to Debian's sshd on a loopback port (key auth) running ``cat``: ssh puts
  the terminal in raw mode and the remote pty echoes; sshd must log the login.

Every ``LINE`` keystrokes (untimed) the row types Return, and ``cat`` must print the line back:
the letters really reached the program at the other end. A row that does not get ready, does
not echo within ``KEY_TIMEOUT_S``, or fails a check is reported as failed in one line; the
others go on. At the end each row types Return and ^D, and ``cat`` must exit 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable

from tests.harness import START_DEADLINE, end_tree

from .common import (
    BenchError,
    Daemon,
    Shims,
    Sshd,
    daemon,
    machine_info,
    md_table,
    percentile,
    print_table,
    publish,
    pyplot,
    shims,
    sshd,
    tool,
)

NAME = "terminal"
KEYS, QUICK_KEYS = 200, 30
WARMUP, QUICK_WARMUP = 10, 5
PAUSE_MS = 20.0            # after each keystroke, before the next (of any row)
KEY_TIMEOUT_S = 5.0        # no echo by then: the row failed
READY_DEADLINE = 10.0      # for the client to put the terminal in raw mode, and so on
EXIT_TIMEOUT_S = 10.0      # after Return and ^D, cat (and its client) must have exited
LINE = 40                  # keystrokes per line before an untimed Return
LETTERS = b"abcdefghijklmnopqrstuvwxyz"
WINSIZE = (24, 80)         # rows, cols of every pty
TRANSCRIPT = 4096          # bytes of each row's output kept for error messages
DAEMON_COMMANDS = {"cat": "/bin/cat"}
ORDER = ("local", "shim", "offld", "ssh")
JOB_STARTED = re.compile(rb"job \S+ \(cat\) started")
SSH_LOGIN = b"Accepted publickey for "
OFFLD_PROFILE = b"offld: profile on "


class RowFailed(Exception):
    """One row cannot go on; the text is one line."""


@dataclasses.dataclass
class Row:
    """One way of reaching ``cat``: a short name (the JSON key prefix), a label, a sentence
    saying where the echo comes from, the command, its environment, whether the terminal must
    go raw (the echo then comes from the far end), and checks run once it is ready and once it
    has exited (each raises :class:`RowFailed`)."""

    name: str
    label: str
    echo: str
    argv: list[str]
    env: dict[str, str]
    raw: bool
    ready: Callable[[], str | None] = lambda: None   # None: ready; else what it waits for
    done: Callable[[Session], None] = lambda s: None


@dataclasses.dataclass
class Setup:
    """What the rows run against; each part None (with why) if it did not start."""

    d: Daemon | None = None
    m: Shims | None = None
    ssh: Sshd | None = None
    missing: dict[str, str] = dataclasses.field(default_factory=dict)   # row -> why not


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("-n", "--keys", type=int, help=f"timed keystrokes per row (default "
                        f"{KEYS}, --quick {QUICK_KEYS})")
    parser.add_argument("--pause", type=float, default=PAUSE_MS, metavar="MS",
                        help=f"pause after each keystroke (default {PAUSE_MS:g} ms)")


# --- one pty and the program on it ----------------------------------------------------------

def take_terminal() -> None:
    """In the child, after setsid: make its stdin (the pty's slave) its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Session:
    """A program on a new pty: its master here, the child in its own session with the slave as
    its controlling terminal and stdin, stdout and stderr."""

    def __init__(self, row: Row):
        """Open the pty and start ``row``'s command on it."""
        self.row = row
        self.master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", *WINSIZE, 0, 0))
            self.proc = subprocess.Popen(row.argv, stdin=slave, stdout=slave, stderr=slave,
                                         env=row.env, start_new_session=True,
                                         preexec_fn=take_terminal)
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.output = bytearray()   # the last TRANSCRIPT bytes it printed
        self.line = bytearray()     # letters typed since the last Return
        self.samples: list[float] = []
        self.typed = 0

    # reading and writing the master

    def read(self, timeout: float) -> bytes:
        """What the master has within ``timeout`` s (b"" if nothing; the pty closed: b"")."""
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0.0))
        if not ready:
            return b""
        try:
            data = os.read(self.master, 65536)
        except OSError:          # EIO: every slave fd closed, the program is gone
            return b""
        self.output += data
        del self.output[:-TRANSCRIPT]
        return data

    def drain(self) -> None:
        """Read whatever is pending, without waiting."""
        while self.read(0):
            pass

    def write(self, data: bytes) -> None:
        """Type ``data`` on the terminal."""
        os.write(self.master, data)

    def lflag(self) -> int:
        """The pty's local modes now (master and slave share one termios)."""
        return termios.tcgetattr(self.master)[3]

    def tail(self) -> str:
        """The end of what it printed, for error messages (one line)."""
        text = bytes(self.output[-300:]).decode(errors="replace")
        return repr(text.strip()) if text.strip() else "nothing"

    def alive(self) -> None:
        """Raise :class:`RowFailed` if the program has exited."""
        if self.proc.poll() is not None:
            self.drain()
            raise RowFailed(f"{self.row.argv[0]} exited with status {self.proc.returncode}; "
                            f"it printed {self.tail()}")

    # the stages of a row

    def wait_ready(self, deadline: float) -> None:
        """Until the terminal is in the mode the row needs (raw: ECHO and ICANON off, set by
        the client; local: still cooked, ECHO on) and its ``ready`` check passes."""
        end = time.monotonic() + deadline
        while True:
            self.alive()
            lflag = self.lflag()
            echo_off = not lflag & (termios.ECHO | termios.ICANON)
            if self.row.raw and not echo_off:
                waiting = ("the terminal in raw mode (it stayed cooked, ECHO on: an echo "
                           "would be the local line discipline's; does this build relay "
                           "terminals?)")
            elif not self.row.raw and not lflag & termios.ECHO:
                waiting = "the local terminal with ECHO on"
            else:
                waiting = self.row.ready()
            if waiting is None:
                return
            if time.monotonic() > end:
                self.drain()
                raise RowFailed(f"not ready within {deadline:.0f} s: waited for {waiting}; "
                                f"it printed {self.tail()}")
            self.read(0.02)

    def keystroke(self, timeout: float) -> float:
        """Type the next letter; ms until its echo came back on the master."""
        self.drain()
        letter = LETTERS[self.typed % len(LETTERS):][:1]
        self.typed += 1
        seen = b""
        start = time.perf_counter()
        self.write(letter)
        end = start + timeout
        while letter not in seen:
            left = end - time.perf_counter()
            if left <= 0:
                self.alive()
                raise RowFailed(f"no echo of {letter.decode()!r} within {timeout:g} s "
                                f"(keystroke {self.typed}); it printed {self.tail()}")
            seen += self.read(left)
        elapsed = (time.perf_counter() - start) * 1000
        self.line += letter
        if len(self.line) >= LINE:
            self.newline(timeout)
        return elapsed

    def newline(self, timeout: float) -> None:
        """Type Return (untimed); ``cat`` must print the line back: the letters reached it."""
        self.drain()
        self.write(b"\r")
        want = re.compile(re.escape(bytes(self.line)) + rb"\r?\n")
        got = b""
        end = time.monotonic() + timeout
        while not want.search(got):
            if time.monotonic() > end:
                self.alive()
                raise RowFailed(f"cat did not print the line back within {timeout:g} s; "
                                f"it printed {self.tail()}")
            got += self.read(end - time.monotonic())
        self.line.clear()

    def finish(self) -> None:
        """Return and ^D (end of input at the start of a line): cat, and the row's client,
        must exit 0 within :data:`EXIT_TIMEOUT_S`; then the row's own check."""
        if self.line:
            self.newline(KEY_TIMEOUT_S)
        self.write(b"\x04")
        end = time.monotonic() + EXIT_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < end:
            self.read(0.05)
        self.drain()
        if self.proc.poll() is None:
            raise RowFailed(f"did not exit within {EXIT_TIMEOUT_S:g} s of ^D; it printed "
                            f"{self.tail()}")
        if self.proc.returncode != 0:
            raise RowFailed(f"exited with status {self.proc.returncode}; it printed "
                            f"{self.tail()}")
        self.row.done(self)

    def close(self) -> None:
        """Close the master (the session gets SIGHUP) and end the program and its children."""
        with contextlib.suppress(OSError):
            os.close(self.master)
        self.master = -1
        if self.proc.poll() is None:
            end = time.monotonic() + 1.0
            while self.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.02)
        end_tree(self.proc)


# --- the rows -------------------------------------------------------------------------------

def started_jobs(d: Daemon) -> int:
    """How many ``cat`` jobs the daemon has logged started."""
    return len(JOB_STARTED.findall(d.log_path.read_bytes()))


def ssh_logins(s: Sshd) -> int:
    """How many logins sshd has logged."""
    return s.log.read_bytes().count(SSH_LOGIN)


def rows(s: Setup) -> list[Row]:
    """The rows whose daemon, mount or sshd started (the others are in ``s.missing``)."""
    env = {**(s.d.client_env() if s.d else os.environ), "TERM": os.environ.get("TERM", "xterm")}
    out = [Row("local", "local cat", "this machine's line discipline (cooked pty, ECHO on)",
               ["/bin/cat"], env, raw=False)]
    if s.m and s.d:
        out.append(shim_row(s.m, env))
    if s.d:
        out.append(offld_row(s.d, env))
    if s.ssh:
        out.append(ssh_row(s.ssh, env))
    return out


def job_started(d: Daemon, before: int) -> Callable[[], str | None]:
    """A ``ready`` check: the daemon has logged one more ``cat`` job started than ``before``
    (a row is started only once the one before it is ready, so the new job is this row's)."""
    def check() -> str | None:
        n = started_jobs(d) - before
        if n == 1:
            return None
        return "the daemon to log the cat job started" if n == 0 else \
            f"one cat job started on the daemon, it logged {n}"
    return check


def shim_row(m: Shims, env: dict[str, str]) -> Row:
    """MOUNTPOINT/cat, checked by the daemon's log and the mount's counters."""
    def done(_: Session) -> None:
        end = time.monotonic() + 2.0   # the agent counts the job as it ends
        while True:
            try:
                m.offloaded("cat", 1)
                return
            except BenchError as exc:
                if time.monotonic() > end:
                    raise RowFailed(str(exc).splitlines()[0]) from exc
            time.sleep(0.05)
    return Row("shim", "shim MOUNTPOINT/cat", "the host's pty, through the mount's agent",
               [m.shim("cat")], env, raw=True, done=done)


def offld_row(d: Daemon, env: dict[str, str]) -> Row:
    """offld -p -- cat, checked by the daemon's log and offld's profile line."""
    def done(s: Session) -> None:
        if OFFLD_PROFILE not in s.output:
            raise RowFailed(f"offld printed no '-p' profile line; it printed {s.tail()}")
    return Row("offld", "offld -- cat", "the host's pty, through offld",
               [tool("offld"), "-p", "-H", d.host, "--", "cat"], env, raw=True, done=done)


def ssh_row(s: Sshd, env: dict[str, str]) -> Row:
    """ssh -t 127.0.0.1 cat, checked by sshd's log."""
    argv = ["ssh", "-t", *s.options(), s.target, "--", "cat"]
    return Row("ssh", "ssh -t 127.0.0.1 cat", "the remote pty of sshd on loopback",
               argv, env, raw=True)


def arm(row: Row, s: Setup) -> None:
    """Set ``row``'s ready check from the logs as they are now, just before it starts."""
    if row.name in ("shim", "offld") and s.d:
        row.ready = job_started(s.d, started_jobs(s.d))
    elif row.name == "ssh" and s.ssh:
        before = ssh_logins(s.ssh)
        row.ready = lambda: (None if ssh_logins(s.ssh) > before
                             else "sshd to log the login")


# --- running --------------------------------------------------------------------------------

@contextlib.contextmanager
def setup():
    """The daemon and its mount, and sshd; what does not start is noted, not fatal. All
    stopped on the way out."""
    with contextlib.ExitStack() as stack:
        s = Setup()
        try:
            s.d = stack.enter_context(daemon(DAEMON_COMMANDS))
        except BenchError as exc:
            why = f"offloadd did not start: {str(exc).splitlines()[0]}"
            s.missing.update(shim=why, offld=why)
        if s.d:
            try:
                s.m = stack.enter_context(shims(s.d, list(DAEMON_COMMANDS)))
            except BenchError as exc:
                s.missing["shim"] = f"the mount did not start: {str(exc).splitlines()[0]}"
        try:
            s.ssh = stack.enter_context(sshd())
        except (BenchError, subprocess.CalledProcessError) as exc:
            s.missing["ssh"] = f"sshd did not start: {str(exc).splitlines()[0]}"
        yield s


def fail(row: str, why: str, failed: dict[str, str]) -> None:
    """Record and print that ``row`` failed."""
    failed[row] = why
    print(f"terminal: row {row} failed: {why}", flush=True)


def run(opts) -> dict:
    """Measure, print the table, write terminal.json and terminal.png."""
    keys = opts.keys or (QUICK_KEYS if opts.quick else KEYS)
    warmup = QUICK_WARMUP if opts.quick else WARMUP
    pause = max(opts.pause, 0.0) / 1000
    with setup() as s:
        measured = rows(s)
        failed: dict[str, str] = {}
        for name, why in s.missing.items():
            fail(name, why, failed)
        sessions = start(measured, s, failed)
        try:
            print(f"terminal: {keys} keystrokes per row after {warmup} warm-up, interleaved, "
                  f"{opts.pause:g} ms apart ({', '.join(sessions) or 'no row ready'}) ...",
                  flush=True)
            measure(sessions, keys, warmup, pause, failed)
            for name, session in list(sessions.items()):
                try:
                    session.finish()
                except (RowFailed, OSError) as exc:
                    fail(name, f"at the end: {exc}", failed)
        finally:
            for session in sessions.values():
                session.close()
        present = {r.name: r for r in measured}
        all_rows = [present.get(n) or missing_row(n) for n in ORDER
                    if n in present or n in s.missing]
    result = results(all_rows, sessions, failed, keys, warmup, opts.pause)
    report(result)
    publish(NAME, result, plot(result))
    if failed:
        raise BenchError(f"{len(failed)} of {len(result['rows'])} rows failed: "
                         + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return result


def missing_row(name: str) -> Row:
    """A placeholder for a row whose daemon, mount or sshd did not start."""
    labels = {"shim": "shim MOUNTPOINT/cat", "offld": "offld -- cat",
              "ssh": "ssh -t 127.0.0.1 cat"}
    return Row(name, labels[name], "", [], {}, raw=True)


def start(measured: list[Row], s: Setup, failed: dict[str, str]) -> dict[str, Session]:
    """Start each row's session and wait until it is ready, one after the other (so each
    new job or login in the logs is that row's); the rows that got ready."""
    sessions: dict[str, Session] = {}
    for row in measured:
        arm(row, s)
        try:
            session = Session(row)
        except OSError as exc:
            fail(row.name, f"cannot start {row.argv[0]}: {exc}", failed)
            continue
        try:
            session.wait_ready(READY_DEADLINE)
        except (RowFailed, OSError) as exc:
            session.close()
            fail(row.name, str(exc), failed)
            continue
        sessions[row.name] = session
    return sessions


def measure(sessions: dict[str, Session], keys: int, warmup: int, pause: float,
            failed: dict[str, str]) -> None:
    """One keystroke of each live row per round; a row that fails is closed and dropped. The
    first warm-up keystroke may take until :data:`START_DEADLINE` (the far end starting)."""
    for i in range(warmup + keys):
        for name, session in list(sessions.items()):
            try:
                ms = session.keystroke(START_DEADLINE if i == 0 else KEY_TIMEOUT_S)
            except (RowFailed, OSError) as exc:
                session.close()
                del sessions[name]
                fail(name, str(exc), failed)
                continue
            if i >= warmup:
                session.samples.append(ms)
            time.sleep(pause)


# --- results --------------------------------------------------------------------------------

def results(all_rows: list[Row], sessions: dict[str, Session], failed: dict[str, str],
            keys: int, warmup: int, pause_ms: float) -> dict:
    """The JSON record: p50/p99/mean per row that measured, added over local, why the others
    failed, what each row is, the samples."""
    out: dict = {"benchmark": NAME, "n": keys, "warmup": warmup, "pause_ms": pause_ms,
                 "line": LINE, "failed": failed}
    samples = {name: s.samples for name, s in sessions.items() if name not in failed}
    for name, ms in samples.items():
        out[f"{name}_p50_ms"] = round(percentile(ms, 50), 4)
        out[f"{name}_p99_ms"] = round(percentile(ms, 99), 4)
        out[f"{name}_mean_ms"] = round(sum(ms) / len(ms), 4)
    if "local" in samples:
        for name in samples:
            if name != "local":
                out[f"{name}_added_p50_ms"] = round(out[f"{name}_p50_ms"]
                                                    - out["local_p50_ms"], 4)
    out["rows"] = {r.name: {"label": r.label, "echo": r.echo, "argv": r.argv, "raw": r.raw}
                   for r in all_rows}
    out["samples_ms"] = {k: [round(v, 4) for v in ms] for k, ms in samples.items()}
    out["machine"] = machine_info()
    return out


HEADERS = ["row", "what", "p50 ms", "p99 ms", "mean ms", "p50 - local ms"]


def table_rows(r: dict) -> list[list]:
    """One line per row: its figures, or "-" and why it failed."""
    out = []
    for name, row in r["rows"].items():
        if f"{name}_p50_ms" in r:
            out.append([name, row["label"], r[f"{name}_p50_ms"], r[f"{name}_p99_ms"],
                        r[f"{name}_mean_ms"], r.get(f"{name}_added_p50_ms", "-")])
        else:
            out.append([name, f"{row['label']} (failed)", "-", "-", "-", "-"])
    return out


def report(r: dict) -> None:
    """Print the table, where each row's echo comes from, and why rows failed."""
    print()
    print_table(HEADERS, table_rows(r))
    print()
    for name, row in r["rows"].items():
        if name in r["failed"]:
            print(f"{name}: FAILED: {r['failed'][name]}")
        elif row["echo"]:
            print(f"{name}: echo from {row['echo']}")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    lines = [md_table(HEADERS, table_rows(r)), "",
             f"{r['n']} keystrokes per row after {r['warmup']} warm-up, interleaved, "
             f"{r['pause_ms']:g} ms apart; each row's `cat` on its own pty, the time from "
             "writing a letter to the pty's master until it is read back there (the echo)."]
    lines += [f"- `{name}`: echo from {row['echo']}" for name, row in r["rows"].items()
              if name not in r["failed"] and row["echo"]]
    lines += [f"- `{name}` **failed**: {why}" for name, why in r["failed"].items()]
    return lines


# --- the plot -------------------------------------------------------------------------------

def plot(r: dict):
    """Box plots of every row's echo times (log scale) beside their cumulative distribution."""
    plt = pyplot()
    fig, (box, cdf) = plt.subplots(1, 2, figsize=(14, 5), width_ratios=(3, 2))
    names = list(r["rows"])
    measured = [n for n in names if n in r["samples_ms"]]
    if measured:
        box.boxplot([r["samples_ms"][n] for n in measured], widths=0.5, showfliers=True,
                    positions=[names.index(n) + 1 for n in measured])
    for i, n in enumerate(names, start=1):
        if n in r["samples_ms"]:
            box.annotate(f"p50 {r[f'{n}_p50_ms']:.3g}\np99 {r[f'{n}_p99_ms']:.3g}",
                         (i + 0.28, r[f"{n}_p50_ms"]), va="center", fontsize=8)
            xs = sorted(r["samples_ms"][n])
            cdf.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=r["rows"][n]["label"])
        else:
            box.annotate("failed", (i, 0.5), xycoords=("data", "axes fraction"), ha="center",
                         color="tab:red")
    box.set_xticks(range(1, len(names) + 1), [r["rows"][n]["label"] for n in names],
                   rotation=15, ha="right", fontsize=9)
    box.set_xlim(0.5, len(names) + 0.95)
    box.set_yscale("log")
    box.set_ylabel("keystroke to echo (ms, log scale)")
    box.set_title("echo latency per row")
    cdf.set_xscale("log")
    cdf.set_xlabel("keystroke to echo (ms, log scale)")
    cdf.set_ylabel("share of keystrokes")
    cdf.grid(alpha=0.3, which="both")
    if measured:
        cdf.legend(loc="lower right", fontsize=9)
    cdf.set_title("cumulative distribution")
    fig.suptitle(f"Keystroke echo at an interactive terminal ({r['n']} keystrokes per row, "
                 f"interleaved, {r['pause_ms']:g} ms apart) — {r['machine']['cpu']}, "
                 f"{r['machine']['nproc']} CPUs")
    return fig

