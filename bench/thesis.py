"""The thesis's environments A-D on a shaped network: Table 5.4, Figs 5.2.1 and 5.3.1-5.3.2.

No guest kernel: the VM and the host are two network namespaces of this run (``ofs-vm-PID``,
``ofs-host-PID``) joined by a veth pair with private addresses (10.77.0.1/30 the VM's,
10.77.0.2/30 the host's), each end shaped with ``tc qdisc ... tbf`` to the environment's rate
(100 Mbit/s or 1 Gbit/s; this kernel has no netem, so rates only, no added delay). Processes
go into a namespace with ``nsenter --net=/run/netns/NAME`` (not ``ip netns exec``, which also
makes a mount namespace: the FUSE and NFS mounts would be invisible to the others).

- **The VM**, in its namespace and in a cgroup capped at 500 MHz or 1 GHz of this CPU:
  ``offloadfs mount`` (its agent, and nfs-ganesha exporting the VM's tree on 10.77.0.1 to
  10.77.0.2: ``[export] backend = "ganesha"``) and every caller (``convert``, the shims).
- **The host**, in its namespace, uncapped: ``offloadd serve`` on 10.77.0.2 with
  ``[mounts] client = "userspace"``: each job's cwd is the VM's directory over NFS across the
  shaped link, so the image goes to the host and the output comes back through it.

**Calibration.** A clock probe (a chain of dependent 64-bit multiplies, 3 cycles each on any
x86-64 core of the last decade, built here with ``cc``) reads this core's clock as cycles per
second of the probe's own CPU time (preemption by other work on the machine does not count),
the best of five short uncapped runs (/proc/cpuinfo's "cpu MHz" is recorded beside it: in a
VM it is the TSC's nominal rate, not the clock the core runs at). The quota is target MHz /
core MHz of one CPU (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``, period 100 ms); then
the same probe runs inside the capped cgroup for about 2 s (20 periods) and its cycles per
second of wall time, the VM's effective clock, must come within 15% of the target (else a
warning).

**Table 5.4 / Figs 5.3.1-5.3.2.** The thesis's six ImageMagick jobs (bench/imagemagick.py) on
one generated JPEG (3000x3000 by default, ``--size 10000`` the thesis's, ``--quick`` 1500),
per environment: *VM alone* (``/usr/bin/convert`` in the capped VM; it does not touch the
network, so it is measured once per CPU setting and shared by the two networks), *offloaded*
(the same command line through the shim, from the capped VM, in the exported directory) and,
for reference, *native* (``convert`` here, uncapped). Each round has every way (per CPU
setting and job: VM alone, then offloaded on each network; then native). Offloaded = execution +
overhead: **execution** is the host's own ``run`` time of the job (the daemon times the
command from spawn to reap and sends it in the exit message; the mount keeps it per job in
``user.offload.status``, read after each run), which includes the command's NFS reads and
writes across the link, as the thesis's execution did; **overhead** is the rest of the wall
time the capped caller saw: the shim, the agent (capped too), the submit and exit over the
link, the host's queue, attach (finding the NFS mount) and drain. The host mounts the VM's
export once, at the first job, and keeps it (the thesis mounted and unmounted per job): that
first job is a warm-up, reported on its own. Speed-up = VM alone / offloaded. Every output
must be byte-identical across all ways.

**Fig 5.2.1.** bench/io.py's fio job (the thesis's: libaio, bs=4k, iodepth=32, direct=1 where
allowed; size and runtime scaled down) on the VM's own disk (fio in the capped VM) and on the
host's NFS view of the same directory (fio through the shim, run by the host in its NFS
mount across the link), per environment.

**Ten VMs, one GPU host.** bench/cluster.py's GPU queue over the 100 Mbit/s link: the broker
and a one-slot host tagged gpu in the host's namespace, ten clients in the VM's namespace
(uncapped: the thesis had ten VMs, each with its own CPU).

Before and after, the link itself is checked: a TCP transfer from the VM's namespace to the
host's at each rate. On the way out (also on Ctrl-C or SIGTERM) everything is removed: mount,
daemons, cgroup, processes left in the namespaces (by pid), namespaces (with the veth); then
it is checked that nothing is left.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.harness import START_DEADLINE, end_tree, kill, mounts_under, processes_in, wait_for

from . import cluster, io
from .common import (
    CFS_PERIOD_US,
    PROJECT,
    BenchError,
    CpuCgroup,
    Daemon,
    Shims,
    cpu_model,
    cpu_quota,
    daemon,
    machine_info,
    md_table,
    median,
    publish,
    pyplot,
    save_png,
    shims,
    timed_run,
    warn,
)
from .imagemagick import CONVERT, JOBS, QUICK_SIZE, SIZE, check_outputs, make_image
from .report import THESIS_OVERHEAD_MS, THESIS_SPEEDUP

NAME = "thesis"
RUNS, QUICK_RUNS = 3, 2
FIO_SIZE, QUICK_FIO_SIZE = "256M", "16M"
FIO_RUNTIME_S, QUICK_FIO_RUNTIME_S = 5, 1
COMMANDS = {"convert": CONVERT, "fio": io.FIO, "findmnt": io.FINDMNT}
TOOLS = {"nsenter": "util-linux", "ip": "iproute2", "tc": "iproute2", "cc": "gcc"}
THESIS_HOST = "Core i7-3770, 3.4 GHz"

# --- the link ------------------------------------------------------------------------------
NETNS_DIR = Path("/run/netns")
ROLES = ("vm", "host")
ADDRESSES = {"vm": "10.77.0.1", "host": "10.77.0.2"}   # only inside this run's namespaces
PREFIX_LEN = 30
IFNAMSIZ = 15   # the longest interface name the kernel takes
# tbf's bucket: 1 ms of traffic at the rate, and never less than 64 KiB. The kernel paces tbf
# with high-resolution timers, so the bucket need not cover a timer tick (HZ); but veth hands
# the qdisc GSO super-packets of up to 64 KiB, and one larger than the bucket would be split
# (or dropped) by tbf. At 100 Mbit/s 64 KiB is 5 ms of line rate; at 1 Gbit/s the bucket is
# 125 KB (1 ms): over any longer span the mean is the rate.
TBF_BURST_S, TBF_MIN_BURST = 0.001, 64 * 1024
# tbf's queue: 10 ms at the rate (125 KB at 100 Mbit/s, 1.25 MB at 1 Gbit/s). Enough to absorb
# a TCP window's burst (the veth's own round trip is tens of microseconds), short enough that
# a bulk transfer's queue adds at most 10 ms to the small ZeroMQ messages of other jobs
# (a deep queue would be bufferbloat no 1 GbE switch port has).
TBF_LATENCY_MS = 10
LINK_CHECK_S = 0.5      # the check's transfer: half a second's worth of bytes at the rate
LINK_PORT = 5201
LINK_DEADLINE = 30.0

# --- the CPU cap -----------------------------------------------------------------------------
PROBE_C = r"""/* offloadfs bench thesis: cycles of a chain of dependent 64-bit multiplies (3 cycles
   each on x86-64 cores since Core 2 and K10), and the wall and CPU time they took. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define M "imul %0, %0\n\t"
static double now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000000, x = 3;
    double wall = now(CLOCK_MONOTONIC), cpu = now(CLOCK_THREAD_CPUTIME_ID);
    for (unsigned long i = 0; i < n; i++)
        __asm__ volatile(M M M M M M M M M M M M M M M M M M M M : "+r"(x));
    wall = now(CLOCK_MONOTONIC) - wall;
    cpu = now(CLOCK_THREAD_CPUTIME_ID) - cpu;
    printf("%lu cycles in %.6f s wall, %.6f s cpu (%lu)\n", n * 60, wall, cpu, x);
    return 0;
}
"""
PROBE_CYCLES_PER_ITERATION = 60
PROBE_OUTPUT = re.compile(r"^(\d+) cycles in ([0-9.]+) s wall, ([0-9.]+) s cpu")
PROBE_UNCAPPED_S = 0.15  # each uncapped run, at about 2 GHz, timed by its CPU time; the best
PROBE_UNCAPPED_RUNS = 5  # of five counts (a run can only read low: cache misses, interrupts)
PROBE_CAPPED_S = 2.0     # in the cgroup: 20 periods of 100 ms
PROBE_TOLERANCE = 0.15

# --- the GPU queue ---------------------------------------------------------------------------
GPU_MBIT = 100


@dataclasses.dataclass(frozen=True)
class Env:
    """One of the thesis's VM settings (its Table 5.2): a letter, the VM's CPU in MHz and its
    network in Mbit/s."""

    name: str
    mhz: int
    mbit: int

    @property
    def label(self) -> str:
        """``500 MHz, 100 Mbit/s``."""
        return f"{self.mhz} MHz, {network(self.mbit)}"


ENVS = [Env("A", 500, 100), Env("B", 500, 1000), Env("C", 1000, 100), Env("D", 1000, 1000)]


def network(mbit: int) -> str:
    """A rate as the thesis writes it: ``100 Mbit/s``, ``1 Gbit/s``."""
    return f"{mbit // 1000:g} Gbit/s" if mbit % 1000 == 0 else f"{mbit} Mbit/s"


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("--size", type=int, help=f"image width and height in pixels (default "
                        f"{SIZE}, --quick {QUICK_SIZE}; the thesis: 10000)")
    parser.add_argument("-n", "--runs", type=int, help=f"rounds (default {RUNS}, --quick "
                        f"{QUICK_RUNS})")
    parser.add_argument("--envs", default="".join(e.name for e in ENVS),
                        help="environments to measure, e.g. AD (default: ABCD)")
    parser.add_argument("--fio-size", help=f"fio's file size (default {FIO_SIZE}, --quick "
                        f"{QUICK_FIO_SIZE}; the thesis: 1G)")
    parser.add_argument("--fio-runtime", type=int, help=f"seconds per fio job (default "
                        f"{FIO_RUNTIME_S}, --quick {QUICK_FIO_RUNTIME_S}; the thesis: 30)")


def envs_of(text: str) -> list[Env]:
    """The environments named by ``text`` (letters, commas allowed), in the thesis's order."""
    wanted = set(text.replace(",", "").upper())
    known = {e.name for e in ENVS}
    if not wanted or wanted - known:
        raise BenchError(f"--envs {text!r}: expected letters among {''.join(sorted(known))}")
    return [e for e in ENVS if e.name in wanted]


# --- the link: two namespaces, a veth pair, tbf on each end -----------------------------------

def tbf_args(mbit: int) -> list[str]:
    """tc's arguments for a tbf qdisc at ``mbit`` Mbit/s (see TBF_BURST_S, TBF_LATENCY_MS)."""
    if mbit <= 0:
        raise BenchError(f"a link rate must be positive, not {mbit} Mbit/s")
    burst = max(int(mbit * 1e6 / 8 * TBF_BURST_S), TBF_MIN_BURST)
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


@dataclasses.dataclass
class Link:
    """This run's two network namespaces (roles "vm" and "host") and the veth pair between
    them; ``inodes`` are the namespaces' (to find processes in them), noted at teardown."""

    tag: str
    inodes: dict[str, int] = dataclasses.field(default_factory=dict)

    def netns(self, role: str) -> str:
        """The namespace's name: ``ofs-vm-TAG``, ``ofs-host-TAG``."""
        return f"ofs-{role}-{self.tag}"

    def dev(self, role: str) -> str:
        """The veth end in the namespace: ``ofsv-TAG``, ``ofsh-TAG``."""
        name = f"ofs{role[0]}-{self.tag}"
        if len(name) > IFNAMSIZ:
            raise BenchError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
        return name

    def path(self, role: str) -> Path:
        """The namespace's file (``ip netns`` bind-mounts it there)."""
        return NETNS_DIR / self.netns(role)

    def enter(self, role: str) -> list[str]:
        """The argv prefix that runs a command in the namespace (its network only: the mount
        namespace stays the machine's, so FUSE and NFS mounts are seen by all)."""
        return ["nsenter", f"--net={self.path(role)}", "--"]

    def setup_commands(self, mbit: int) -> list[list[str]]:
        """The ip and tc commands that make the link, shaped to ``mbit`` Mbit/s."""
        vm, host = (self.dev(r) for r in ROLES)
        argvs = [["ip", "netns", "add", self.netns(r)] for r in ROLES]
        argvs.append(["ip", "link", "add", vm, "type", "veth", "peer", "name", host])
        for role in ROLES:
            ns, dev = self.netns(role), self.dev(role)
            argvs += [["ip", "link", "set", dev, "netns", ns],
                      ["ip", "-n", ns, "addr", "add", f"{ADDRESSES[role]}/{PREFIX_LEN}",
                       "dev", dev],
                      ["ip", "-n", ns, "link", "set", "lo", "up"],
                      ["ip", "-n", ns, "link", "set", dev, "up"]]
        return argvs + self.shape_commands(mbit)

    def shape_commands(self, mbit: int) -> list[list[str]]:
        """The tc commands that shape both ends (each end's egress) to ``mbit`` Mbit/s."""
        return [["tc", "-n", self.netns(r), "qdisc", "replace", "dev", self.dev(r), "root",
                 *tbf_args(mbit)] for r in ROLES]

    def shape(self, mbit: int) -> None:
        """Shape both ends to ``mbit`` Mbit/s from now on."""
        for argv in self.shape_commands(mbit):
            sh(argv)


def sh(argv: Sequence[str]) -> str:
    """Run a short system command (ip, tc, cc); its stdout, or a BenchError with its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{shlex.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


@contextlib.contextmanager
def shaped_link(link: Link, mbit: int) -> Iterator[Link]:
    """Make ``link``'s namespaces and veth pair, shaped to ``mbit`` Mbit/s; always removed
    (:func:`remove_link`), also when made only in part."""
    try:
        for argv in link.setup_commands(mbit):
            sh(argv)
        yield link
    finally:
        remove_link(link)


def remove_link(link: Link) -> None:
    """Kill what still runs in the link's namespaces (all of it this run's, by pid), delete
    them (the veth pair goes with them) and a veth end never moved into one."""
    link.inodes.update({r: os.stat(link.path(r)).st_ino for r in ROLES if link.path(r).exists()})
    for pid in netns_processes(set(link.inodes.values())):
        kill(pid)
    with contextlib.suppress(BenchError):
        wait_for(lambda: not netns_processes(set(link.inodes.values())), 10,
                 "the processes in the namespaces to end")
    for role in ROLES:
        if link.path(role).exists():
            with contextlib.suppress(BenchError):
                sh(["ip", "netns", "delete", link.netns(role)])
        if root_has_dev(link.dev(role)):
            with contextlib.suppress(BenchError):
                sh(["ip", "link", "delete", link.dev(role)])


def root_has_dev(name: str) -> bool:
    """True if this machine's own namespace has an interface ``name``."""
    return Path("/sys/class/net", name).exists()


def netns_processes(inodes: set[int]) -> list[int]:
    """The processes whose network namespace is one of ``inodes``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                target = os.readlink(entry / "ns" / "net")   # net:[4026532345]
                if int(target.partition("[")[2].rstrip("]")) in inodes:
                    found.append(int(entry.name))
    return found


def leftovers(link: Link, tmp: Path, cgroup: Path | None) -> list[str]:
    """What this run left behind (nothing: []): namespaces, veth ends, processes in the
    namespaces or in ``tmp``, mounts under ``tmp``, the cgroup."""
    left = [f"namespace {link.netns(r)}" for r in ROLES if link.path(r).exists()]
    left += [f"interface {link.dev(r)}" for r in ROLES if root_has_dev(link.dev(r))]
    left += [f"process {pid} in a namespace of this run"
             for pid in netns_processes(set(link.inodes.values()))]
    left += [f"process {pid} ({cmd})" for pid, cmd in processes_in(tmp).items()]
    left += [f"mount {m}" for m in mounts_under(tmp)]
    if cgroup is not None and cgroup.exists():
        left.append(f"cgroup {cgroup}")
    return left


# --- processes of ours inside a namespace: Python functions run there ------------------------

CHILD = "from bench.thesis import child_main; child_main()"


@contextlib.contextmanager
def child_in(link: Link, role: str, target, *args) -> Iterator[subprocess.Popen]:
    """``target(*args)`` (a function of the project, JSON arguments and result) in a Python
    child started in the ``role`` namespace with nsenter; yields it for :func:`result_of`;
    always ended, with whatever it started."""
    call = json.dumps([target.__module__, target.__name__, list(args)])
    proc = subprocess.Popen([*link.enter(role), sys.executable, "-c", CHILD, call], cwd=PROJECT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            end_tree(proc)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()


def result_of(proc: subprocess.Popen, deadline: float):
    """What the :func:`child_in` child's function returned, within ``deadline`` s."""
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(proc.args)} gave no result within {deadline:.0f} s") \
            from None
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        sys.stderr.write(text + "\n")   # the whole traceback in the bench's log
        last = text.splitlines()[-1] if text else "nothing on stderr"
        raise BenchError(f"{proc.args[-1]} in a namespace exited {proc.returncode}: {last}")
    return json.loads(out)


def child_main() -> None:
    """The child's side: call the function named by its argument, its result as JSON on
    stdout (what it prints itself goes to stderr)."""
    module, name, args = json.loads(sys.argv[1])
    out, sys.stdout = sys.stdout, sys.stderr
    result = getattr(importlib.import_module(module), name)(*args)
    out.write(json.dumps(result))


def link_sink(address: str, port: int, deadline: float) -> tuple[int, float]:
    """Take one TCP connection on ``address:port``; the bytes it sent until EOF and the
    seconds from its first byte to the EOF."""
    with socket.create_server((address, port)) as server:
        server.settimeout(deadline)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(deadline)
            total, first = len(conn.recv(1 << 16)), time.perf_counter()
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
            return total, time.perf_counter() - first


def link_source(address: str, port: int, nbytes: int, deadline: float) -> int:
    """Connect to ``address:port`` (retrying until the sink listens, within ``deadline`` s)
    and send ``nbytes`` zero bytes; the bytes sent."""
    end = time.monotonic() + deadline
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=deadline)
            break
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)
    with sock:
        block = bytes(1 << 20)
        for offset in range(0, nbytes, len(block)):
            sock.sendall(block[:nbytes - offset])
    return nbytes


def link_rate(link: Link, mbit: int) -> float:
    """Shape the link to ``mbit`` and measure it: Mbit/s of a TCP transfer from the VM's
    namespace to the host's."""
    link.shape(mbit)
    nbytes = int(mbit * 1e6 / 8 * LINK_CHECK_S)
    host = ADDRESSES["host"]
    with child_in(link, "host", link_sink, host, LINK_PORT, LINK_DEADLINE) as sink, \
            child_in(link, "vm", link_source, host, LINK_PORT, nbytes, LINK_DEADLINE) as src:
        result_of(src, LINK_DEADLINE + START_DEADLINE)
        got, seconds = result_of(sink, LINK_DEADLINE)
    return got * 8 / seconds / 1e6


# --- the VM and the host on the link ----------------------------------------------------------

@dataclasses.dataclass
class Bed:
    """The VM side and the host side on a link: the VM's cgroup, the host's daemon, the VM's
    shim mount."""

    link: Link
    vm: CpuCgroup
    daemon: Daemon
    mount: Shims

    def vm_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as a caller in the VM: in its cgroup and its network namespace."""
        return self.vm.wrap([*self.link.enter("vm"), *argv])


@contextlib.contextmanager
def testbed(link: Link, tmp: Path, root: Path, commands: dict[str, str]) -> Iterator[Bed]:
    """``offloadd serve`` (allowing ``commands``, userspace NFS mounts under ``tmp``) in the
    host's namespace, and ``offloadfs mount`` of its shims exporting ``root`` with ganesha in
    the VM's namespace and cgroup (uncapped until told: it starts faster); all removed on
    the way out."""
    vm_toml, host_toml = io.configs(tmp, root, ADDRESSES["vm"], ADDRESSES["host"])
    with cpu_quota(100.0) as vm, \
            daemon(commands, "-c", str(host_toml), address=ADDRESSES["host"],
                   prefix=link.enter("host")) as d, \
            shims(d, list(commands), "-c", str(vm_toml), prefix=vm.wrap(link.enter("vm"))) as m:
        yield Bed(link, vm, d, m)


# --- calibrating the VM's CPU -------------------------------------------------------------------

def quota_pct(target_mhz: float, core_mhz: float) -> float:
    """The share of one CPU (in %) that makes a ``core_mhz`` core a ``target_mhz`` one."""
    if not 0 < target_mhz <= core_mhz:
        raise BenchError(f"cannot make a {target_mhz:g} MHz VM of a {core_mhz:.0f} MHz core")
    return 100.0 * target_mhz / core_mhz


def cpuinfo_mhz(text: str) -> float:
    """The first "cpu MHz" of /proc/cpuinfo's ``text``."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            return float(value)
    raise BenchError("/proc/cpuinfo has no 'cpu MHz' line")


def probe_mhz(output: str, per: str) -> float:
    """From the probe's output line, its cycles per second (MHz) of ``per``: "cpu" (while it
    ran: the core's clock) or "wall" (what a capped process gets)."""
    match = PROBE_OUTPUT.match(output)
    seconds = float(match.group(2 if per == "wall" else 3)) if match else 0.0
    if seconds <= 0:
        raise BenchError(f"the clock probe printed {output.strip()!r}")
    return int(match.group(1)) / seconds / 1e6


def probe_iterations(mhz: float, seconds: float) -> int:
    """Iterations that take the probe ``seconds`` at ``mhz``."""
    return max(1, int(mhz * 1e6 * seconds / PROBE_CYCLES_PER_ITERATION))


def build_probe(tmp: Path) -> Path:
    """Compile the clock probe into ``tmp``."""
    source = tmp / "clockprobe.c"
    source.write_text(PROBE_C)
    sh(["cc", "-O2", "-o", str(tmp / "clockprobe"), str(source)])
    return tmp / "clockprobe"


def calibrate(vm: CpuCgroup, probe: Path, mhzs: Sequence[int]) -> dict:
    """This core's clock (the best of short uncapped probes), and per target MHz the quota and
    the probe's reading inside the capped cgroup."""
    n = probe_iterations(2000, PROBE_UNCAPPED_S)
    core = max(probe_mhz(sh([str(probe), str(n)]), "cpu") for _ in range(PROBE_UNCAPPED_RUNS))
    settings = {}
    for mhz in mhzs:
        pct = quota_pct(mhz, core)
        vm.set(pct)
        got = probe_mhz(sh(vm.wrap([str(probe), str(probe_iterations(mhz, PROBE_CAPPED_S))])),
                        "wall")
        error = got / mhz - 1
        if abs(error) > PROBE_TOLERANCE:
            warn(f"the VM capped for {mhz} MHz ran the clock probe at {got:.0f} MHz "
                 f"({100 * error:+.0f}%): the machine is busy, or the quota is not honoured")
        settings[str(mhz)] = {"target_mhz": mhz, "quota_pct": round(pct, 2),
                              "probe_mhz": round(got), "error_pct": round(100 * error, 1)}
        print(f"thesis: VM at {mhz} MHz = {pct:.1f}% of one {core:.0f} MHz CPU; the probe "
              f"inside reads {got:.0f} MHz ({100 * error:+.1f}%)", flush=True)
    return {"core_mhz": round(core), "cpuinfo_mhz": cpuinfo_mhz(Path("/proc/cpuinfo").read_text()),
            "cgroup": vm.describe().split(" (")[0], "settings": settings}


# --- measuring -------------------------------------------------------------------------------

def split(total_s: float, job: dict) -> dict:
    """An offloaded run: its wall time, the host's execution time of the command (``run``)
    and the overhead (the rest), with the host's other stages (from ``Shims.last_job``)."""
    if job.get("status") != 0 or "run" not in job:
        raise BenchError(f"the offloaded job did not run to a 0 exit on the host: {job}")
    stages = {"execution": job["run"], "overhead": total_s - job["run"],
              **{k: job.get(k, 0.0) for k in ("queue", "attach", "drain")}}
    return {"total_s": round(total_s, 4), **{f"{k}_s": round(v, 4) for k, v in stages.items()}}


def vm_way(mhz: int) -> str:
    """The output prefix of the VM alone at ``mhz``."""
    return f"vm{mhz}"


def offloaded_way(env: Env) -> str:
    """The output prefix of the offloaded run in ``env``."""
    return f"offloaded{env.name}"


def ways_of(envs: Sequence[Env]) -> list[str]:
    """Every way of a run, as output prefixes: VM alone per CPU, offloaded per env, native."""
    return [*(vm_way(m) for m in mhzs_of(envs)), *(offloaded_way(e) for e in envs), "native"]


def mhzs_of(envs: Sequence[Env]) -> list[int]:
    """The CPU settings of ``envs``, in order."""
    return sorted({e.mhz for e in envs})


def offloaded(bed: Bed, argv: Sequence[str], work: Path, env: dict) -> dict:
    """One run of ``argv`` through the shim from the VM, split (:func:`split`)."""
    ms, _ = timed_run(bed.vm_argv([bed.mount.shim(argv[0]), *argv[1:]]), env, cwd=work)
    return split(ms / 1000, bed.mount.last_job())


def measure(bed: Bed, work: Path, source: Path, envs: Sequence[Env], runs: int,
            quotas: dict[int, float]) -> dict:
    """All rounds, each: per CPU setting and job the VM alone, then offloaded on each of its
    networks; then native per job (a drift in the machine's load hits every way alike)."""
    samples: dict = {"vm": {}, "offloaded": {}, "native": {}}
    for n in range(runs):
        for mhz in mhzs_of(envs):
            bed.vm.set(quotas[mhz])
            for job in JOBS:
                line = one_job(bed, work, source, job, mhz, [e for e in envs if e.mhz == mhz],
                               samples)
                print(f"thesis: round {n + 1}/{runs} {mhz} MHz {job.name}: {line}", flush=True)
        for job in JOBS:
            ms, _ = timed_run([CONVERT, source.name, *job.op, f"native-{job.slug}.jpg"], cwd=work)
            samples["native"].setdefault(job.name, []).append(ms / 1000)
    return samples


def one_job(bed: Bed, work: Path, source: Path, job, mhz: int, envs: Sequence[Env],
            samples: dict) -> str:
    """``job`` by the VM alone at ``mhz`` (now set), then offloaded in each of ``envs``, into
    ``samples``; a line saying the times."""
    env = bed.daemon.client_env()
    argv = [source.name, *job.op]
    ms, _ = timed_run(bed.vm_argv([CONVERT, *argv, f"{vm_way(mhz)}-{job.slug}.jpg"]), env,
                      cwd=work)
    samples["vm"].setdefault(str(mhz), {}).setdefault(job.name, []).append(ms / 1000)
    line = f"VM alone {ms / 1000:.2f} s"
    # The VM alone ends throttled, its quota spent until the period's end: without this
    # pause the next job's shim and agent would wait out the rest of the period (up to 76 ms
    # at 500 MHz), an overhead of the last job, not theirs.
    time.sleep(CFS_PERIOD_US / 1e6)
    for e in envs:
        bed.link.shape(e.mbit)
        rec = offloaded(bed, ["convert", *argv, f"{offloaded_way(e)}-{job.slug}.jpg"], work,
                        env)
        samples["offloaded"].setdefault(e.name, {}).setdefault(job.name, []).append(rec)
        line += f"; {e.name} {rec['total_s']:.2f} s (execution {rec['execution_s']:.2f})"
    return line


def fio_env(bed: Bed, work: Path, e: Env, pct: float, size: str, runtime: int,
            where: dict) -> dict:
    """bench/io.py's fio jobs in environment ``e``: in the VM on its disk, and through the
    shim on the host's NFS view across the link; io's per-pattern record."""
    bed.vm.set(pct)
    bed.link.shape(e.mbit)
    print(f"thesis: fio in {e.name} ({e.label}), {size}, {runtime} s per job ...", flush=True)
    prefixes = {"local": bed.vm_argv([io.FIO]), "nfs": bed.vm_argv([bed.mount.shim("fio")])}
    runs = io.measure(bed.daemon, bed.mount, work, size, runtime, 1, prefixes)
    record = io.results(runs, where, size, runtime, 1)
    return {"results": record["results"], "runs": record["runs"]}


def fio_where(bed: Bed, work: Path) -> dict:
    """Where fio's directory lives for the VM and for the host (must be the NFS mount)."""
    where = {"local": io.fstype(bed.vm_argv([io.FINDMNT]), work, bed.daemon),
             "nfs": io.fstype(bed.vm_argv([bed.mount.shim("findmnt")]), work, bed.daemon)}
    if where["nfs"]["fstype"] != io.NFS_FSTYPE:
        raise BenchError(f"the offloaded job's cwd is on {where['nfs']}, not the host's "
                         f"userspace NFS mount ({io.NFS_FSTYPE})")
    if ADDRESSES["vm"] not in where["nfs"]["source"]:
        raise BenchError(f"the host's NFS mount {where['nfs']['source']} is not the VM's "
                         f"export on {ADDRESSES['vm']}")
    return where


def gpu_timeline(link: Link, mbit: int) -> list[dict]:
    """cluster.py's GPU queue over the link at ``mbit``: broker and gpu host in the host's
    namespace, the clients in the VM's."""
    link.shape(mbit)
    clients, seconds = cluster.GPU_CLIENTS, cluster.GPU_JOB_S
    print(f"thesis: GPU queue over {network(mbit)}, {clients} clients ...", flush=True)
    with cluster.gpu_cluster(clients=f"tcp://{ADDRESSES['host']}:0",
                             prefix=link.enter("host")) as b, \
            child_in(link, "vm", cluster.gpu_clients, b.clients, clients, seconds) as child:
        return result_of(child, clients * seconds + 30 + START_DEADLINE)


# --- the run ---------------------------------------------------------------------------------

def require_tools() -> None:
    """Everything this benchmark runs must be there (one line saying what is missing)."""
    for path, package in ((CONVERT, "imagemagick"), ("/usr/bin/ganesha.nfsd", "nfs-ganesha"),
                          (io.FIO, "fio"), (io.FINDMNT, "util-linux")):
        if not Path(path).exists():
            raise BenchError(f"{path} not found: install Debian's {package} (make bench)")
    for name, package in TOOLS.items():
        if shutil.which(name) is None:
            raise BenchError(f"{name} not found: install Debian's {package} (make bench)")
    if os.geteuid() != 0:
        raise BenchError("thesis needs root (network namespaces, tc, cgroups)")


def settings(opts) -> dict:
    """The run's settings from the options, checked."""
    s = {"envs": envs_of(opts.envs), "size": opts.size or (QUICK_SIZE if opts.quick else SIZE),
         "runs": opts.runs or (QUICK_RUNS if opts.quick else RUNS),
         "fio_size": opts.fio_size or (QUICK_FIO_SIZE if opts.quick else FIO_SIZE),
         "fio_runtime": opts.fio_runtime or (QUICK_FIO_RUNTIME_S if opts.quick
                                             else FIO_RUNTIME_S)}
    if s["size"] < 16 or s["runs"] < 1 or s["fio_runtime"] < 1:
        raise BenchError("--size must be at least 16, --runs and --fio-runtime at least 1")
    if not re.fullmatch(r"[0-9]+[KMG]?", s["fio_size"]):
        raise BenchError(f"--fio-size {s['fio_size']!r}: expected a size like 16M or 1G")
    return s


def run(opts) -> dict:
    """Measure, print the tables, write thesis.json and its PNGs."""
    s = settings(opts)
    require_tools()
    started = time.monotonic()
    link = Link(str(os.getpid()))
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-thesis-") as name:
        tmp = Path(name)
        root = tmp / "vm"
        work = root / "work"
        work.mkdir(parents=True)
        source = make_image(work, s["size"])
        input_bytes = source.stat().st_size
        probe = build_probe(tmp)
        with shaped_link(link, s["envs"][0].mbit):
            rates = {m: link_rate(link, m) for m in sorted({e.mbit for e in s["envs"]})}
            print("thesis: the link carries " + ", ".join(
                f"{v:.0f} Mbit/s shaped to {network(m)}" for m, v in rates.items()), flush=True)
            measured = measure_all(link, tmp, root, work, source, probe, s)
            measured["gpu"] = gpu_timeline(link, GPU_MBIT)
        outputs = check_outputs(work, ways_of(s["envs"]))
        left = leftovers(link, tmp, measured["cgroup"])
    if left:
        raise BenchError("the run left behind: " + ", ".join(left))
    print("thesis: teardown checked: no namespace, interface, process, mount or cgroup of "
          "this run is left")
    result = results(s, measured, rates, outputs, input_bytes)
    result["duration_s"] = round(time.monotonic() - started, 1)
    report(result)
    png = [save_png(f"{NAME}_io", plot_io(result)),
           save_png(f"{NAME}_gpu_queue", cluster.plot_gpu(result))]
    publish(NAME, result, plot(result))
    print("wrote " + " and ".join(str(p.relative_to(PROJECT)) for p in png))
    return result


def measure_all(link: Link, tmp: Path, root: Path, work: Path, source: Path, probe: Path,
                s: dict) -> dict:
    """Calibration, the ImageMagick rounds and fio, with the VM and the host on the link."""
    envs = s["envs"]
    with testbed(link, tmp, root, COMMANDS) as bed:
        calibration = calibrate(bed.vm, probe, mhzs_of(envs))
        quotas = {m: calibration["settings"][str(m)]["quota_pct"] for m in mhzs_of(envs)}
        bed.vm.set(quotas[envs[0].mhz])
        bed.link.shape(envs[0].mbit)
        first = offloaded(bed, ["convert", "-size", "16x16", "xc:gray", "warm-up.png"], work,
                          bed.daemon.client_env())
        print(f"thesis: first job (the host mounts the VM's export): {first['total_s']:.2f} s, "
              f"attach {first['attach_s']:.2f} s", flush=True)
        samples = measure(bed, work, source, envs, s["runs"], quotas)
        bed.mount.offloaded("convert", 1 + s["runs"] * len(JOBS) * len(envs))
        where = fio_where(bed, work)
        fio = {e.name: fio_env(bed, work, e, quotas[e.mhz], s["fio_size"], s["fio_runtime"],
                               where) for e in envs}
        return {"calibration": calibration, "first_job": first, "samples": samples,
                "fio": fio, "fio_where": where, "cgroup": bed.vm.path}


def job_record(job, s: dict, samples: dict, output: dict) -> dict:
    """One job's medians per environment (VM alone, offloaded, its split, speed-up), native,
    its output and the thesis's figures."""
    per_env = {}
    for e in s["envs"]:
        recs = samples["offloaded"][e.name][job.name]
        vm = median(samples["vm"][str(e.mhz)][job.name])
        row = {k: round(median([r[k] for r in recs]), 3) for k in recs[0]}
        per_env[e.name] = {"vm_s": round(vm, 3), "offloaded_s": row.pop("total_s"), **row,
                           "speedup": round(vm / median([r["total_s"] for r in recs]), 2)}
    return {"envs": per_env, "native_s": round(median(samples["native"][job.name]), 3),
            **output, "thesis": {"vm_s": job.thesis_vm_s, "offloaded_s": job.thesis_offloaded_s,
                                 "speedup": round(job.thesis_vm_s / job.thesis_offloaded_s, 1),
                                 "output": job.thesis_output}}


def env_record(e: Env, jobs: dict, calibration: dict, rate: float) -> dict:
    """One environment's totals over the jobs and its ranges per job."""
    rows = [j["envs"][e.name] for j in jobs.values()]
    total = {k: round(sum(r[k] for r in rows), 3)
             for k in ("vm_s", "offloaded_s", "execution_s", "overhead_s")}
    over = [r["overhead_s"] for r in rows]
    speed = [r["speedup"] for r in rows]
    return {"mhz": e.mhz, "mbit": e.mbit, "label": e.label,
            "quota_pct": calibration["settings"][str(e.mhz)]["quota_pct"],
            "cpu_ratio": round(calibration["core_mhz"] / e.mhz, 2),
            "link_mbit_measured": round(rate, 1), **total,
            "overhead_min_s": min(over), "overhead_max_s": max(over),
            "overhead_median_s": round(median(over), 3),
            "speedup_min": min(speed), "speedup_max": max(speed),
            "speedup_total": round(total["vm_s"] / total["offloaded_s"], 2)}


def results(s: dict, measured: dict, rates: dict, outputs: dict, input_bytes: int) -> dict:
    """The JSON record."""
    if (odd := [n for n, o in outputs.items() if o["identical"] != "bytes"]):
        raise BenchError(f"outputs not byte-identical across the ways: {', '.join(odd)}")
    jobs = {j.name: job_record(j, s, measured["samples"], outputs[j.name]) for j in JOBS}
    cal = measured["calibration"]
    link = {"addresses": ADDRESSES, "tbf": {str(m): " ".join(tbf_args(m)) for m in rates},
            "measured_mbit": {str(m): round(v, 1) for m, v in rates.items()}}
    return {"benchmark": NAME, "size": s["size"], "input_mb": round(input_bytes / 1e6, 2),
            "runs": s["runs"], "fio_size": s["fio_size"], "fio_runtime_s": s["fio_runtime"],
            "thesis_host": THESIS_HOST, "calibration": cal, "link": link,
            "environments": {e.name: env_record(e, jobs, cal, rates[e.mbit]) for e in s["envs"]},
            "jobs": jobs, "ways": len(ways_of(s["envs"])), "first_job": measured["first_job"],
            "fio": measured["fio"], "fio_where": measured["fio_where"],
            "gpu_queue": {**cluster.gpu_record(measured["gpu"]), "network": network(GPU_MBIT)},
            "samples": measured["samples"], "teardown": "nothing left", "machine": machine_info()}


# --- tables ----------------------------------------------------------------------------------

SUMMARY_HEADERS = ["env", "VM CPU", "network", "VM alone s", "offloaded s", "execution s",
                   "overhead s", "overhead per job s", "speed-up per job", "overall",
                   "thesis speed-up", "thesis overhead per job s"]
JOB_HEADERS = ["job", "env", "output", "VM alone s", "offloaded s", "execution s",
               "overhead s", "speed-up", "native s", "thesis VM s", "thesis offloaded s",
               "thesis speed-up"]
CALIBRATION_HEADERS = ["VM CPU", "quota (% of one CPU)", "clock probe in the cgroup", "error"]
LINK_HEADERS = ["network", "tbf on each end", "measured (TCP, VM to host)"]
FIO_HEADERS = ["pattern", "env", "VM disk MB/s", "host's NFS view MB/s", "NFS / disk",
               "VM disk p99 ms", "NFS p99 ms"]


def summary_rows(r: dict) -> list[list]:
    """Table 5.4's summary: one row per environment (its letter first), the thesis's beside."""
    low, high = (ms / 1000 for ms in THESIS_OVERHEAD_MS)
    return [[name, f"{e['mhz']} MHz", network(e["mbit"]), e["vm_s"], e["offloaded_s"],
             e["execution_s"], e["overhead_s"],
             f"{e['overhead_min_s']:.2f}-{e['overhead_max_s']:.2f}",
             f"{e['speedup_min']:.1f}x-{e['speedup_max']:.1f}x", f"{e['speedup_total']:.1f}x",
             f"{THESIS_SPEEDUP[0]}x-{THESIS_SPEEDUP[1]}x", f"{low:.2f}-{high:.2f}"]
            for name, e in r["environments"].items()]


def job_rows(r: dict) -> list[list]:
    """Table 5.4 per job: one row per job and environment, the thesis's figures beside."""
    rows = []
    for name, j in r["jobs"].items():
        t = j["thesis"]
        for env, x in j["envs"].items():
            rows.append([name, env, f"{j['geometry']}, {j['kb']} KB", x["vm_s"],
                         x["offloaded_s"], x["execution_s"], x["overhead_s"],
                         f"{x['speedup']:.1f}x", j["native_s"], t["vm_s"], t["offloaded_s"],
                         f"{t['speedup']:.1f}x"])
    return rows


def calibration_rows(r: dict) -> list[list]:
    """Per CPU setting: its quota and what the probe read inside the cgroup."""
    return [[f"{c['target_mhz']} MHz", c["quota_pct"], f"{c['probe_mhz']} MHz",
             f"{c['error_pct']:+.1f}%"] for c in r["calibration"]["settings"].values()]


def link_rows(r: dict) -> list[list]:
    """Per rate: tbf's parameters and the measured throughput."""
    return [[network(int(m)), f"`{r['link']['tbf'][m]}`", f"{v:.1f} Mbit/s"]
            for m, v in r["link"]["measured_mbit"].items()]


def fio_rows(r: dict) -> list[list]:
    """Fig 5.2.1: per environment and pattern, the VM's disk against the host's NFS view."""
    rows = []
    for env, f in r["fio"].items():
        for pattern, row in f["results"].items():
            rows.append([io.PATTERNS[pattern], env, row["local"]["mb_per_s"],
                         row["nfs"]["mb_per_s"], f"{row['nfs_vs_local']:.2f}x",
                         row["local"]["clat_p99_ms"], row["nfs"]["clat_p99_ms"]])
    return rows


def calibration_line(r: dict) -> str:
    """How the CPU cap was calibrated."""
    c = r["calibration"]
    return (f"The VM's CPU: {c['cgroup']}, quota = target MHz / this core's {c['core_mhz']} "
            "MHz (clock probe: dependent 64-bit multiplies per CPU second, best of 5 short "
            f"uncapped runs; /proc/cpuinfo says {c['cpuinfo_mhz']:.0f} MHz, {cpu_model()}), "
            "checked by the same probe run inside the capped cgroup for about 2 s (its cycles "
            "per wall second):")


def notes(r: dict) -> str:
    """What the summary's columns mean, and where they differ from the thesis's."""
    f = r["first_job"]
    return (f"{r['size']}x{r['size']} JPEG ({r['input_mb']} MB), median seconds of "
            f"{r['runs']} round(s), summed over the six jobs. VM alone does not touch the "
            "network: it is measured once per CPU setting and shared by the two networks "
            "(A and B, C and D). Offloaded = execution (the host's run time of `convert`, its "
            "NFS reads and writes across the link included) + overhead (the rest of what the "
            "capped caller waited: shim, agent, submit and exit over the link, queue, attach, "
            "drain). The host mounted the VM's export once, at an unmeasured first job "
            f"({f['total_s']:.2f} s, of which attach {f['attach_s']:.2f} s), and kept it; the "
            "thesis mounted and unmounted per job. The thesis's columns are its only published "
            f"figures (10000x10000 on a VM capped at 500 MHz-1 GHz of a {THESIS_HOST}, one "
            "table for all settings): the same for every environment here. Every output was "
            f"byte-identical across the {r['ways']} ways (VM alone per CPU, offloaded per "
            "environment, native). " + ceiling(r))


def ceiling(r: dict) -> str:
    """What bounds our speed-ups, against the thesis's."""
    ratios = ", ".join(f"{e['cpu_ratio']:.1f}x in {n}" for n, e in r["environments"].items())
    return (f"The host here is this machine ({r['machine']['nproc']} CPUs at "
            f"{r['calibration']['core_mhz']} MHz), so a single-threaded job can gain at most "
            f"the CPU ratio, {ratios}; the thesis's host had 4 cores (8 threads) at 3.4 GHz, "
            "and its 10000x10000 image did not fit the VM's 1 GB of memory (its pixel cache "
            "alone is 800 MB), which made the VM alone slower still: its 134x.")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md (and what the run prints)."""
    g = r["gpu_queue"]
    return [notes(r), "", md_table(SUMMARY_HEADERS, summary_rows(r)), "",
            "Per job (Table 5.4, Figs 5.3.1-5.3.2); native = `convert` on the host alone:", "",
            md_table(JOB_HEADERS, job_rows(r)), "", calibration_line(r), "",
            md_table(CALIBRATION_HEADERS, calibration_rows(r)), "",
            f"The link: a veth pair between two network namespaces ({r['link']['addresses']['vm']}"
            f" the VM's, {r['link']['addresses']['host']} the host's), both ends shaped:", "",
            md_table(LINK_HEADERS, link_rows(r)), "",
            f"fio (Fig 5.2.1): bs=4k, iodepth=32, libaio, {r['fio_size']}, "
            f"{r['fio_runtime_s']} s per job; the VM's disk: fio in the capped VM "
            f"(`{r['fio_where']['local']['fstype']}`); the host's NFS view: fio through the "
            f"shim on the host, in `{r['fio_where']['nfs']['source']}` across the link:", "",
            md_table(FIO_HEADERS, fio_rows(r)), "",
            cluster.gpu_line(r) + f", over {g['network']} between the namespaces:", "",
            md_table(cluster.GPU_HEADERS, cluster.gpu_rows(r))]


def report(r: dict) -> None:
    """Print the tables (Markdown, as in RESULTS.md)."""
    print()
    print("\n".join(markdown(r)))
    print(f"\nthesis: {r['duration_s']:.0f} s in all")


# --- plots -----------------------------------------------------------------------------------

ENV_COLORS = {"A": "#c44e52", "B": "#dd8452", "C": "#4c72b0", "D": "#55a868"}


def bar_xs(k: int, count: int, groups: int) -> tuple[list[float], float]:
    """Where the ``k``-th of ``count`` bars of each of ``groups`` groups goes, and its width."""
    width = 0.8 / count
    return [i + (k - (count - 1) / 2) * width for i in range(groups)], width


def plot(r: dict):
    """Figs 5.3.1-5.3.2: per job, VM alone and offloaded (execution + overhead) per
    environment (log scale), beside the overhead per job and environment."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), width_ratios=(3, 2))
    names, envs = list(r["jobs"]), list(r["environments"])
    mhzs = sorted({r["environments"][e]["mhz"] for e in envs})
    bars = [(f"VM alone, {m} MHz", "vm_s", e) for m in mhzs
            for e in [next(x for x in envs if r["environments"][x]["mhz"] == m)]]
    bars += [(f"offloaded, {e}", "offloaded_s", e) for e in envs]
    for k, (label, key, env) in enumerate(bars):
        xs, width = bar_xs(k, len(bars), len(names))
        values = [r["jobs"][n]["envs"][env][key] for n in names]
        left.bar(xs, values, width, label=label, color=ENV_COLORS[env], zorder=2,
                 alpha=0.45 if key == "vm_s" else 1.0, hatch="//" if key == "vm_s" else None)
    left.set_xticks(range(len(names)), names)
    left.set_yscale("log")
    left.set_ylabel("seconds (median, log scale)")
    left.grid(axis="y", which="both", alpha=0.3, zorder=0)
    left.legend(fontsize=8, ncol=2)
    left.set_title(f"VM alone vs offloaded, {r['size']}x{r['size']} JPEG")
    for k, env in enumerate(envs):
        xs, width = bar_xs(k, len(envs), len(names))
        right.bar(xs, [r["jobs"][n]["envs"][env]["overhead_s"] for n in names], width,
                  label=f"{env}: {r['environments'][env]['label']}", color=ENV_COLORS[env],
                  zorder=2)
    low, high = (ms / 1000 for ms in THESIS_OVERHEAD_MS)
    right.axhspan(low, high, color="0.85", zorder=0, label="the thesis's overhead per job")
    right.set_xticks(range(len(names)), names, rotation=20)
    right.set_ylabel("overhead per job, seconds (offloaded - execution)")
    right.grid(axis="y", alpha=0.3, zorder=0)
    right.legend(fontsize=8)
    right.set_title("overhead per job and environment")
    m = r["machine"]
    fig.suptitle(f"The thesis's environments A-D: VM capped by a cgroup, link shaped by tbf — "
                 f"{m['cpu']}, {m['nproc']} CPUs")
    return fig


def plot_io(r: dict):
    """Fig 5.2.1: MB/s per pattern, the VM's disk and the host's NFS view per environment."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(13, 5))
    patterns, envs = list(io.PATTERNS), list(r["fio"])
    series = [(e, p) for p in io.PLACES for e in envs]
    for k, (env, place) in enumerate(series):
        xs, width = bar_xs(k, len(series), len(patterns))
        values = [r["fio"][env]["results"][p][place]["mb_per_s"] for p in patterns]
        ax.bar(xs, values, width, color=ENV_COLORS[env], zorder=2,
               hatch="//" if place == "local" else None, alpha=0.5 if place == "local" else 1,
               label=f"{env}, {'VM disk' if place == 'local' else 'NFS view'}")
    ax.set_xticks(range(len(patterns)), [io.PATTERNS[p] for p in patterns])
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (log scale)")
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"fio bs=4k iodepth=32, {r['fio_size']}, {r['fio_runtime_s']} s per job: the "
                 "VM's disk (capped VM) vs the host's NFS view across the shaped link")
    return fig
