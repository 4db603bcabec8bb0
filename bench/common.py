"""Shared helpers of the benchmarks: a throw-away daemon, timed runs, statistics, reports.

Every benchmark measures through these so that their numbers are taken the same way: wall
time of a whole command (``timed_run``), median and p99 (``summary``), the stage breakdown
``offld -p`` prints (``parse_profile``), then a table on stdout and ``bench/results/NAME.json``
+ ``NAME.png`` (``publish``). ``daemon`` starts a throw-away ``offloadd``; ``shims`` mounts its
shims (``offloadfs mount -f``) on a temporary mount point.
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
    json_path, png_path = RESULTS / f"{name}.json", RESULTS / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    figure.savefig(png_path, dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    print(f"\nwrote {json_path.relative_to(PROJECT)} and {png_path.relative_to(PROJECT)}")
