"""Shared helpers of the benchmarks: a throw-away daemon, timed runs, statistics, reports.

Every benchmark measures through these so that their numbers are taken the same way: wall
time of a whole command (``timed_run``), median and p99 (``summary``), the stage breakdown
``offld -p`` prints (``parse_profile``), then a table on stdout and ``bench/results/NAME.json``
+ ``NAME.png`` (``publish``). ``daemon`` starts a throw-away ``offloadd``; ``shims`` mounts its
shims (``offloadfs mount -f``) on a temporary mount point; ``broker`` starts a throw-away
``offloadd broker`` and ``host`` an ``offloadd serve --connect`` to it; ``cpu_seconds`` and
``system_cpu`` read what processes and the machine spent. What offloadfs is compared with runs
from here too: ``sshd`` (Debian's openssh-server on an ephemeral loopback port, its own config
and keys), ``distccd`` (likewise), and ``cpu_quota`` (a cgroup capping a "VM" to a share of one
CPU). Every one of them is stopped, unmounted or removed on the way out, even on error. The
processes are tests/harness.py's (the tests start theirs the same way); its HarnessError is
our BenchError.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests import harness
from tests.harness import START_DEADLINE, HarnessError, accepts, end_tree, free_port

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = RESULTS.parent.parent
PROFILE = re.compile(r"offld: profile on \S+: (.*)$", re.MULTILINE)
STAGE = re.compile(r"(\w+) ([0-9.]+) ms")
STOP_DEADLINE = 5.0
XATTR_POLICY, XATTR_STATS = "user.offload.policy", "user.offload.stats"
XATTR_STATUS = "user.offload.status"   # on the mount's root: hosts and recent jobs (JSON)


def compile_package(root: Path = PROJECT) -> int:
    """Byte-compile offloadfs/ and daemon/ (how many modules were compiled): a wheel or the
    .deb installs them compiled, while an editable tree run with PYTHONDONTWRITEBYTECODE=1 (as
    these machines set it) would compile each module again at every offld start (+47 ms)."""
    import compileall
    import py_compile

    before = sum(1 for top in ("offloadfs", "daemon") for _ in (root / top).rglob("*.pyc"))
    for top in ("offloadfs", "daemon"):
        compileall.compile_dir(str(root / top), quiet=1,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return sum(1 for top in ("offloadfs", "daemon") for _ in (root / top).rglob("*.pyc")) - before

BenchError = HarnessError   # a benchmark cannot go on: one line (and maybe a log tail) to say


# --- tools ----------------------------------------------------------------------------------

def tool(name: str) -> str:
    """The path of a console script of this venv (``offld``, ``offloadd``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise BenchError(f"{path} not found: install the project in this venv (make install)")
    return str(path)


def warn(text: str) -> None:
    """A problem stopping something, said on stderr (the benchmark goes on)."""
    print(f"bench: {text}", file=sys.stderr)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temp dir for throw-away processes (removed on the way out), once this venv is known
    to have offloadd and offloadfs."""
    tool("offloadd")
    tool("offloadfs")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp).resolve()


# --- the daemon, a broker and its hosts -----------------------------------------------------

class Daemon(harness.Daemon):
    """A throw-away ``offloadd serve`` of :func:`daemon` or :func:`host`: benchmarks reach it
    at ``host`` ("" if it does not listen) with :meth:`client_env`."""

    @property
    def host(self) -> str:
        """ADDRESS:PORT (127.0.0.1 unless told), or "" for a host that only connects to a
        broker."""
        return self.hostport

    def client_env(self) -> dict[str, str]:
        """The environment for clients: the job log goes to the daemon's temp dir, not ~."""
        return {**os.environ, "XDG_STATE_HOME": str(self.workdir / "state")}


@contextlib.contextmanager
def daemon(commands: dict[str, str], *flags: str, address: str = "127.0.0.1",
           prefix: Sequence[str] = ()) -> Iterator[Daemon]:
    """``offloadd serve`` on an ephemeral port of ``address`` (loopback unless told) allowing
    ``commands``, started after ``prefix`` (e.g. nsenter into a namespace); always stopped."""
    with scratch("offloadfs-bench-") as tmp:
        d = Daemon(tmp, *flags, commands=commands, allow_root=os.geteuid() == 0,
                   address=address, prefix=prefix)
        try:
            yield d
        finally:
            d.stop(deadline=STOP_DEADLINE, warn=warn)


@contextlib.contextmanager
def broker(*flags: str, clients: str = "tcp://127.0.0.1:0",
           prefix: Sequence[str] = ()) -> Iterator[harness.Broker]:
    """``offloadd broker`` taking clients on ``clients`` (an ephemeral loopback port unless
    told) and hosts on an ephemeral loopback port, started after ``prefix``; always stopped."""
    with scratch("offloadfs-bench-broker-") as tmp:
        b = harness.Broker(tmp, clients=clients, args=flags, prefix=prefix)
        try:
            yield b
        finally:
            b.stop(deadline=STOP_DEADLINE, warn=warn)


@contextlib.contextmanager
def host(commands: dict[str, str], connect: str, *flags: str, listen: bool = False,
         prefix: Sequence[str] = ()) -> Iterator[Daemon]:
    """``offloadd serve --connect connect`` allowing ``commands``, started after ``prefix``;
    with ``listen`` also on an ephemeral loopback port for direct clients (``Daemon.host``,
    else ""). Always stopped; wait for the broker to log it ready with
    ``Broker.wait_hosts``."""
    with scratch("offloadfs-bench-host-") as tmp:
        d = Daemon(tmp, "--connect", connect, *flags, commands=commands,
                   allow_root=os.geteuid() == 0, listen=listen, prefix=prefix)
        try:
            yield d
        finally:
            d.stop(deadline=STOP_DEADLINE, warn=warn)


# --- the shims -----------------------------------------------------------------------------

class Shims(harness.Mount):
    """A throw-away ``offloadfs mount -f`` of :func:`shims`: its shims, their policies and
    counts."""

    def shim(self, name: str) -> str:
        """The path of shim ``name`` (what a PATH lookup with the mount first finds)."""
        return str(self.path / name)

    def stats(self, name: str) -> dict:
        """The mount's counts for shim ``name``: {"jobs", "failures", "fallbacks", "mean_ms"}."""
        return json.loads(os.getxattr(self.shim(name), XATTR_STATS))

    def offloaded(self, name: str, expected: int) -> dict:
        """Shim ``name``'s stats, after checking that all ``expected`` runs went to the daemon
        (a local fallback would measure the wrong thing, with the same output)."""
        stats = self.stats(name)
        if (stats["jobs"], stats["failures"], stats["fallbacks"]) != (expected, 0, 0):
            raise BenchError(f"{name} shim: expected {expected} offloaded jobs, the mount "
                             f"counted {stats}:\n{self.log_tail()}")
        return stats

    def last_job(self) -> dict:
        """The mount's record of its latest job (``offloadfs status``): where it ran, its
        exit status and the host's stage times in seconds (queue, attach, run, drain)."""
        jobs = json.loads(os.getxattr(str(self.path), XATTR_STATUS))["jobs"]
        if not jobs:
            raise BenchError(f"the mount at {self.path} has run no job")
        return jobs[-1]

    def set_policy(self, name: str, policy: str) -> None:
        """Set shim ``name``'s policy (auto, always, never); kept in this mount's temp state."""
        os.setxattr(self.shim(name), XATTR_POLICY, policy.encode())


@contextlib.contextmanager
def shims(d: Daemon, names: Sequence[str], *flags: str,
          prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> Iterator[Shims]:
    """The shims of daemon ``d`` mounted on a temporary mount point (the mount process started
    after ``prefix``: e.g. into a cgroup and a namespace; with ``env`` added to ours, e.g.
    OFFLOADFS_SHIM=script), ready once every shim in ``names`` is listed; always unmounted
    (and the mount process ended) on the way out.

    The mount keeps its policy state under its own temporary ``XDG_STATE_HOME``."""
    with scratch("offloadfs-bench-mount-") as top:
        env = {**os.environ, **(env or {}), "XDG_STATE_HOME": str(top / "state")}
        m = Shims(top, *flags, hosts=[d.host], wait_for_shim=names, env=env, prefix=prefix)
        try:
            yield m
        finally:
            m.unmount(warn=warn)


# --- processes and memory -------------------------------------------------------------------

def started(argv: Sequence[str], log: Path, port: int, what: str) -> subprocess.Popen:
    """``argv`` (``what`` in errors) started, once 127.0.0.1:``port`` takes connections."""
    server = harness.Proc(argv, log, what=what)
    server.ready(lambda: accepts(port), f"listen on 127.0.0.1:{port}")
    return server.proc


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory (VmHWM) of process ``pid`` in MB (10^6 bytes); 0.0 if gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def reset_peak_rss(pid: int) -> None:
    """Start process ``pid``'s peak resident memory afresh (its current size)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- ssh and distcc: what offloadfs is compared with ----------------------------------------

SSHD = "/usr/sbin/sshd"
SSHD_PRIVSEP = Path("/run/sshd")   # Debian's sshd refuses to start without it
SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/host_ed25519
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 100
MaxSessions 100
"""


@dataclasses.dataclass
class Sshd:
    """A running throw-away sshd on 127.0.0.1 and a client key it accepts."""

    port: int
    tmp: Path
    log: Path
    proc: subprocess.Popen

    @property
    def target(self) -> str:
        """user@127.0.0.1 for this process's user."""
        return f"{user_name()}@127.0.0.1"

    def options(self, master: str | None = None) -> list[str]:
        """The client's options: our key and port, a throw-away known_hosts, batch mode; with
        ``master`` ("yes" or "no") the ControlMaster setting and our ControlPath."""
        opts = ["-F", "/dev/null", "-i", str(self.tmp / "id_ed25519"), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}", "-o", "LogLevel=ERROR"]
        if master:
            opts += ["-o", f"ControlPath={self.tmp / 'cm'}", "-o", f"ControlMaster={master}"]
        return opts

    def argv(self, command: Sequence[str], mux: bool = False) -> list[str]:
        """ssh running ``command`` here through this sshd: a new connection with key auth, or
        with ``mux`` a session over the connection of :func:`ssh_master`."""
        return ["ssh", *self.options("no" if mux else None), self.target, "--",
                shlex.join(command)]


def user_name() -> str:
    """This process's user name (for ssh user@host)."""
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


@contextlib.contextmanager
def sshd() -> Iterator[Sshd]:
    """Debian's sshd on an ephemeral loopback port with its own config, host key and
    authorized key in a temp dir (the system's sshd and its config are never touched);
    always stopped, with every session process it started."""
    if not os.access(SSHD, os.X_OK):
        raise BenchError(f"{SSHD} not found: install openssh-server (make bench does)")
    made_privsep = not SSHD_PRIVSEP.exists()
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-sshd-") as name:
        tmp = Path(name)
        for key in ("host_ed25519", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                            "-f", str(tmp / key)], check=True, stdin=subprocess.DEVNULL)
        (tmp / "authorized_keys").write_bytes((tmp / "id_ed25519.pub").read_bytes())
        port = free_port()
        (tmp / "sshd_config").write_text(SSHD_CONFIG.format(port=port, tmp=tmp))
        if made_privsep:
            SSHD_PRIVSEP.mkdir(mode=0o755)
        log = tmp / "sshd.log"
        try:
            proc = started([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], log, port, "sshd")
            try:
                yield Sshd(port, tmp, log, proc)
            finally:
                end_tree(proc)
        finally:
            if made_privsep:
                with contextlib.suppress(OSError):
                    SSHD_PRIVSEP.rmdir()


@contextlib.contextmanager
def ssh_master(s: Sshd) -> Iterator[int]:
    """An ssh ControlMaster connection to ``s`` (``Sshd.argv(..., mux=True)`` uses it), its
    pid yielded; always told to exit, and killed if it does not."""
    start = ["ssh", *s.options("yes"), "-o", "ControlPersist=yes",
             "-E", str(s.tmp / "master.log"), "-f", "-N", s.target]
    subprocess.run(start, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=START_DEADLINE)
    control = ["ssh", *s.options("no")]
    check = subprocess.run([*control, "-O", "check", s.target], capture_output=True, text=True,
                           check=False)
    found = re.search(r"pid=(\d+)", check.stderr)
    pid = int(found.group(1)) if found else 0
    try:
        if not pid:
            raise BenchError(f"ssh ControlMaster did not start: {check.stderr.strip()}")
        yield pid
    finally:
        subprocess.run([*control, "-O", "exit", s.target], capture_output=True, check=False)
        end = time.monotonic() + STOP_DEADLINE
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < end:
            time.sleep(0.02)
        if pid and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


DISTCCD = "/usr/bin/distccd"
DISTCC_USER = "distccd"   # Debian's distcc package creates it; distccd as root needs --user


@dataclasses.dataclass
class Distccd:
    """A running throw-away distccd on 127.0.0.1 and the client environment that uses it."""

    port: int
    tmp: Path
    log: Path
    proc: subprocess.Popen
    jobs: int

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ours) with distcc sent to this server only, never falling back to
        compiling locally (a failure is an error, not a silently local figure)."""
        return {**(os.environ if base is None else base),
                "DISTCC_HOSTS": f"127.0.0.1:{self.port}/{self.jobs}",
                "DISTCC_DIR": str(self.tmp / "client"), "DISTCC_FALLBACK": "0",
                "DISTCC_SKIP_LOCAL_RETRY": "1", "DISTCC_BACKOFF_PERIOD": "0"}

    def compiled(self) -> int:
        """How many compilations the server logged as done."""
        return self.log.read_bytes().count(b"COMPILE_OK")


@contextlib.contextmanager
def distccd(jobs: int | None = None) -> Iterator[Distccd]:
    """Debian's distccd in the foreground on an ephemeral loopback port, serving 127.0.0.1
    only; always stopped with its workers."""
    if not os.access(DISTCCD, os.X_OK):
        raise BenchError(f"{DISTCCD} not found: install distcc (make bench does)")
    jobs = jobs or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-distccd-") as name:
        tmp, port = Path(name), free_port()
        (tmp / "client").mkdir()
        log = tmp / "distccd.log"
        argv = [DISTCCD, "--daemon", "--no-detach", "--log-stderr", "--log-level=info",
                "--listen", "127.0.0.1", "--port", str(port), "--allow", "127.0.0.1",
                "--jobs", str(jobs)]
        if os.geteuid() == 0:
            argv += ["--user", DISTCC_USER]
        proc = started(argv, log, port, "distccd")
        try:
            yield Distccd(port, tmp, log, proc, jobs)
        finally:
            end_tree(proc)


# --- a slow "VM": a cgroup with a CPU quota -------------------------------------------------

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000


@dataclasses.dataclass
class CpuCgroup:
    """A cgroup whose processes together get ``percent`` % of one CPU."""

    path: Path
    version: int
    percent: float

    def set(self, percent: float) -> None:
        """Cap the cgroup at ``percent`` % of one CPU from now on."""
        quota = int(CFS_PERIOD_US * percent / 100)
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        self.percent = percent

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run from a sh that first moves itself into the cgroup, then execs it."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"),
                *argv]

    def pids(self) -> list[int]:
        """The processes in the cgroup now."""
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def describe(self) -> str:
        """How the quota is set, for the report."""
        quota = int(CFS_PERIOD_US * self.percent / 100)
        knob = (f"cpu.cfs_quota_us={quota}, cpu.cfs_period_us={CFS_PERIOD_US}"
                if self.version == 1 else f"cpu.max=\"{quota} {CFS_PERIOD_US}\"")
        return f"cgroup v{self.version} {self.path} ({knob}: {self.percent:g}% of one CPU)"


def cgroup2_root() -> Path | None:
    """Where the unified (v2) hierarchy is mounted with the cpu controller available, if it is."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            root = Path(fields[1])
            with contextlib.suppress(OSError):
                if "cpu" in (root / "cgroup.controllers").read_text().split():
                    return root
    return None


@contextlib.contextmanager
def cpu_quota(percent: float) -> Iterator[CpuCgroup]:
    """A new cgroup capped at ``percent`` % of one CPU: v1 ``cpu.cfs_quota_us`` if the machine
    has the v1 cpu controller, else v2 ``cpu.max``. On the way out every process still in it
    is killed (by pid) and the cgroup removed."""
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        parent, version = CGROUP_V1_CPU, 1
    elif (root := cgroup2_root()) is not None:
        parent, version = root, 2
        control = root / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            control.write_text("+cpu")
    else:
        raise BenchError("no cgroup cpu controller (v1 cpu or v2 with cpu) to make a slow VM")
    path = parent / f"offloadfs-bench-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        raise BenchError(f"cannot create cgroup {path}: {exc} (needs root)") from exc
    group = CpuCgroup(path, version, percent)
    try:
        group.set(percent)
        yield group
    finally:
        remove_cgroup(group)


def remove_cgroup(group: CpuCgroup) -> None:
    """Kill what is left in ``group`` (by pid) and remove it, retrying while it empties."""
    for pid in group.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + STOP_DEADLINE
    while True:
        try:
            group.path.rmdir()
            return
        except OSError as exc:
            if time.monotonic() > end:
                print(f"bench: cannot remove cgroup {group.path}: {exc}", file=sys.stderr)
                return
            time.sleep(0.05)


# --- measuring ------------------------------------------------------------------------------

def timed_run(argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> tuple[float, str]:
    """Run ``argv`` (in ``cwd``) to completion; its wall time in ms and its stderr. Fails on
    non-zero exit."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {done.returncode}: {stderr.strip()}")
    return elapsed, stderr


def parse_profile(stderr: str) -> dict[str, float] | None:
    """The stages of an ``offld -p`` line in ``stderr`` ({"connect": ms, ...}), or None."""
    match = PROFILE.search(stderr)
    return {k: float(v) for k, v in STAGE.findall(match.group(1))} if match else None


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, interpolating linearly between ranks."""
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and p99 of ``samples`` as {"p50": ..., "p99": ...}."""
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}


def median(samples: Sequence[float]) -> float:
    """The median of ``samples`` (the mean of the middle two of an even number)."""
    return percentile(samples, 50)


def median_by_key(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each key over ``records`` (each key on its own, so they need not add up)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: median([r[k] for r in records if k in r]) for k in keys}


def cpu_seconds(pid: int, thread: int | None = None, children: bool = True) -> float:
    """CPU time (user + system) of process ``pid`` and (unless not ``children``) of its
    children it has waited for, or of its thread ``thread`` alone (the main thread's id is
    ``pid``); 0.0 if it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    with_children = thread is None and children
    ticks = fields[11:15] if with_children else fields[11:13]   # utime, stime, cutime, cstime
    return sum(int(f) for f in ticks) / os.sysconf("SC_CLK_TCK")


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all CPUs."""
    ticks = cpu_ticks()
    idle = ticks[3] + ticks[4]                                            # idle + iowait
    total = sum(ticks[:8])                                                # not guest time
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


def cpu_ticks() -> list[int]:
    """The machine's CPU ticks since boot (/proc/stat's cpu line: user ... steal, guest)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


_run_started: list[int] = []   # cpu_ticks() when this benchmark's run began (mark_run_start)


def mark_run_start() -> None:
    """Remember the machine's CPU ticks now: machine_info() gives the steal since then."""
    _run_started[:] = cpu_ticks()


def steal_pct() -> float | None:
    """The share of the machine's CPU time the hypervisor gave to others (steal) since
    mark_run_start(), in %; None if it was not called. Steal slows every path that crosses
    processes far more than a local one (docs/benchmarks.md)."""
    if not _run_started:
        return None
    delta = [b - a for a, b in zip(_run_started, cpu_ticks(), strict=True)]
    total = sum(delta[:8])
    return round(100 * delta[7] / total, 1) if total else 0.0


# --- profiling -----------------------------------------------------------------------------

def start_py_spy(pid: int, out: Path, gil: bool = False) -> subprocess.Popen:
    """py-spy record (raw format) of ``pid`` until :func:`stop_py_spy`; with ``gil`` only the
    samples of the thread holding the GIL (where the interpreter spends CPU, no waits)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise BenchError(f"{spy} not found: --profile needs py-spy in this venv")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(spy), "record", "-o", str(out), "-f", "raw", "-r", "200",
                             *(["--gil"] if gil else []), "-p", str(pid)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.3)   # attach before the window opens
    return proc


def stop_py_spy(proc: subprocess.Popen) -> None:
    """SIGINT makes py-spy write its output; kill it if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def summarize_profile(path: Path, top: int = 10) -> dict:
    """From a py-spy raw file: the functions taking most of a process's samples, including
    what they call (frames in every sample, such as the main loop, left out), each with its
    own share (self time)."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [short_frame(f) for f in stack.split(";")]
            own[frames[-1]] += n
            for f in set(frames):
                inclusive[f] += n
    if not total:
        return {"samples": 0, "functions": []}
    rows = [[f, round(100 * n / total, 1), round(100 * own[f] / total, 1)]
            for f, n in inclusive.most_common() if n < total][:top]
    return {"samples": total, "functions": rows}


def short_frame(frame: str) -> str:
    """``name (path/file.py:123)`` without the line number."""
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rstrip(')')})" if sep else frame


# --- reporting ------------------------------------------------------------------------------

def machine_info() -> dict[str, object]:
    """Where and how the numbers were taken: CPU, cores, memory, OS, Python, kernel, load,
    date, command line, commit."""
    return {
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "os": os_release(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],   # at the end: was the machine busy?
        "steal_pct": steal_pct(),                              # during the run: was it slowed?
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "commit": git_commit(),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def os_release() -> str:
    """The distribution's name and version (Debian: with /etc/debian_version's point release)."""
    name = platform.system()
    with contextlib.suppress(OSError):
        name = platform.freedesktop_os_release().get("PRETTY_NAME", name)
    with contextlib.suppress(OSError):
        name += f" ({Path('/etc/debian_version').read_text().strip()})"
    return name


def git_commit() -> str:
    """The project's commit, "+dirty" if the tree has changes; "" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True,
                              text=True, check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if commit and git("status", "--porcelain") else "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table: text left-aligned, numbers right-aligned (see :func:`fmt`)."""
    cells = [[fmt(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = numeric_columns(rows, len(headers))
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if num else c.ljust(w)
                        for c, w, num in zip(row, widths, numeric, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, numbers right-aligned and formatted as in :func:`print_table`."""
    numeric = numeric_columns(rows, len(headers))
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def numeric_columns(rows: Sequence[Sequence[object]], n: int) -> list[bool]:
    """Per column: True if it holds numbers (and at most "-" placeholders), to right-align."""
    return [any(isinstance(row[i], (int, float)) for row in rows)
            and all(isinstance(row[i], (int, float)) or row[i] == "-" for row in rows)
            for i in range(n)]


def fmt(value: object) -> str:
    """A table cell: floats with one decimal (two below 10), the rest as str."""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def publish(name: str, result: dict, figure) -> None:
    """Write bench/results/NAME.json and NAME.png and say where they are."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = save_png(name, figure)
    print(f"\nwrote {json_path.relative_to(PROJECT)} and {png_path.relative_to(PROJECT)}")


def save_png(stem: str, figure) -> Path:
    """Write bench/results/STEM.png (a benchmark's further figures) and close the figure."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    png_path = RESULTS / f"{stem}.png"
    figure.savefig(png_path, dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    return png_path
