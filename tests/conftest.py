"""Shared test harness: real daemons on ephemeral loopback ports, and leak checks.

Every test gets ``leak_check`` (autouse): at teardown no process may still run with its cwd or
command line inside the test's tmp_path, and the test process has no extra threads or fds.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OFFLD = str(BIN / "offld")
OFFLOADD = str(BIN / "offloadd")
OFFLOADFS = str(BIN / "offloadfs")
DATA = Path(__file__).parent / "data"
CONVERT = "/usr/bin/convert"
COMMANDS = {"sh": "/bin/sh", "cat": "/bin/cat", "true": "/bin/true", "convert": CONVERT,
            "sleep": "/bin/sleep", "head": "/usr/bin/head", "env": "/usr/bin/env"}


def free_port() -> int:
    """A loopback port nobody listens on (just now)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_user(name: str) -> tuple[str, int]:
    """A system test user (created once and kept: users are not per-test state)."""
    import pwd
    try:
        return name, pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        return name, pwd.getpwnam(name).pw_uid


test_user.__test__ = False   # a helper, not a test


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Daemon:
    """An ``offloadd serve`` process on an ephemeral loopback port."""

    def __init__(self, workdir: Path, *args: str, commands: dict | None = None,
                 allow_root: bool = True, marker: Path | None = None, port: int = 0):
        """Start the daemon and wait for its 'listening on' line. With ``marker`` (a
        directory), the daemon runs in its own mount namespace where a tmpfs hides it and
        ``marker/where`` reads "host" (the caller's copy says something else)."""
        self.log_path = workdir / f"offloadd-{time.monotonic_ns()}.log"
        cmds = [f"--command={k}={v}" for k, v in (COMMANDS if commands is None else commands).items()]
        argv = [OFFLOADD, "serve", "--listen", f"tcp://127.0.0.1:{port}", *cmds,
                *(["--allow-root"] if allow_root else []), *args]
        if marker is not None:
            script = 'mount -t tmpfs none "$0" && echo host > "$0/where" && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                    str(marker), *argv]
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=workdir, start_new_session=True)
        match = wait_for(self._listening, 20, "offloadd to listen")
        self.endpoint = match.group(0)
        self.port = int(match.group(1))
        self.hostport = f"127.0.0.1:{self.port}"

    def _listening(self):
        """The 'listening on' match, or None; fails at once if the daemon died."""
        if self.proc.poll() is not None:
            pytest.fail(f"offloadd exited {self.proc.returncode}: {self.log()}")
        return re.search(r"tcp://127\.0\.0\.1:(\d+)", self.log())

    def log(self) -> str:
        """The daemon's log so far."""
        return self.log_path.read_text(errors="replace")

    def vmhwm_mb(self) -> float:
        """Peak resident memory of the daemon in MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> int:
        """SIGTERM, then wait (bounded); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail("offloadd did not stop within 15s of SIGTERM")
        self.log_file.close()
        return self.proc.returncode


def fuse_mounts() -> list[str]:
    """Mount points of FUSE filesystems on this machine."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - fuse" in line]


class Mount:
    """An ``offloadfs mount -f`` process serving shims at ``path``."""

    def __init__(self, workdir: Path, *args: str, hosts=(), config: str | None = None,
                 wait_for_shim: str | None = None):
        """Mount, and wait until ``wait_for_shim`` (if given) is listed."""
        self.path = workdir / f"offload-{time.monotonic_ns()}"
        self.path.mkdir()
        self.log_path = workdir / f"mount-{time.monotonic_ns()}.log"
        argv = [OFFLOADFS, "mount", str(self.path), "-f", *args]
        for host in hosts:
            argv += ["-H", host]
        if config:
            argv += ["-c", config]
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=workdir, start_new_session=True)
        wait_for(self._mounted, 20, f"{self.path} to be mounted")
        if wait_for_shim:
            wait_for(lambda: (self.path / wait_for_shim).exists(), 20,
                     f"shim {wait_for_shim} to appear")

    def _mounted(self) -> bool:
        """True once the mount is up; fails at once if the process died."""
        if self.proc.poll() is not None:
            pytest.fail(f"offloadfs mount exited {self.proc.returncode}: {self.log()}")
        return str(self.path) in fuse_mounts()

    def log(self) -> str:
        """The mount process's log so far."""
        return self.log_path.read_text(errors="replace")

    def env(self, **extra) -> dict:
        """An environment with the mount first on PATH."""
        return dict(os.environ, PATH=f"{self.path}:{os.environ['PATH']}", **extra)

    def unmount(self) -> int:
        """``offloadfs umount``, then wait (bounded) for the process; its exit code."""
        if self.proc.poll() is None and str(self.path) in fuse_mounts():
            subprocess.run([OFFLOADFS, "umount", str(self.path)], check=True, timeout=30)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("offloadfs mount did not exit within 20s of umount")
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture
def start_mount(tmp_path):
    """Factory for mounts; each is unmounted at teardown, and none may be left mounted."""
    started: list[Mount] = []

    def start(*args, **kw) -> Mount:
        mount = Mount(tmp_path, *args, **kw)
        started.append(mount)
        return mount

    yield start
    for mount in started:
        mount.unmount()
    left = [m for m in fuse_mounts() if m.startswith(str(tmp_path))]
    assert not left, f"leftover mounts: {left}"


@pytest.fixture(autouse=True)
def leak_check(tmp_path, monkeypatch):
    """Fail a test that leaves processes, threads or fds behind; isolate the job log."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    yield
    leftovers = lambda: _processes_in(tmp_path)  # noqa: E731
    if leftovers():
        try:
            wait_for(lambda: not leftovers(), 5, "processes to go")
        except pytest.fail.Exception:
            left = leftovers()
            for pid in left:
                _kill(pid)
            pytest.fail(f"leftover processes: {left}")
    assert threading.active_count() == threads, "leftover threads"
    assert len(os.listdir("/proc/self/fd")) == fds, "leftover file descriptors"


def _processes_in(path: Path) -> dict[int, str]:
    """Processes (not zombies) whose cwd or command line is inside ``path``."""
    found, me = {}, os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me or not alive(int(entry)):
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(path)) or str(path) in cmd:
            found[int(entry)] = cmd.strip()
    return found


def _kill(pid: int) -> None:
    """SIGKILL, ignoring a process already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def start_daemon(tmp_path):
    """Factory for daemons; each is stopped at teardown and must exit cleanly."""
    started: list[Daemon] = []

    def start(*args, **kw) -> Daemon:
        daemon = Daemon(tmp_path, *args, **kw)
        started.append(daemon)
        return daemon

    yield start
    codes = {d.proc.pid: d.stop() for d in started}
    assert all(c in (0, -signal.SIGKILL) for c in codes.values()), f"daemon exit codes {codes}"


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    """A daemon that allows the test commands and root."""
    return start_daemon()


@pytest.fixture
def traversable(tmp_path, tmp_path_factory) -> Path:
    """Make the directories down to tmp_path traversable by other users (0711), so tests can
    run shims as test users (pytest makes them 0700)."""
    top = tmp_path_factory.getbasetemp().parent
    path = tmp_path
    while True:
        os.chmod(path, os.stat(path).st_mode | 0o711)
        if path == top or path == path.parent:
            return tmp_path
        path = path.parent


@pytest.fixture
def work(tmp_path) -> Path:
    """The caller's working directory."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def offld_argv(daemon: Daemon, *command: str, opts=()) -> list[str]:
    """The argv of ``offld`` sending ``command`` to ``daemon``."""
    return [OFFLD, "-H", daemon.hostport, *opts, "--", *command]


def offld(daemon: Daemon, *command: str, cwd: Path, opts=(), **kw) -> subprocess.CompletedProcess:
    """Run ``offld`` to completion (bounded) and capture its output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(offld_argv(daemon, *command, opts=opts), cwd=cwd, **kw)
