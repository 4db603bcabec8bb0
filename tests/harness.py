"""The process harness of the tests and the benchmarks: real daemons, brokers and mounts.

tests/conftest.py's fixtures and bench/common.py's context managers start what they need
through these classes: a :class:`Proc` (one process in its own session, logging to a file)
waits on a condition with a deadline (:meth:`Proc.wait_until`), and ends with
:meth:`Proc.stop` (or :meth:`Mount.unmount`), bounded, killing its group if it must.
:class:`Leftovers` is the check after a test: no process still running inside its directory,
no extra threads or fds in this process; :func:`mounts_under` the one for mounts. Every
failure is a :class:`HarnessError` whose text is a line and, where there is one, a log tail.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OFFLD = str(BIN / "offld")
OFFLOADD = str(BIN / "offloadd")
OFFLOADFS = str(BIN / "offloadfs")
DATA = Path(__file__).parent / "data"
CONVERT = "/usr/bin/convert"
COMMANDS = {"sh": "/bin/sh", "cat": "/bin/cat", "true": "/bin/true", "convert": CONVERT,
            "sleep": "/bin/sleep", "head": "/usr/bin/head", "env": "/usr/bin/env"}
START_DEADLINE = 20.0     # seconds for a process to listen or mount
STOP_DEADLINE = 15.0      # seconds for a process to exit after SIGTERM
UNMOUNT_DEADLINE = 20.0   # the mount's agent may take up to 10 s to close its connections
LISTENING = re.compile(r"listening on (tcp://([0-9.]+):(\d+))")
BROKER_UP = re.compile(r"clients on (tcp://\S+), hosts on (tcp://\S+)")
HOST_READY = " ready: "   # the broker's log line for each host that announced itself


class HarnessError(Exception):
    """A process did not start, stop or reach a condition in time (tests fail with it, bench
    prints it as its BenchError); the text is one line, or a line and a log tail."""


Warn = Callable[[str], None]   # where a stop's problems go instead of a HarnessError


# --- waiting and processes ---------------------------------------------------------------------

def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A loopback port nobody listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    """True if 127.0.0.1:``port`` takes connections now."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def state_of(pid: int) -> str | None:
    """The state letter /proc gives ``pid`` (R, S, T for stopped, Z...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return state_of(pid) not in (None, "Z")


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``, ignoring a process already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, their children...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def end_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM,
             deadline: float = 5.0) -> None:
    """Stop ``proc`` and every process below it, each by its pid: ``sig`` first, SIGKILL for
    what is left after ``deadline`` s."""
    pids = [*descendants(proc.pid), proc.pid] if proc.poll() is None else []
    for pid in pids:
        kill(pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(deadline)
    for pid in pids:
        kill(pid)
    proc.wait()


def fuse_mounts() -> list[str]:
    """Mount points of FUSE filesystems on this machine."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - fuse" in line]


def mounted(path: Path) -> bool:
    """True if a FUSE filesystem is mounted at ``path``."""
    return str(path) in fuse_mounts()


def mounts_under(path: Path) -> list[str]:
    """The FUSE mount points left inside ``path`` (a leftover check)."""
    return [m for m in fuse_mounts() if m.startswith(str(path))]


def processes_in(path: Path) -> dict[int, str]:
    """Processes (not zombies, not this one) whose cwd, program or command line is inside
    ``path`` (a shim program's command line is only its arguments)."""
    found, me = {}, os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me or not alive(int(entry)):
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            exe = _exe(entry)
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(path)) or exe.startswith(str(path)) or str(path) in cmd:
            found[int(entry)] = cmd.strip()
    return found



def _exe(entry: str) -> str:
    """/proc/ENTRY/exe, or "" where it cannot be read (a kernel thread)."""
    try:
        return os.readlink(f"/proc/{entry}/exe")
    except OSError:
        return ""


class Leftovers:
    """This process's threads and fds when made; conftest's leak_check makes one before a
    test and calls :meth:`check` after it."""

    def __init__(self):
        """Count the threads and fds now."""
        self.threads = threading.active_count()
        self.fds = len(os.listdir("/proc/self/fd"))

    def check(self, path: Path, grace: float = 5.0) -> None:
        """Fail if a process inside ``path`` outlives ``grace`` s (then killed), or if threads
        or fds were added since :meth:`__init__`."""
        try:
            wait_for(lambda: not processes_in(path), grace, "processes to go")
        except HarnessError:
            left = processes_in(path)
            for pid in left:
                kill(pid)
            raise HarnessError(f"leftover processes: {left}") from None
        if threading.active_count() != self.threads:
            raise HarnessError("leftover threads")
        if len(os.listdir("/proc/self/fd")) != self.fds:
            raise HarnessError("leftover file descriptors")


# --- one process ------------------------------------------------------------------------------

class Proc:
    """A process in its own session, its output in ``log_path``: Daemon, Broker and Mount (and
    test helpers) start one in ``__init__``, wait on it with :meth:`wait_until` and end it
    with :meth:`stop`."""

    what = "process"   # its name in error messages

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path | str | None = None,
                 env: dict[str, str] | None = None, what: str | None = None):
        """Start ``argv`` with stdin from /dev/null and stdout and stderr to ``log_path``."""
        self.log_path = log_path
        self.what = what or self.what
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                         start_new_session=True)

    def log(self) -> str:
        """The log so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the log, indented, for error messages."""
        return "\n".join("  " + line for line in self.log().splitlines()[-lines:])

    def wait_until(self, check: Callable[[], object], waiting_for: str,
                   deadline: float = START_DEADLINE):
        """What ``check()`` returns once truthy; a HarnessError (with the log) if the process
        exits first or ``deadline`` s pass."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if found := check():
                return found
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.what} exited with status {self.proc.returncode}:\n"
                                   + self.log_tail())
            time.sleep(0.02)
        raise HarnessError(f"{self.what} did not {waiting_for} within {deadline:.0f} s:\n"
                           + self.log_tail())

    def ready(self, check: Callable[[], object], waiting_for: str):
        """:meth:`wait_until` for a process just started: if it fails, end the process
        (:meth:`abort`) before raising."""
        try:
            return self.wait_until(check, waiting_for)
        except HarnessError:
            self.abort()
            raise

    def ready_log(self, pattern: re.Pattern) -> re.Match:
        """The first match of ``pattern`` in the log, waiting as :meth:`ready` does."""
        return self.ready(lambda: pattern.search(self.log()), f"log {pattern.pattern!r}")

    def abort(self) -> None:
        """End a process that did not get ready, saying nothing of how it went."""
        self.stop(deadline=5, warn=lambda _: None)

    def stop(self, sig: int = signal.SIGTERM, deadline: float = STOP_DEADLINE,
             warn: Warn | None = None) -> int:
        """Send ``sig`` (if it still runs) and wait ``deadline`` s, then SIGKILL its group; the
        exit code. Having to kill is a HarnessError, or goes to ``warn`` if given."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            name = signal.Signals(sig).name
            problem(f"{self.what} ignored {name} for {deadline:.0f} s, killed it", warn)
        return self.proc.returncode

def problem(text: str, warn: Warn | None) -> None:
    """``warn(text)``, or without ``warn`` a HarnessError."""
    if warn is None:
        raise HarnessError(text)
    warn(text)


# --- offloadd serve, offloadd broker, offloadfs mount -----------------------------------------

class Daemon(Proc):
    """An ``offloadd serve`` process on an ephemeral loopback port (tests' start_daemon and
    bench's daemon() and host() make one)."""

    what = "offloadd"

    def __init__(self, workdir: Path, *args: str, commands: dict | None = None,
                 allow_root: bool = True, marker: Path | None = None, port: int = 0,
                 listen: bool = True, address: str = "127.0.0.1", prefix: Sequence[str] = ()):
        """Start the daemon and wait for its 'listening on' line (not without ``listen``) on
        ``address``. With ``marker`` (a directory), the daemon runs in its own mount namespace
        where a tmpfs hides it and ``marker/where`` reads "host" (the caller's copy says
        something else). ``prefix`` comes before its argv (e.g. nsenter into a namespace)."""
        self.workdir = workdir
        allowed = COMMANDS if commands is None else commands
        cmds = [f"--command={k}={v}" for k, v in allowed.items()]
        argv = [OFFLOADD, "serve", *(["--listen", f"tcp://{address}:{port}"] if listen else []),
                *cmds, *(["--allow-root"] if allow_root else []), *args]
        if marker is not None:
            script = 'mount -t tmpfs none "$0" && echo host > "$0/where" && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                    str(marker), *argv]
        super().__init__([*prefix, *argv], workdir / f"offloadd-{time.monotonic_ns()}.log",
                         cwd=workdir)
        self.endpoint, self.port, self.hostport = "", 0, ""
        if listen:
            match = self.ready_log(LISTENING)
            self.endpoint = match.group(1)
            self.port = int(match.group(3))
            self.hostport = f"{match.group(2)}:{self.port}"

    def vmhwm_mb(self) -> float:
        """Peak resident memory of the daemon in MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


class Broker(Proc):
    """An ``offloadd broker`` process on two ephemeral loopback ports (tests' start_broker and
    bench's broker() make one)."""

    what = "offloadd broker"

    def __init__(self, workdir: Path, clients: str = "tcp://127.0.0.1:0",
                 workers: str = "tcp://127.0.0.1:0", args=(), prefix: Sequence[str] = ()):
        """Start it (with extra ``args``, after ``prefix``) and read both endpoints from its
        log."""
        argv = [*prefix, OFFLOADD, "broker", "--clients", clients, "--workers", workers, *args]
        super().__init__(argv, workdir / f"broker-{time.monotonic_ns()}.log", cwd=workdir)
        found = self.ready_log(BROKER_UP)
        self.clients, self.workers = found.group(1), found.group(2)
        self.client_port = self.clients.rsplit(":", 1)[1]

    def hosts_ready(self) -> int:
        """How many times a host announced itself (the broker logs one line each)."""
        return self.log().count(HOST_READY)

    def wait_hosts(self, n: int, deadline: float = START_DEADLINE) -> None:
        """Wait until ``n`` hosts have announced themselves, at most ``deadline`` s."""
        self.wait_until(lambda: self.hosts_ready() >= n,
                        f"see {n} hosts announce themselves (saw {self.hosts_ready()})", deadline)


class Mount(Proc):
    """An ``offloadfs mount -f`` process serving shims at ``path`` (tests' start_mount and
    bench's shims() make one; :meth:`unmount` ends it)."""

    what = "offloadfs mount"

    def __init__(self, workdir: Path, *args: str, hosts=(), config: str | None = None,
                 wait_for_shim: str | Sequence[str] | None = None,
                 env: dict[str, str] | None = None, prefix: Sequence[str] = ()):
        """Mount (``prefix`` before the argv: e.g. into a cgroup and a namespace), and wait
        until it is mounted and lists ``wait_for_shim`` (one name or several, if given)."""
        self.path = workdir / f"offload-{time.monotonic_ns()}"
        self.path.mkdir()
        argv = [*prefix, OFFLOADFS, "mount", str(self.path), "-f", *args]
        for host in hosts:
            argv += ["-H", host]
        if config:
            argv += ["-c", config]
        super().__init__(argv, workdir / f"mount-{time.monotonic_ns()}.log", cwd=workdir,
                         env=env)
        names = [wait_for_shim] if isinstance(wait_for_shim, str) else list(wait_for_shim or ())
        self.ready(lambda: mounted(self.path) and all((self.path / n).exists() for n in names),
                   f"mount {self.path}" + (f" with shims {' '.join(names)}" if names else ""))

    def env(self, base: dict[str, str] | None = None, **extra) -> dict[str, str]:
        """``base`` (default: ours) with the mount first on PATH, and ``extra``."""
        base = dict(os.environ if base is None else base)
        return {**base, "PATH": f"{self.path}:{base.get('PATH', os.defpath)}", **extra}

    def abort(self) -> None:
        """Unmount a mount that did not get ready, saying nothing of how it went."""
        self.unmount(warn=lambda _: None)

    def unmount(self, warn: Warn | None = None) -> int:
        """``offloadfs umount`` (SIGTERM if it never mounted) and wait (bounded) for the
        process; SIGKILL its group if it does not exit, then detach lazily a mount left
        behind. Its exit code; each problem is a HarnessError at the end, or goes to ``warn``."""
        problems: list[str] = []
        if self.proc.poll() is None:
            if mounted(self.path):
                problems += umount(self.path)
            else:
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(UNMOUNT_DEADLINE)
        except subprocess.TimeoutExpired:
            problems.append(f"{self.what} did not exit within {UNMOUNT_DEADLINE:.0f} s of "
                            "umount, killed it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(HarnessError):   # after a kill, auto_unmount detaches it soon
            wait_for(lambda: not mounted(self.path), 5, "the mount to go", interval=0.05)
        if mounted(self.path):
            problems.append(f"{self.path} still mounted, detached it lazily")
            detach(self.path)
        for text in problems:
            problem(text, warn)
        return self.proc.returncode


def umount(path: Path) -> list[str]:
    """``offloadfs umount path``; what went wrong (nothing: [])."""
    try:
        done = subprocess.run([OFFLOADFS, "umount", str(path)], capture_output=True, text=True,
                              timeout=UNMOUNT_DEADLINE, check=False)
    except subprocess.TimeoutExpired:
        return [f"offloadfs umount {path} hung"]
    return [f"offloadfs umount {path}: {done.stderr.strip()}"] if done.returncode else []


def detach(path: Path) -> None:
    """Lazily detach the FUSE mount at ``path`` (fusermount3, else fusermount)."""
    for fusermount in ("fusermount3", "fusermount"):
        with contextlib.suppress(FileNotFoundError):
            subprocess.run([fusermount, "-u", "-z", str(path)], capture_output=True,
                           timeout=UNMOUNT_DEADLINE, check=False)
            return


class Factory:
    """What a fixture yields to start processes (see :func:`started`): calling it calls
    ``make`` and keeps the result in ``made``."""

    def __init__(self, make: Callable):
        """``make(*args, **kw)`` starts one."""
        self.make, self.made = make, []

    def __call__(self, *args, **kw):
        """Start one, keep it and return it."""
        one = self.make(*args, **kw)
        self.made.append(one)
        return one


def started(make: Callable, end: Callable) -> Generator[Factory, None, dict]:
    """The body of a fixture that starts processes (``yield from`` it): yields a Factory of
    ``make``, then at teardown ends each one with ``end``; returns {pid: what end returned}."""
    factory = Factory(make)
    yield factory
    return {p.proc.pid: end(p) for p in factory.made}


# --- what tests share besides processes ----------------------------------------------------------

def test_user(name: str) -> tuple[str, int]:
    """A system test user (created once and kept: users are not per-test state)."""
    import pwd
    try:
        return name, pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        return name, pwd.getpwnam(name).pw_uid


test_user.__test__ = False   # a helper, not a test


def marker_dir(path: Path) -> Path:
    """Make ``path`` with a ``where`` file saying "vm" (a marker daemon's copy says "host")."""
    path.mkdir()
    (path / "where").write_text("vm\n")
    return path


def convert_both_ways(work: Path, remote: Callable[[str], subprocess.CompletedProcess],
                      size: str, seed: str, blur: str) -> subprocess.CompletedProcess:
    """Make ``work/in.png``, blur it with /usr/bin/convert (local.ppm) and with ``remote``
    (a shell line writing remote.ppm); ``remote``'s result, after checking both are equal."""
    subprocess.run([CONVERT, "-size", size, "plasma:fractal", "-seed", seed, "in.png"],
                   cwd=work, check=True)
    subprocess.run([CONVERT, "in.png", "-blur", blur, "local.ppm"], cwd=work, check=True)
    got = remote(f"convert in.png -blur {blur} remote.ppm")
    assert got.returncode == 0, got.stderr
    assert (work / "remote.ppm").read_bytes() == (work / "local.ppm").read_bytes()
    return got


def offld_argv(daemon: Daemon, *command: str, opts=()) -> list[str]:
    """The argv of ``offld`` sending ``command`` to ``daemon``."""
    return [OFFLD, "-H", daemon.hostport, *opts, "--", *command]


def offld(daemon: Daemon, *command: str, cwd: Path, opts=(), **kw) -> subprocess.CompletedProcess:
    """Run ``offld`` to completion (bounded) and capture its output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(offld_argv(daemon, *command, opts=opts), cwd=cwd, **kw)
