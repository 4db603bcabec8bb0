"""Shared helpers of the benchmarks: a throw-away daemon, timed runs, statistics, reports.

Every benchmark measures through these so that their numbers are taken the same way: wall
time of a whole command (``timed_run``), median and p99 (``summary``), the stage breakdown
``offld -p`` prints (``parse_profile``), then a table on stdout and ``bench/results/NAME.json``
+ ``NAME.png`` (``publish``). ``daemon`` starts a throw-away ``offloadd``; ``shims`` mounts its
shims (``offloadfs mount -f``) on a temporary mount point; ``broker`` starts a throw-away
``offloadd broker`` and ``host`` an ``offloadd serve --connect`` to it; ``cpu_seconds`` and
``system_cpu`` read what processes and the machine spent.
"""
from __future__ import annotations

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

from offloadfs import mountinfo

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = RESULTS.parent.parent
LISTENING = re.compile(rb"listening on tcp://[^\s:]+:(\d+)")
BROKER_UP = re.compile(rb"clients on (tcp://\S+), hosts on (tcp://\S+)")
HOST_READY = b" ready: "   # the broker's log line for each host that announced itself
PROFILE = re.compile(r"offld: profile on \S+: (.*)$", re.MULTILINE)
STAGE = re.compile(r"(\w+) ([0-9.]+) ms")
START_DEADLINE = 20.0
STOP_DEADLINE = 5.0
UNMOUNT_DEADLINE = 20.0   # the mount's agent may take up to 10 s to close its connections
XATTR_POLICY, XATTR_STATS = "user.offload.policy", "user.offload.stats"


class BenchError(Exception):
    """A benchmark cannot go on; the text is one line (or a line and a log tail) for the user."""


# --- tools ----------------------------------------------------------------------------------

def tool(name: str) -> str:
    """The path of a console script of this venv (``offld``, ``offloadd``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise BenchError(f"{path} not found: install the project in this venv (make install)")
    return str(path)


# --- the daemon -----------------------------------------------------------------------------

@dataclasses.dataclass
class Daemon:
    """A running ``offloadd serve``: where clients reach it and where it logs."""

    host: str
    log: Path
    tmp: Path
    proc: subprocess.Popen

    def client_env(self) -> dict[str, str]:
        """The environment for clients: the job log goes to the daemon's temp dir, not ~."""
        return {**os.environ, "XDG_STATE_HOME": str(self.tmp / "state")}

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the daemon's log, for error messages."""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("  " + line for line in text)


@contextlib.contextmanager
def daemon(commands: dict[str, str], *flags: str) -> Iterator[Daemon]:
    """``offloadd serve`` on an ephemeral loopback port allowing ``commands``; always stopped."""
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-") as tmp:
        log = Path(tmp) / "offloadd.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(serve_argv(commands, flags), stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            port = wait_listening(proc, log, START_DEADLINE)
            yield Daemon(f"127.0.0.1:{port}", log, Path(tmp), proc)
        finally:
            stop(proc)


def serve_argv(commands: dict[str, str], flags: Sequence[str]) -> list[str]:
    """The command line of a loopback daemon (``--allow-root`` when we are root)."""
    argv = [tool("offloadd"), "serve", "--listen", "tcp://127.0.0.1:0", *flags]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    for name, path in commands.items():
        argv += ["--command", f"{name}={path}"]
    return argv


def wait_listening(proc: subprocess.Popen, log: Path, deadline: float) -> int:
    """The port from the daemon's "listening on" log line, waiting at most ``deadline`` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if match := LISTENING.search(log.read_bytes()):
            return int(match.group(1))
        if proc.poll() is not None:
            raise BenchError(f"offloadd exited with status {proc.returncode} before listening:\n"
                             + log.read_text(errors="replace"))
        time.sleep(0.02)
    raise BenchError(f"offloadd did not log 'listening on' within {deadline:.0f} s:\n"
                     + log.read_text(errors="replace"))


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the daemon and wait; SIGKILL its process group if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        print(f"bench: offloadd ignored SIGTERM for {STOP_DEADLINE:.0f} s, killing it",
              file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- a broker and its hosts -----------------------------------------------------------------

@dataclasses.dataclass
class BrokerProc:
    """A running ``offloadd broker``: its client and worker endpoints, log and process."""

    clients: str
    workers: str
    log: Path
    proc: subprocess.Popen

    def hosts_ready(self) -> int:
        """How many times a host announced itself (the broker logs one line each)."""
        return self.log.read_bytes().count(HOST_READY)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's log, for error messages."""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("  " + line for line in text)


@contextlib.contextmanager
def broker(*flags: str) -> Iterator[BrokerProc]:
    """``offloadd broker`` on two ephemeral loopback ports; always stopped."""
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-broker-") as tmp:
        log = Path(tmp) / "broker.log"
        argv = [tool("offloadd"), "broker", "--clients", "tcp://127.0.0.1:0",
                "--workers", "tcp://127.0.0.1:0", *flags]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            found = wait_log(proc, log, BROKER_UP, START_DEADLINE, "offloadd broker")
            yield BrokerProc(found.group(1).decode(), found.group(2).decode(), log, proc)
        finally:
            stop(proc)


@contextlib.contextmanager
def host(commands: dict[str, str], connect: str, *flags: str,
         listen: bool = False) -> Iterator[Daemon]:
    """``offloadd serve --connect connect`` allowing ``commands``; with ``listen`` also on an
    ephemeral loopback port for direct clients (``Daemon.host``, else ""). Always stopped;
    wait for the broker to log it ready with :func:`wait_hosts`."""
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-host-") as tmp:
        log = Path(tmp) / "offloadd.log"
        argv = serve_argv(commands, ["--connect", connect, *flags])
        if not listen:
            at = argv.index("--listen")
            del argv[at:at + 2]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            where = f"127.0.0.1:{wait_listening(proc, log, START_DEADLINE)}" if listen else ""
            yield Daemon(where, log, Path(tmp), proc)
        finally:
            stop(proc)


def wait_hosts(b: BrokerProc, n: int, deadline: float = START_DEADLINE) -> None:
    """Wait until ``n`` hosts have announced themselves to ``b``, at most ``deadline`` s."""
    end = time.monotonic() + deadline
    while b.hosts_ready() < n:
        if b.proc.poll() is not None:
            raise BenchError(f"offloadd broker exited with status {b.proc.returncode}:\n"
                             + b.log_tail())
        if time.monotonic() > end:
            raise BenchError(f"only {b.hosts_ready()} of {n} hosts announced themselves to the "
                             f"broker within {deadline:.0f} s:\n" + b.log_tail())
        time.sleep(0.02)


def wait_log(proc: subprocess.Popen, log: Path, pattern: re.Pattern, deadline: float,
             what: str) -> re.Match:
    """The first match of ``pattern`` in ``log``, waiting at most ``deadline`` s while ``proc``
    (called ``what`` in errors) runs."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if match := pattern.search(log.read_bytes()):
            return match
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}:\n"
                             + log.read_text(errors="replace"))
        time.sleep(0.02)
    raise BenchError(f"{what} did not log {pattern.pattern!r} within {deadline:.0f} s:\n"
                     + log.read_text(errors="replace"))


# --- the shims -----------------------------------------------------------------------------

@dataclasses.dataclass
class Shims:
    """A running ``offloadfs mount -f``: the mount point, its log, its process."""

    path: Path
    log: Path
    proc: subprocess.Popen

    def shim(self, name: str) -> str:
        """The path of shim ``name`` (what a PATH lookup with the mount first finds)."""
        return str(self.path / name)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ours) with the mount first on PATH."""
        base = dict(os.environ if base is None else base)
        return {**base, "PATH": f"{self.path}:{base.get('PATH', os.defpath)}"}

    def stats(self, name: str) -> dict:
        """The mount's counts for shim ``name``: {"jobs", "failures", "fallbacks", "mean_ms"}."""
        return json.loads(os.getxattr(self.shim(name), XATTR_STATS))

    def set_policy(self, name: str, policy: str) -> None:
        """Set shim ``name``'s policy (auto, always, never); kept in this mount's temp state."""
        os.setxattr(self.shim(name), XATTR_POLICY, policy.encode())

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the mount's log, for error messages."""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("  " + line for line in text)


@contextlib.contextmanager
def shims(d: Daemon, names: Sequence[str], *flags: str) -> Iterator[Shims]:
    """The shims of daemon ``d`` mounted on a temporary mount point, ready once every shim in
    ``names`` is listed; always unmounted (and the mount process ended) on the way out.

    The mount keeps its policy state under its own temporary ``XDG_STATE_HOME``."""
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-mount-") as tmp:
        top = Path(tmp).resolve()
        mnt, log = top / "mnt", top / "mount.log"
        mnt.mkdir()
        env = {**os.environ, "XDG_STATE_HOME": str(top / "state")}
        argv = [tool("offloadfs"), "mount", str(mnt), "-H", d.host, "-f", *flags]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    cwd=top, env=env, start_new_session=True)
        m = Shims(mnt, log, proc)
        try:
            wait_mounted(m, names, START_DEADLINE)
            yield m
        finally:
            unmount(m)


def mounted(path: Path) -> bool:
    """True if an offloadfs filesystem is mounted at ``path`` (per /proc/self/mountinfo)."""
    return str(path) in mountinfo.offloadfs_mounts()


def wait_mounted(m: Shims, names: Sequence[str], deadline: float) -> None:
    """Wait until ``m`` is mounted and lists every shim in ``names``, at most ``deadline`` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if m.proc.poll() is not None:
            raise BenchError(f"offloadfs mount exited with status {m.proc.returncode}:\n"
                             + m.log_tail())
        if mounted(m.path) and all((m.path / name).exists() for name in names):
            return
        time.sleep(0.02)
    missing = " ".join(n for n in names if not (m.path / n).exists()) if mounted(m.path) else ""
    raise BenchError(f"{m.path} was not mounted" + (f" with shims {missing}" if missing else "")
                     + f" within {deadline:.0f} s:\n" + m.log_tail())


def unmount(m: Shims) -> None:
    """``offloadfs umount`` and wait for the mount process; SIGTERM it if it never mounted,
    SIGKILL its group if it does not exit in time, and lazily detach a mount left behind."""
    if m.proc.poll() is None:
        if mounted(m.path):
            try:
                done = subprocess.run([tool("offloadfs"), "umount", str(m.path)],
                                      capture_output=True, text=True, timeout=UNMOUNT_DEADLINE,
                                      check=False)
                if done.returncode != 0:
                    print(f"bench: offloadfs umount {m.path}: {done.stderr.strip()}",
                          file=sys.stderr)
            except subprocess.TimeoutExpired:
                print(f"bench: offloadfs umount {m.path} hung", file=sys.stderr)
        else:
            m.proc.send_signal(signal.SIGTERM)
    try:
        m.proc.wait(UNMOUNT_DEADLINE)
    except subprocess.TimeoutExpired:
        print(f"bench: offloadfs mount did not exit within {UNMOUNT_DEADLINE:.0f} s of umount, "
              "killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.proc.pid, signal.SIGKILL)
        m.proc.wait()
    end = time.monotonic() + STOP_DEADLINE   # after a kill, auto_unmount detaches it soon
    while mounted(m.path) and time.monotonic() < end:
        time.sleep(0.05)
    if mounted(m.path):
        print(f"bench: {m.path} still mounted, detaching it lazily", file=sys.stderr)
        for fusermount in ("fusermount3", "fusermount"):
            with contextlib.suppress(FileNotFoundError):
                subprocess.run([fusermount, "-u", "-z", str(m.path)], capture_output=True,
                               timeout=UNMOUNT_DEADLINE, check=False)
                break


# --- measuring ------------------------------------------------------------------------------

def timed_run(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``argv`` to completion; its wall time in ms and its stderr. Fails on non-zero exit."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
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


def median_by_key(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each key over ``records`` (each key on its own, so they need not add up)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: percentile([r[k] for r in records if k in r], 50) for k in keys}


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) of process ``pid`` and of its children it has waited for, or
    of its thread ``thread`` alone (the main thread's id is ``pid``); 0.0 if it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = fields[11:15] if thread is None else fields[11:13]   # utime, stime, cutime, cstime
    return sum(int(f) for f in ticks) / os.sysconf("SC_CLK_TCK")


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all CPUs."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]                                            # idle + iowait
    total = sum(ticks[:8])                                                # not guest time
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


# --- reporting ------------------------------------------------------------------------------

def machine_info() -> dict[str, object]:
    """Where and how the numbers were taken: CPU, cores, Python, kernel, date, command line."""
    return {
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "kernel": platform.release(),
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


def git_commit() -> str:
    """The project's commit, "+dirty" if the tree has changes; "" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True,
                              text=True, check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if commit and git("status", "--porcelain") else "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table: text left-aligned, numbers right-aligned with one decimal."""
    cells = [[fmt(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [isinstance(c, (int, float)) for c in (rows[0] if rows else headers)]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if num else c.ljust(w)
                        for c, w, num in zip(row, widths, numeric, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt(value: object) -> str:
    """A table cell: floats with one decimal, the rest as str."""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


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
