"""A person at a terminal: a real interactive bash on a real pty, commands through the shim and
through ``offld``, straight to a host and through a broker.

What must hold is what a user sees at a local terminal: the job has a terminal of the window's
size, reads what is typed, ends on Ctrl-D, stops on Ctrl-Z (and nothing is printed while it is
stopped), goes on with fg, dies of Ctrl-C; a background job reading the terminal stops; and the
terminal's settings are the same afterwards, however the job ended.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from offloadfs import protocol, terminal

from ..harness import BIN, OFFLD, Broker, fuse_mounts, wait_for
from .test_security import Keys

COMMANDS = {"sh": "/bin/sh", "cat": "/bin/cat", "sleep": "/bin/sleep",
            "python3": "/usr/bin/python3", "stty": "/bin/stty"}
STTY_G = rb"([0-9a-f]+(?::[0-9a-f]+){20,})\r\n"    # what stty -g prints
TICKS = b"python3 -u -c 'import time\nwhile True: print(\"tick\"); time.sleep(0.2)'"


class Shell:
    """``bash -i`` on a pty of 40x100, driven by writing keys to the master and reading the
    screen's bytes back (what a terminal emulator would show)."""

    def __init__(self, cwd: Path, path: str, prefix: bytes = b""):
        """Start bash with ``path`` first on PATH; ``prefix`` goes before offloaded commands."""
        self.prefix = prefix
        env = dict(os.environ, PATH=f"{path}:{BIN}:/usr/bin:/bin", PS1="PROMPT$ ", TERM="xterm")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(cwd)
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.resize(40, 100)
        self.buf = b""
        assert self.prompt(), self.buf

    def resize(self, rows: int, cols: int) -> None:
        """Change the window size (the kernel sends SIGWINCH to the foreground group)."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, pattern: bytes, timeout: float = 10) -> bool:
        """Read the screen until ``pattern`` shows up (True) or the deadline passes."""
        end = time.monotonic() + timeout
        while True:
            if re.search(pattern, self.buf):
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.05))
            if ready:
                try:
                    self.buf += os.read(self.fd, 65536)
                except OSError:
                    return False

    def quiet_for(self, seconds: float, pattern: bytes) -> bool:
        """True if ``pattern`` does not show up for ``seconds`` (nothing printed meanwhile)."""
        self.buf = b""
        return not self.expect(pattern, seconds)

    def send(self, keys: bytes) -> None:
        """Type ``keys`` (the screen seen so far is forgotten)."""
        self.buf = b""
        os.write(self.fd, keys)

    def line(self, text: bytes, offload: bool = True) -> None:
        """Type a command line and Enter; ``offload`` puts the prefix (offld ...) before it."""
        self.send((self.prefix if offload else b"") + text + b"\n")

    def prompt(self, timeout: float = 15) -> bool:
        """True once bash shows its prompt again."""
        return self.expect(rb"PROMPT\$ $", timeout)

    def wait_reading(self, pid_of, timeout: float = 15) -> None:
        """Wait until the job (``pid_of()`` finds it) sleeps reading its terminal."""
        wait_for(lambda: _reading_tty(pid_of()), timeout, "the job to read its terminal")

    def settings(self) -> bytes:
        """``stty -g`` of this terminal, run locally."""
        self.line(b"/bin/stty -g", offload=False)
        assert self.expect(STTY_G), self.buf
        text = re.search(STTY_G, self.buf).group(1)
        assert self.prompt()
        return text

    def close(self) -> None:
        """Hang up: kill bash and whatever is left of its jobs, close the master."""
        for sig in (signal.SIGHUP, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def _reading_tty(pid: int | None) -> bool:
    """True if ``pid`` sleeps in read(2) of a terminal (/proc/PID/syscall: number, fd, ...)."""
    if pid is None:
        return False
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()
        return call[0] == "0" and os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}").startswith(
            "/dev/pts/")
    except (OSError, IndexError, ValueError):
        return False


class Route:
    """How the test's commands reach a host: the shim or offld, straight or via a broker."""

    def __init__(self, client: str, hosts, mount=None, endpoint: str = ""):
        """``hosts``: the daemons that may run jobs; ``mount`` for the shim's route."""
        self.client, self.hosts, self.mount, self.endpoint = client, hosts, mount, endpoint

    def shell(self, cwd: Path, config: str | None = None) -> Shell:
        """An interactive bash that offloads this route's way."""
        if self.client == "shim":
            return Shell(cwd, str(self.mount.path))
        flag = b"-L" if "broker" in self.endpoint else b"-H"
        host = self.endpoint.split("@")[-1].encode()
        conf = b"-c %s " % config.encode() if config else b""
        return Shell(cwd, "/usr/bin", b"%s %s%s %s -- " % (OFFLD.encode(), conf, flag, host))

    def ran(self, command: str) -> int:
        """How many jobs of ``command`` the hosts started."""
        return sum(h.log().count(f"({command}) started") for h in self.hosts)


ROUTES = ["shim", "offld", "shim-broker", "offld-broker"]


@pytest.fixture(params=ROUTES)
def route(request, start_daemon, start_mount, tmp_path):
    """Each way a command reaches a host."""
    return _route(request.param, start_daemon, start_mount, tmp_path)


@pytest.fixture(params=["shim", "offld"])
def direct(request, start_daemon, start_mount, tmp_path):
    """The shim and offld, straight to a host."""
    return _route(request.param, start_daemon, start_mount, tmp_path)


def _route(name: str, start_daemon, start_mount, tmp_path, daemon_args=(), config=None):
    """Start what route ``name`` needs (the broker is stopped by the caller's teardown)."""
    client, _, via = name.partition("-")
    if via == "broker":
        broker = Broker(tmp_path, args=["-c", config] if config else [])
        host = start_daemon("--connect", broker.workers, *daemon_args, commands=COMMANDS)
        wait_for(lambda: " ready: " in broker.log(), 20, "the host to be ready")
        endpoint, flag = f"broker@127.0.0.1:{broker.client_port}", "-L"
        _brokers.append(broker)
    else:
        host = start_daemon(*daemon_args, commands=COMMANDS)
        endpoint, flag = host.hostport, "-H"
    mount = None
    if client == "shim":
        args = ["-c", config] if config else []
        mount = start_mount(flag, endpoint.split("@")[-1], *args, wait_for_shim="python3")
    return Route(client, [host], mount, endpoint)


_brokers: list[Broker] = []


@pytest.fixture(autouse=True)
def stop_brokers():
    """Brokers started by routes end with the test."""
    yield
    while _brokers:
        _brokers.pop().stop()


@pytest.fixture
def shell_of(work):
    """Factory of shells for a route; each is hung up at teardown."""
    shells: list[Shell] = []

    def make(route: Route, config: str | None = None) -> Shell:
        shell = route.shell(work, config)
        shells.append(shell)
        return shell

    yield make
    for shell in shells:
        shell.close()


def job_pid(marker: str):
    """A finder of the host's process for a job whose command line holds ``marker``: the one
    whose parent is the pty's session leader (ptyleader.py)."""
    def find() -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
                parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd and b"ptyleader.py" in parent:
                return int(entry)
        return None
    return find


# --- every route ------------------------------------------------------------------------------

def test_the_job_has_a_terminal_of_the_windows_size(route, shell_of):
    """[ -t 0/1/2 ] hold on the host, stty size is the caller's window."""
    sh = shell_of(route)
    sh.line(b"sh -c '[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; stty size'")
    assert sh.expect(rb"all-tty\r\n40 100\r\n") and sh.prompt(), sh.buf
    assert route.ran("sh") == 1


def test_a_python_prompt_reads_typed_lines_and_ends_on_ctrl_d(route, shell_of):
    """The REPL round trip: prompt, a typed line, its answer, Ctrl-D back to the shell."""
    repl_round_trip(shell_of(route))
    assert route.ran("python3") == 1


def repl_round_trip(sh: Shell) -> None:
    """python3's prompt, a typed line (echoed), its answer, the prompt, Ctrl-D, the shell."""
    sh.line(b"python3 -q -i")
    assert sh.expect(rb">>> $", 20), sh.buf
    sh.send(b"print(6*7)\n")
    assert sh.expect(rb"print\(6\*7\)\r\n42\r\n>>> $"), sh.buf
    sh.send(b"\x04")
    assert sh.prompt(), sh.buf


@pytest.mark.usefixtures("shim_kind")   # the shim's z and t replies, both shims
def test_ctrl_z_stops_the_job_fg_resumes_it_ctrl_c_ends_it(route, shell_of):
    """^Z: the shell says Stopped and nothing is printed; fg: ticks again; ^C: the prompt."""
    sh = shell_of(route)
    sh.line(TICKS)
    assert sh.expect(rb"\ntick\r\n", 20), sh.buf
    sh.send(b"\x1a")
    assert sh.expect(rb"\[1\]\+\s+Stopped") and sh.prompt(5), sh.buf
    assert sh.quiet_for(1.0, rb"tick"), sh.buf
    sh.line(b"fg", offload=False)
    assert sh.expect(rb"\ntick\r\n", 5), sh.buf
    sh.send(b"\x03")
    assert sh.expect(rb"KeyboardInterrupt") and sh.prompt(), sh.buf


def test_cat_reads_the_terminal_and_ctrl_d_leaves_nothing_for_the_shell(route, shell_of):
    """Typed lines reach cat (echoed by the host's pty, then written back by cat); after ^D
    the shell gets nothing of what was typed."""
    sh = shell_of(route)
    sh.line(b"cat")
    sh.wait_reading(job_pid("cat"))
    sh.send(b"typed-line\n")
    assert sh.expect(rb"typed-line\r\ntyped-line\r\n"), sh.buf
    sh.send(b"\x04")
    assert sh.prompt(), sh.buf
    sh.line(b"echo after-$((40+2))", offload=False)
    assert sh.expect(rb"after-42\r\n") and sh.prompt(), sh.buf
    assert b"command not found" not in sh.buf


def test_a_window_change_reaches_the_job(route, shell_of):
    """The job's pty gets the new size and the job SIGWINCH."""
    sh = shell_of(route)
    sh.line(b"sh -c 'trap \"stty size\" WINCH; echo ready; while :; do sleep 0.05; done'")
    assert sh.expect(rb"ready\r\n", 20), sh.buf
    sh.resize(50, 120)
    assert sh.expect(rb"50 120\r\n"), sh.buf
    sh.send(b"\x03")
    assert sh.prompt(), sh.buf


@pytest.mark.usefixtures("shim_kind")   # the shim's z and t replies, both shims
def test_a_background_job_reading_the_terminal_stops_as_locally(route, shell_of):
    """`cmd &` that reads: Stopped (SIGTTIN), and fg gives it the terminal; one that does not
    read runs to its end in the background."""
    sh = shell_of(route)
    sh.line(b"python3 -c 'print(\"got\", input())' &")
    assert sh.prompt(), sh.buf
    wait_for(lambda: _stopped("print(") >= 2 and _stopped("print(", parent=sh.pid), 20,
             "the job here (the shell's own child) and on the host to stop")
    sh.send(b"\n")
    assert sh.expect(rb"\[1\]\+\s+Stopped") and sh.prompt(), sh.buf
    sh.line(b"fg", offload=False)
    sh.wait_reading(job_pid("print("))
    sh.send(b"hello\n")
    assert sh.expect(rb"got hello\r\n") and sh.prompt(), sh.buf
    sh.line(b"sh -c 'sleep 0.5; echo bg-done' &")
    assert sh.prompt(), sh.buf
    sh.line(b"wait; echo waited-$?", offload=False)
    assert sh.expect(rb"bg-done\r\n[\s\S]*waited-0\r\n") and sh.prompt(), sh.buf
    assert b"Stopped" not in sh.buf


def _stopped(marker: str, parent: int | None = None) -> int:
    """How many processes whose command line holds ``marker`` are stopped (state T): the
    job on the host and its client here (the shim, or offld); with ``parent``, only that
    process's children (the shell's own child: what its job table says Stopped for)."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        mine = parent is None or int(fields[1]) == parent
        count += marker.encode() in cmd and fields[0] == "T" and mine
    return count


@pytest.mark.usefixtures("shim_kind")   # the shim's z and t replies, both shims
def test_the_terminal_is_restored_when_a_raw_job_is_killed_on_the_host(route, shell_of):
    """A job in raw mode (its own pty's), SIGKILLed on the host: the caller's settings are
    what they were before."""
    sh = shell_of(route)
    before = sh.settings()
    sh.line(b"python3 -c 'import tty,time; tty.setraw(0); print(\"raw-now\"); time.sleep(60)'")
    assert sh.expect(rb"[\r\n]raw-now\n", 20), sh.buf
    os.kill(wait_for(job_pid("tty.setraw"), 10, "the job"), signal.SIGKILL)
    assert sh.prompt(), sh.buf
    assert sh.settings() == before


# --- straight to a host, shim and offld ---------------------------------------------------

def test_pipes_stay_pipes_at_a_terminal(direct, shell_of):
    """Only stdout and stderr that are the terminal become the host's pty: `cmd | cat` sees
    a pipe, `echo x | cmd` reads the pipe."""
    sh = shell_of(direct)
    sh.line(b"sh -c '[ -t 1 ] && echo out-tty || echo out-pipe; [ -t 2 ] && echo err-tty >&2'"
            b" | cat")
    assert sh.expect(rb"out-pipe\r\nerr-tty\r\n|err-tty\r\nout-pipe\r\n") and sh.prompt(), \
        sh.buf
    sh.send(b"echo piped | " + sh.prefix + b"sh -c '[ -t 0 ] || cat; [ -t 1 ] && echo out-tty'\n")
    assert sh.expect(rb"piped\r\nout-tty\r\n") and sh.prompt(), sh.buf


def test_a_pager_downstream_keeps_the_terminal_settings_it_chose(direct, shell_of, work):
    """`cmd | pager`: the pager (here: stty -echo, read, stty -g) sets the terminal; the job
    ending upstream leaves those settings alone, exactly as when cmd runs locally."""
    (work / "pager").write_text("/bin/stty -echo </dev/tty\ncat >/dev/null\n"
                                "/bin/stty -g </dev/tty\n/bin/stty echo </dev/tty\n")
    sh = shell_of(direct)
    settings = []
    for prefix, offload in ((b"/bin/", False), (b"", True)):
        sh.line(prefix + b"sh -c 'sleep 1; echo done' | /bin/sh pager", offload=offload)
        assert sh.expect(STTY_G) and sh.prompt(), sh.buf
        settings.append(re.search(STTY_G, sh.buf).group(1))
    assert settings[0] == settings[1]
    assert direct.ran("sh") == 1


def test_offld_t_forces_a_terminal_and_T_refuses_one(daemon, work, shell_of):
    """-t without a terminal here: the job has one; -T at a terminal: pipes."""
    script = "[ -t 0 ] && [ -t 1 ] && echo has-tty || echo no-tty"
    got = subprocess.run([OFFLD, "-H", daemon.hostport, "-t", "--", "sh", "-c", script],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=work)
    assert got.stdout.replace(b"\r", b"") == b"has-tty\n" and got.returncode == 0, got
    got = subprocess.run([OFFLD, "-H", daemon.hostport, "--", "sh", "-c", script],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=work)
    assert got.stdout == b"no-tty\n", got
    sh = shell_of(Route("offld", [daemon], endpoint=daemon.hostport))
    sh.send(OFFLD.encode() + b" -T -H " + daemon.hostport.encode() + b" -- sh -c '%s'\n"
            % script.encode())
    assert sh.expect(rb"no-tty\r\n") and sh.prompt(), sh.buf


@pytest.mark.parametrize("tty", [True, False])
def test_kill_tstp_of_the_client_stops_the_job_and_fg_resumes_it(direct, shell_of, work, tty):
    """kill -TSTP of the shim or offld (not a key): Stopped, as for a local process, and the
    job on the host stops too; fg resumes both. Without a terminal the job is stopped with
    SIGSTOP there (its group is orphaned), yet the shell says Stopped, not Stopped (signal)."""
    sh = shell_of(direct)
    redirect = b"" if tty else b" </dev/null >ticks.txt 2>&1"
    sh.line(b"sh -c 'while :; do echo tick; sleep 0.1; done'" + redirect)
    if tty:
        assert sh.expect(rb"\ntick\r\n", 20), sh.buf
    else:
        wait_for(lambda: (work / "ticks.txt").exists() and (work / "ticks.txt").stat().st_size,
                 20, "the job's first tick")
    client = wait_for(_client_of(direct, b"while :"), 10, "the client")
    os.kill(client, signal.SIGTSTP)
    assert sh.expect(rb"\[1\]\+\s+Stopped\s+[^(]") and sh.prompt(5), sh.buf
    size = (work / "ticks.txt").stat().st_size if not tty else 0
    assert sh.quiet_for(1.0, rb"tick"), sh.buf
    assert tty or (work / "ticks.txt").stat().st_size == size
    sh.line(b"fg", offload=False)
    if tty:
        assert sh.expect(rb"\ntick\r\n", 5), sh.buf
    else:
        wait_for(lambda: (work / "ticks.txt").stat().st_size > size, 5, "ticks again")
    sh.send(b"\x03")
    assert sh.prompt(), sh.buf


def _client_of(route: Route, marker: bytes):
    """A finder of the client process here: the shim (the program MOUNT/sh, or dash running
    the script MOUNT/sh) or offld."""
    shim = b"" if route.client == "offld" else str(route.mount.path / "sh").encode()
    name = b"/offld\0" if route.client == "offld" else shim + b"\0"
    def find() -> int | None:
        for entry in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                exe = os.readlink(f"/proc/{entry}/exe").encode() if shim else b""
            except OSError:
                continue
            if (name in cmd or exe == shim) and marker in cmd:
                return int(entry)
        return None
    return find


# --- a stopped client keeps its job --------------------------------------------------------

@pytest.mark.parametrize("via", ["", "-broker"])
def test_a_stopped_offld_keeps_its_job_past_the_hosts_timeouts(via, start_daemon, start_mount,
                                                                tmp_path, shell_of):
    """Suspended for three times the host's (and the broker's) client timeout, the job is
    still there when fg resumes it."""
    cfg = tmp_path / "broker.toml"
    cfg.write_text("[broker]\nclient_timeout = 1.0\n")
    route = _route("offld" + via, start_daemon, start_mount, tmp_path,
                   ("--client-timeout", "1"), str(cfg) if via else None)
    sh = shell_of(route)
    sh.line(TICKS)
    assert sh.expect(rb"\ntick\r\n", 20), sh.buf
    sh.send(b"\x1a")
    assert sh.expect(rb"Stopped") and sh.prompt(5), sh.buf
    time.sleep(3)     # the point of the test: three client timeouts of silence
    sh.line(b"fg", offload=False)
    assert sh.expect(rb"\ntick\r\n", 10), sh.buf
    sh.send(b"\x03")
    assert sh.expect(rb"KeyboardInterrupt") and sh.prompt(), sh.buf
    assert "silent" not in route.hosts[0].log()


# --- the client goes away while the terminal is raw ----------------------------------------

def test_the_terminal_is_restored_when_offld_is_terminated(start_daemon, shell_of):
    """SIGTERM to offld: forwarded, the job ends, the terminal comes back as it was."""
    daemon = start_daemon(commands=COMMANDS)
    sh = shell_of(Route("offld", [daemon], endpoint=daemon.hostport))
    before = sh.settings()
    sh.line(b"python3 -c 'import time; print(\"sleeping\"); time.sleep(60)'")
    assert sh.expect(rb"[\r\n]sleeping\r\n", 20), sh.buf
    offld = wait_for(_offld_pid, 10, "offld")
    os.kill(offld, signal.SIGTERM)
    assert sh.prompt(), sh.buf
    assert sh.settings() == before


def _offld_pid() -> int | None:
    """The pid of the offld process running the test's sleeper."""
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"/offld\0" in cmd and b"sleeping" in cmd:
            return int(entry)
    return None


@pytest.mark.usefixtures("shim_kind")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_terminal_is_restored_when_the_mount_stops_or_dies(how, start_daemon, start_mount,
                                                               shell_of):
    """The mount's process stopped (SIGTERM, as systemd does) or killed while a job runs with
    the terminal raw: one line, and the settings are back (put back by the agent, or by the
    shim itself with stty when the agent could do nothing)."""
    host = start_daemon(commands=COMMANDS)
    mount = start_mount("-H", host.hostport, wait_for_shim="python3")
    sh = shell_of(Route("shim", [host], mount))
    before = sh.settings()
    sh.line(b"python3 -c 'import time; print(\"sleeping\"); time.sleep(60)'")
    assert sh.expect(rb"[\r\n]sleeping\r\n", 20), sh.buf
    mount.proc.send_signal(how)
    assert sh.expect(rb"offloadfs: .*(stopping|went away)") and sh.prompt(), sh.buf
    assert sh.settings() == before
    mount.proc.wait(20)
    if str(mount.path) in fuse_mounts():   # the kernel may drop it meanwhile: not checked
        subprocess.run(["fusermount", "-u", "-z", str(mount.path)], stderr=subprocess.DEVNULL)
    wait_for(lambda: str(mount.path) not in fuse_mounts(), 10, "the mount to go")


# --- with CURVE keys -----------------------------------------------------------------------

def test_a_terminal_job_with_keys(start_daemon, start_mount, tmp_path, shell_of):
    """The REPL round trip through the shim and offld when the host requires keys."""
    keys = Keys(tmp_path)
    host = start_daemon("-c", keys.host_toml('[security.vms.vm]\nuids = "0-65535"\n'),
                        commands=COMMANDS)
    mount = start_mount("-H", host.hostport, config=keys.vm_toml(), wait_for_shim="python3")
    for route, config in ((Route("shim", [host], mount), None),
                          (Route("offld", [host], endpoint=host.hostport), keys.vm_toml())):
        repl_round_trip(shell_of(route, config))
    assert host.log().count("(python3) started") == 2


# --- the pieces, without sockets ------------------------------------------------------------

def test_saved_settings_read_as_stty_g_writes_them():
    """Terminal.stty() is what coreutils' stty -g prints for the same terminal."""
    master, slave = os.openpty()
    try:
        t = terminal.choose((slave, slave, slave), os.getpid())
        got = subprocess.run(["stty", "-g"], stdin=slave, capture_output=True, text=True)
        assert t.stty() == got.stdout.strip()
    finally:
        os.close(master)
        os.close(slave)


def test_which_fds_the_hosts_pty_takes():
    """Pipes: none; stdin alone: none (relayed as a pipe); stdout or stderr: those; stdin
    with stdout; -t: all; -T: none."""
    master, slave = os.openpty()
    r, w = os.pipe()
    try:
        assert terminal.choose((r, w, w), os.getpid()) is None
        assert terminal.choose((slave, w, w), os.getpid()) is None   # stdin alone: relayed
        assert terminal.choose((r, w, slave), os.getpid()).mask == protocol.TTY_STDERR
        assert terminal.choose((slave, w, slave), os.getpid()).mask == protocol.TTY_STDERR
        assert terminal.choose((r, slave, w), os.getpid()).mask == protocol.TTY_STDOUT
        t = terminal.choose((slave, slave, w), os.getpid())
        assert t.mask == protocol.TTY_STDIN | protocol.TTY_STDOUT and t.reads_keys
        assert terminal.choose((r, w, w), os.getpid(), "force").mask == 7
        assert terminal.choose((slave, slave, slave), os.getpid(), "never") is None
        spec = t.spec()
        assert (spec["rows"], spec["cols"]) == terminal.window_size(slave)[:2]
        assert protocol.decode(protocol.encode(
            "submit", "j", argv=[b"x"], cwd=b"/", uid=0, gid=0, groups=[], env={}, window=1,
            tty=spec))["tty"]["fds"] == t.mask
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)
