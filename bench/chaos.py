"""Chaos (issue 12): many clients' jobs while hosts and the broker die and restart; none runs twice.

One run on loopback: an ``offloadd broker`` on two ports picked once (every restart binds the
same ones), ``--hosts`` one-incarnation-at-a-time hosts (``offloadd serve --connect``, each
with its own state directory, so that a restarted host sweeps what its killed predecessor
left), and an ``offloadfs mount -L broker``. Every host allows two commands, ``chaosjob`` and
``chaosjoba``, both a small sh script of that host incarnation (``h2-3``: host 2, third
start)::

    chaosjob ID LOG [SLEEP]   appends "ID h2-3/SLOT TIME" to LOG (O_APPEND, one write),
                              sleeps SLEEP s, prints "chaos ID done", exits ID % 64

The caller's PATH has the mount first, then a local directory whose ``chaosjob`` appends
"ID local TIME" instead (the mount's fallback under ``auto``; ``offld --fallback`` runs it
too). ``chaosjoba``'s shim has policy ``always`` (``user.offload.policy``): it must never run
locally, so its local stand-in, which would append "ID local-always", is there only to catch
that. ``--clients`` threads each run one job after the other, by route in turn:

- ``offld``: ``offld -L BROKER -- chaosjob ...`` (exit 255 when no host ran it);
- ``offld-fb``: the same with ``--fallback LOCAL/chaosjob``;
- ``shim-auto``: ``chaosjob ...`` through the mount's shim, policy auto;
- ``shim-always``: ``chaosjoba ...`` through the shim, policy always.

Meanwhile, spread evenly over the jobs (by how many were started): ``--host-kills`` times a
live host gets SIGKILL (its warden and jobs are left to fend for themselves, as after a crash)
and starts again ``--down`` s later as a new incarnation; ``--broker-restarts`` times the broker
gets SIGTERM or SIGKILL (alternately, ``--broker-signal``), stays down ``--broker-down`` s and
starts again on the same ports. A thread asks the broker for its status every 0.1 s (the
``status`` message, as ``offloadd status`` does) to see which hosts it would dispatch to.

Each job is then classified from its exit status, its output and the lines its id has in the
log (anywhere: any host incarnation, or local):

- ``ran-once``: status and output right, exactly one line (split: on a host, locally);
- ``ran-twice``: two or more lines: the one thing that must never happen;
- ``255 never ran``: exit 255, one line on stderr saying "never ran", no line in the log;
- ``255 may have run``: exit 255, one line saying "may have run" (split: it ran / it did not);
- ``lie``: exit 255 saying "never ran" while its id is in the log (a failure);
- ``unsaid``: exit 255 without exactly one line saying "never ran" or "may have run" (issue
  12: every 255 says which; a failure);
- ``wrong``: status or output wrong with an exit other than 255, or a ``shim-always`` job run
  locally (a failure);
- ``hung``: not ended within ``--hang`` s: killed, and counted (a failure).

The time from a host's kill until the broker no longer counts it among its hosts (so sends it
nothing more) is read from the status replies; the time until its first running job's client
ended (its 255 naming it) from the clients. Everything (processes, the mount, temp dirs) is
stopped, unmounted and removed at the end, even on failure; the run fails (exit 1) if anything
ran twice, was wrong, lied, said nothing or hung.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import BROKER_UP, START_DEADLINE, descendants, mounted

from .common import (
    XATTR_POLICY,
    BenchError,
    machine_info,
    md_table,
    percentile,
    print_table,
    publish,
    pyplot,
    tool,
)

NAME = "chaos"
JOBS, QUICK_JOBS = 10000, 1000
ROUTES = ("offld", "offld-fb", "shim-auto", "shim-always")
CLASSES = ("ran-once host", "ran-once local", "255 never ran", "255 may have run, did not",
           "255 may have run, ran", "lie", "unsaid", "ran-twice", "wrong", "hung")
FAILURES = ("lie", "unsaid", "ran-twice", "wrong", "hung")
STATUS_EVERY, STATUS_WAIT = 0.1, 2.0
HOST_JOB = """#!/bin/sh
# chaosjob ID LOG [SLEEP] on {where}: one line in LOG, then the known output and status
printf '%s %s %s\\n' "$1" "{where}/${{OFFLOAD_SLOT:-?}}" "$(date +%s.%N)" >> "$2"
[ "${{3:-0}}" = 0 ] || sleep "$3"
echo "chaos $1 done"
exit $(( $1 % 64 ))
"""
LINE = re.compile(r"^(\d+) (\S+) ([0-9.]+)$")
HOST_NAME = re.compile(r"\bhost (h\d+-\d+)\b")


@dataclasses.dataclass
class Job:
    """One job: what ran it and what came of it."""

    id: int
    route: str
    sleep: float
    start: float = 0.0
    end: float = 0.0
    rc: int | None = None
    out: bytes = b""
    err: bytes = b""
    hung: bool = False
    lines: list = dataclasses.field(default_factory=list)   # (where, time) from the log
    cls: str = ""
    why: str = ""

    def expected_out(self) -> bytes:
        """The output line of a run that went right."""
        return f"chaos {self.id} done\n".encode()


@dataclasses.dataclass
class Host:
    """One host's slot in the cluster: its current incarnation, if up."""

    index: int
    state: Path
    gen: int = 0
    proc: subprocess.Popen | None = None
    log: Path | None = None
    killed_at: float = 0.0

    @property
    def name(self) -> str:
        """This incarnation's name (also what its job lines say)."""
        return f"h{self.index}-{self.gen}"


@dataclasses.dataclass
class Settings:
    """What one chaos run does (``add_arguments``'s options, or a test's)."""

    jobs: int = QUICK_JOBS
    clients: int = 16
    hosts: int = 3
    slots: int = 2
    host_kills: int = 4
    broker_restarts: int = 2
    down: float = 2.0
    broker_down: float = 0.5
    broker_signal: str = "both"
    sleep_share: float = 0.2
    sleep: float = 0.3
    hang: float = 60.0
    seed: int = 12
    routes: tuple = ROUTES


def add_arguments(p) -> None:
    """This benchmark's options."""
    p.add_argument("--jobs", type=int, help=f"jobs in all (default {JOBS}, --quick {QUICK_JOBS})")
    p.add_argument("--clients", type=int, default=16, help="clients running jobs at once")
    p.add_argument("--hosts", type=int, default=3, help="hosts behind the broker")
    p.add_argument("--slots", type=int, default=2, help="slots per host")
    p.add_argument("--host-kills", type=int, help="SIGKILLs of a live host, spread evenly over "
                   "the jobs (default one per 250 jobs)")
    p.add_argument("--broker-restarts", type=int, help="broker restarts, spread evenly over the "
                   "jobs (default one per 1000 jobs, at least 2)")
    p.add_argument("--down", type=float, default=2.0, help="seconds a killed host stays down")
    p.add_argument("--broker-down", type=float, default=0.5,
                   help="seconds the broker stays down")
    p.add_argument("--broker-signal", choices=("both", "TERM", "KILL"), default="both",
                   help="how the broker is stopped (both: SIGTERM and SIGKILL alternately)")
    p.add_argument("--sleep-share", type=float, default=0.2,
                   help="share of jobs that sleep (so that kills find jobs running)")
    p.add_argument("--sleep", type=float, default=0.3, help="how long those jobs sleep, s")
    p.add_argument("--hang", type=float, default=60.0,
                   help="a job not ended within this many seconds is killed and counted hung")
    p.add_argument("--seed", type=int, default=12, help="seed of the chaos (which host, which "
                   "jobs sleep)")


def settings(opts) -> Settings:
    """The run's settings from the command line."""
    jobs = opts.jobs or (QUICK_JOBS if opts.quick else JOBS)
    kills = jobs // 250 if opts.host_kills is None else opts.host_kills
    restarts = max(2, jobs // 1000) if opts.broker_restarts is None else opts.broker_restarts
    if jobs < 1 or opts.clients < 1 or opts.hosts < 1 or opts.slots < 1:
        raise BenchError("--jobs, --clients, --hosts and --slots must be at least 1")
    return Settings(jobs, opts.clients, opts.hosts, opts.slots, kills, restarts, opts.down,
                    opts.broker_down, opts.broker_signal, opts.sleep_share, opts.sleep,
                    opts.hang, opts.seed)


# --- the cluster ----------------------------------------------------------------------------

class Chaos:
    """A broker, its hosts, a mount, the clients and the chaos: :meth:`run` does it all and
    always cleans up (``close``)."""

    def __init__(self, s: Settings, base: Path | None = None):
        """Nothing starts yet; ``base`` is where the temp dir goes (default: the system's)."""
        self.s = s
        self.rng = random.Random(s.seed)
        self.top = Path(tempfile.mkdtemp(prefix="offloadfs-chaos-", dir=base)).resolve()
        for sub in ("local", "work", "mnt", "state", "logs", "scripts"):
            (self.top / sub).mkdir()
        self.runlog = self.top / "ran.log"
        self.runlog.touch()
        self.env = {**os.environ, "XDG_STATE_HOME": str(self.top / "state"),
                    "PATH": f"{self.top / 'mnt'}:{self.top / 'local'}:/usr/bin:/bin"}
        self.env.pop("OFFLOADFS_DEBUG", None)
        self.servers_env = {**os.environ, "XDG_STATE_HOME": str(self.top / "state")}
        self.cport = self.wport = 0
        self.broker: subprocess.Popen | None = None
        self.broker_gen = 0
        self.broker_log: Path | None = None
        self.hosts = [Host(i + 1, self.top / f"hoststate{i + 1}") for i in range(s.hosts)]
        self.mount: subprocess.Popen | None = None
        self.mount_log = self.top / "logs" / "mount.log"
        self.jobs = [Job(i, s.routes[i % len(s.routes)],
                         s.sleep if self.rng.random() < s.sleep_share else 0.0)
                     for i in range(s.jobs)]
        self.next = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.running: dict[int, subprocess.Popen] = {}
        self.events: list[dict] = []          # kills, restarts: {t, what, target, ...}
        self.seen: list[tuple] = []   # status answers: (asked, answered, hosts or None)
        self.strays: dict[int, int] = {}      # pid -> start time, of killed hosts' processes
        self.t0 = time.time()
        self.errors: list[str] = []

    # --- start and stop the parts ------------------------------------------------------------

    def write_scripts(self) -> None:
        """The local stand-ins (auto's fallback, and always's, which must never run)."""
        local = self.top / "local"
        (local / "chaosjob").write_text(HOST_JOB.format(where="local"))
        (local / "chaosjoba").write_text(HOST_JOB.format(where="local-always"))
        for path in local.iterdir():
            path.chmod(0o755)

    def start_broker(self) -> None:
        """``offloadd broker`` on the cluster's ports (port 0 the first time); waits until it
        is up, retrying while the old one's ports are still taken."""
        self.broker_gen += 1
        self.broker_log = self.top / "logs" / f"broker-{self.broker_gen}.log"
        end = time.monotonic() + START_DEADLINE
        while True:
            argv = [tool("offloadd"), "broker", "--clients", f"tcp://127.0.0.1:{self.cport}",
                    "--workers", f"tcp://127.0.0.1:{self.wport}"]
            with open(self.broker_log, "ab") as out:
                self.broker = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.top,
                                               stdin=subprocess.DEVNULL, env=self.servers_env,
                                               start_new_session=True)
            found = self._wait_broker()
            if found:
                break
            if time.monotonic() > end:
                raise BenchError(f"the broker did not start again on ports {self.cport}, "
                                 f"{self.wport}:\n{tail(self.broker_log)}")
            time.sleep(0.2)
        self.cport, self.wport = (int(found.group(i).rsplit(":", 1)[1]) for i in (1, 2))

    def _wait_broker(self) -> re.Match | None:
        """The broker's "clients on" line, or None if it exited (a port still taken)."""
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            if found := BROKER_UP.search(self.broker_log.read_text(errors="replace")):
                return found
            if self.broker.poll() is not None:
                return None
            time.sleep(0.02)
        raise BenchError(f"the broker did not come up within {START_DEADLINE:.0f} s:\n"
                         + tail(self.broker_log))

    def stop_broker(self, sig: int) -> None:
        """End the broker with ``sig`` and wait (SIGKILL after 10 s)."""
        proc = self.broker
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            self.errors.append(f"the broker ignored {signal.Signals(sig).name} for 10 s")
            proc.kill()
            proc.wait()

    def start_host(self, h: Host) -> None:
        """A new incarnation of host ``h``: its own script and name, the same state dir."""
        h.gen += 1
        script = self.top / "scripts" / f"chaosjob-{h.name}"
        script.write_text(HOST_JOB.format(where=h.name))
        script.chmod(0o755)
        h.state.mkdir(exist_ok=True)
        h.log = self.top / "logs" / f"{h.name}.log"
        argv = [tool("offloadd"), "serve", "--connect", f"tcp://127.0.0.1:{self.wport}",
                "--name", h.name, "--slots", str(self.s.slots), "--state-dir", str(h.state),
                "--command", f"chaosjob={script}", "--command", f"chaosjoba={script}"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        with open(h.log, "wb") as out:
            h.proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.top,
                                      stdin=subprocess.DEVNULL, env=self.servers_env,
                                      start_new_session=True)

    def kill_host(self, h: Host) -> None:
        """SIGKILL host ``h``'s daemon alone (its warden and jobs stay, as after a crash);
        what ran below it is remembered, to be sure it is gone at the end."""
        for pid in descendants(h.proc.pid):
            if (start := start_time(pid)) is not None:
                self.strays[pid] = start
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.proc.pid, signal.SIGKILL)
        h.proc.wait()
        h.killed_at = time.time()

    def start_mount(self) -> None:
        """``offloadfs mount -L broker -f``, ready once both shims are listed; chaosjoba's
        policy set to always."""
        mnt = self.top / "mnt"
        argv = [tool("offloadfs"), "mount", str(mnt), "-L", f"127.0.0.1:{self.cport}", "-f"]
        with open(self.mount_log, "wb") as out:
            self.mount = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.top,
                                          stdin=subprocess.DEVNULL, env=self.servers_env,
                                          start_new_session=True)
        end = time.monotonic() + START_DEADLINE
        while not (mounted(mnt) and (mnt / "chaosjob").exists() and (mnt / "chaosjoba").exists()):
            if self.mount.poll() is not None:
                raise BenchError(f"offloadfs mount exited {self.mount.returncode}:\n"
                                 + tail(self.mount_log))
            if time.monotonic() > end:
                raise BenchError("the mount did not list chaosjob and chaosjoba within "
                                 f"{START_DEADLINE:.0f} s:\n" + tail(self.mount_log))
            time.sleep(0.05)
        os.setxattr(mnt / "chaosjoba", XATTR_POLICY, b"always")
        os.setxattr(mnt / "chaosjob", XATTR_POLICY, b"auto")

    def wait_ready(self, n: int) -> None:
        """Wait until the broker's log shows ``n`` hosts ready."""
        end = time.monotonic() + START_DEADLINE
        while self.broker_log.read_bytes().count(b" ready: ") < n:
            dead = [h.name for h in self.hosts if h.proc and h.proc.poll() is not None]
            if dead or time.monotonic() > end:
                raise BenchError(f"hosts not ready within {START_DEADLINE:.0f} s (exited: "
                                 f"{dead or 'none'}):\n{tail(self.broker_log)}")
            time.sleep(0.02)

    def kill_clients(self) -> None:
        """SIGKILL the process group of every client still running (the run is ending)."""
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop everything, each by its pid: clients, the mount, hosts, the broker, what the
        killed hosts left; remove the temp dir."""
        self.stopping.set()
        self.kill_clients()
        if self.mount is not None:
            unmount(self.top / "mnt", self.mount)
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                terminate(h.proc, 10, self.errors, h.name)
        if self.broker is not None:
            terminate(self.broker, 10, self.errors, "the broker")
        end = time.monotonic() + 5
        while (left := [p for p, st in self.strays.items() if start_time(p) == st]) \
                and time.monotonic() < end:
            time.sleep(0.05)
        for pid in left:   # a warden did not do its job: say so, and do it
            self.errors.append(f"pid {pid} of a killed host still ran 5 s after the end")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.top, ignore_errors=True)

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        """Start the cluster, run every job under chaos, classify; the result (see
        :func:`result`). Always cleans up."""
        try:
            self.write_scripts()
            self.start_broker()
            for h in self.hosts:
                self.start_host(h)
            self.wait_ready(len(self.hosts))
            self.start_mount()
            self.t0 = time.time()
            threads = [threading.Thread(target=self.status_loop, name="chaos-status"),
                       threading.Thread(target=self.chaos_loop, name="chaos-chaos")]
            clients = [threading.Thread(target=self.client_loop, name=f"chaos-client-{n}")
                       for n in range(self.s.clients)]
            try:
                for t in [*threads, *clients]:
                    t.start()
                for t in clients:
                    t.join()
                self.t_end = time.time()
            finally:
                self.stopping.set()
                self.kill_clients()
                for t in [*threads, *clients]:
                    if t.ident is not None:
                        t.join()
            self.read_log()
            for job in self.jobs:
                classify(job)
            logs = self.logs_tail()
        finally:
            self.close()
        return self.result(logs)

    def take(self) -> Job | None:
        """The next job to run, or None."""
        with self.lock:
            if self.next >= len(self.jobs) or self.stopping.is_set():
                return None
            job = self.jobs[self.next]
            self.next += 1
            return job

    def argv(self, job: Job) -> list[str]:
        """The command line of ``job``'s route."""
        args = [str(job.id), str(self.runlog), f"{job.sleep:g}"]
        broker = ["-L", f"127.0.0.1:{self.cport}"]
        if job.route == "offld":
            return [tool("offld"), *broker, "--", "chaosjob", *args]
        if job.route == "offld-fb":
            return [tool("offld"), *broker, "--fallback", str(self.top / "local" / "chaosjob"),
                    "--", "chaosjob", *args]
        return ["chaosjoba" if job.route == "shim-always" else "chaosjob", *args]

    def client_loop(self) -> None:
        """One client: run jobs one after the other until none is left."""
        while (job := self.take()) is not None:
            job.start = time.time()
            try:
                proc = subprocess.Popen(self.argv(job), cwd=self.top / "work", env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                job.end, job.rc, job.err = time.time(), -1, str(exc).encode()
                continue
            with self.lock:
                self.running[proc.pid] = proc
                if self.stopping.is_set():   # the run ended while it started
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                job.out, job.err = proc.communicate(timeout=self.s.hang)
            except subprocess.TimeoutExpired:
                job.hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                job.out, job.err = proc.communicate()
            finally:
                with self.lock:
                    self.running.pop(proc.pid, None)
            job.end, job.rc = time.time(), proc.returncode

    def started(self) -> int:
        """How many jobs have been handed to clients."""
        with self.lock:
            return self.next

    def chaos_loop(self) -> None:
        """Kill hosts and restart the broker at the jobs' marks; restart killed hosts after
        ``down`` s. Errors end the run (recorded)."""
        s = self.s
        kills = [int((k + 0.5) * s.jobs / s.host_kills) for k in range(s.host_kills)]
        restarts = [int((r + 1) * s.jobs / (s.broker_restarts + 1))
                    for r in range(s.broker_restarts)]
        sigs = {"TERM": [signal.SIGTERM], "KILL": [signal.SIGKILL],
                "both": [signal.SIGTERM, signal.SIGKILL]}[s.broker_signal]
        down: list[tuple[float, Host]] = []
        try:
            while not self.stopping.is_set():
                n, now = self.started(), time.time()
                for when, h in [d for d in down if d[0] <= now]:
                    down.remove((when, h))
                    self.start_host(h)
                    self.event("host start", h.name)
                if kills and n >= kills[0]:
                    kills.pop(0)
                    live = [h for h in self.hosts if h.proc.poll() is None]
                    if live:
                        h = self.rng.choice(live)
                        name = h.name
                        self.kill_host(h)
                        self.event("host kill", name)
                        down.append((time.time() + s.down, h))
                if restarts and n >= restarts[0]:
                    restarts.pop(0)
                    sig = sigs[(s.broker_restarts - len(restarts) - 1) % len(sigs)]
                    self.event(f"broker {signal.Signals(sig).name}", f"broker-{self.broker_gen}")
                    self.stop_broker(sig)
                    time.sleep(s.broker_down)
                    self.start_broker()
                    self.event("broker start", f"broker-{self.broker_gen}")
                time.sleep(0.02)
        except Exception as exc:   # noqa: BLE001 - the run stops and says why
            self.errors.append(f"chaos: {exc}")
            self.stopping.set()

    def event(self, what: str, target: str) -> None:
        """Record a kill or a start."""
        self.events.append({"t": time.time(), "what": what, "target": target,
                            "started": self.started()})

    def status_loop(self) -> None:
        """Ask the broker which hosts it has, one ``status`` at a time, at most every 0.1 s;
        each answer is noted at the time it came (None: none within 2 s, the socket is then
        made anew so that a late answer is never taken for a later question's)."""
        import zmq

        from offloadfs import protocol
        ctx = zmq.Context()
        sock = None
        try:
            while not self.stopping.is_set():
                if sock is None:
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(f"tcp://127.0.0.1:{self.cport}")
                asked = time.time()
                sock.send_multipart(protocol.encode("status"), zmq.NOBLOCK)
                hosts = None
                while hosts is None and not self.stopping.is_set() \
                        and (left := asked + STATUS_WAIT - time.time()) > 0:
                    if sock.poll(min(left, 0.1) * 1000):
                        msg = protocol.decode(sock.recv_multipart())
                        if msg.kind == "status-reply":
                            hosts = sorted(row["host"] for row in msg["jobs"])
                if hosts is None:
                    sock.close(0)
                    sock = None
                self.seen.append((asked, time.time(), hosts))
                time.sleep(max(0.0, asked + STATUS_EVERY - time.time()))
        except Exception as exc:   # noqa: BLE001 - the measurement is lost, not the run
            self.errors.append(f"status: {exc}")
        finally:
            if sock is not None:
                sock.close(0)
            ctx.term()

    def read_log(self) -> None:
        """Give each job the lines its id has in the run log."""
        for line in self.runlog.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            if m and int(m.group(1)) < len(self.jobs):
                self.jobs[int(m.group(1))].lines.append((m.group(2), float(m.group(3))))
            else:
                self.errors.append(f"a line in the run log that is no job's: {line!r}")

    def logs_tail(self) -> dict[str, str]:
        """The last lines of every server log (for the report of a failure)."""
        logs = {p.stem: tail(p, 15) for p in sorted((self.top / "logs").iterdir())}
        return logs

    # --- the result -------------------------------------------------------------------------

    def result(self, logs: dict[str, str]) -> dict:
        """Counts by class and route, failures in full, the kills' detection times, the
        timeline."""
        counts = {c: {r: 0 for r in self.s.routes} for c in CLASSES}
        for job in self.jobs:
            if job.cls:
                counts[job.cls][job.route] += 1
        failures = [job_detail(j) for j in self.jobs if j.cls in FAILURES]
        duration = getattr(self, "t_end", time.time()) - self.t0
        return {
            "machine": machine_info(),
            "settings": dataclasses.asdict(self.s),
            "jobs": self.s.jobs,
            "duration_s": round(duration, 1),
            "jobs_per_s": round(self.s.jobs / duration, 1) if duration > 0 else 0.0,
            "counts": counts,
            "totals": {c: sum(counts[c].values()) for c in CLASSES},
            "failed": sum(sum(counts[c].values()) for c in FAILURES),
            "failures": failures[:200],
            "said_255": said_255(self.jobs),
            "events": [{**e, "t": round(e["t"] - self.t0, 3)} for e in self.events],
            "detection": self.detection(),
            "errors": self.errors,
            "logs": logs if failures or self.errors else {},
            "timeline": [[round(j.start - self.t0, 3), round(j.end - self.t0, 3),
                          CLASSES.index(j.cls) if j.cls else -1] for j in self.jobs],
        }

    def detection(self) -> dict:
        """Per host kill: seconds until the answer to a status asked after it no longer
        lists it (counted to the answer's arrival), and until the first client of a job on
        it ended (exit 255, its line naming the host); medians and maxima, and how long the
        broker took to answer."""
        rows = []
        kills = [e for e in self.events if e["what"] == "host kill"]
        for e in kills:
            name, t = e["target"], e["t"]
            gone = next((at for asked, at, hosts in self.seen
                         if asked >= t and hosts is not None and name not in hosts), None)
            told = [j.end for j in self.jobs if j.rc == 255 and j.end >= t
                    and name in HOST_NAME.findall(j.err.decode(errors="replace"))]
            lost = [j.id for j in self.jobs if j.rc == 255
                    and name in HOST_NAME.findall(j.err.decode(errors="replace"))]
            last_line = max((at for j in self.jobs for where, at in j.lines
                             if where.split("/")[0] == name), default=None)
            rows.append({"host": name, "t": round(t - self.t0, 3),
                         "broker_dropped_s": round(gone - t, 3) if gone else None,
                         "first_client_ended_s": round(min(told) - t, 3) if told else None,
                         "jobs_lost": len(lost),
                         "last_line_before_kill_s": round(t - last_line, 3)
                         if last_line is not None else None})
        dropped = [r["broker_dropped_s"] for r in rows if r["broker_dropped_s"] is not None]
        told = [r["first_client_ended_s"] for r in rows if r["first_client_ended_s"] is not None]
        waits = [at - asked for asked, at, hosts in self.seen if hosts is not None]
        return {"kills": rows, "resolution_s": STATUS_EVERY,
                "status_answer_p50_s": round(percentile(waits, 50), 3) if waits else None,
                "status_answer_max_s": round(max(waits), 3) if waits else None,
                "status_unanswered": sum(1 for *_, hosts in self.seen if hosts is None),
                "broker_dropped_p50_s": round(percentile(dropped, 50), 3) if dropped else None,
                "broker_dropped_max_s": round(max(dropped), 3) if dropped else None,
                "client_ended_p50_s": round(percentile(told, 50), 3) if told else None,
                "client_ended_max_s": round(max(told), 3) if told else None}


# --- classifying ----------------------------------------------------------------------------

def said(err: bytes) -> str:
    """What a 255's stderr says: "never", "may", or "" when it is not one line saying one."""
    text = err.decode(errors="replace")
    if text.count("\n") != 1 or not text.endswith("\n"):
        return ""
    if "never ran" in text:
        return "never"
    if "may have run" in text:
        return "may"
    return ""


def classify(job: Job) -> None:
    """Set ``job.cls`` (one of :data:`CLASSES`) and, for a failure, ``job.why``."""
    n = len(job.lines)
    local = [where for where, _ in job.lines if where.startswith("local")]
    if job.hung:
        job.cls, job.why = "hung", f"not ended within the bound; {n} line(s) in the log"
    elif n >= 2:
        job.cls, job.why = "ran-twice", f"{n} lines: {[w for w, _ in job.lines]}"
    elif job.rc == 255:
        says = said(job.err)
        if says == "never":
            job.cls = "lie" if n else "255 never ran"
            job.why = f"said never ran, ran on {job.lines[0][0]}" if n else ""
        elif says == "may":
            job.cls = "255 may have run, ran" if n else "255 may have run, did not"
        else:
            job.cls, job.why = "unsaid", "exit 255 without one line saying never ran / may have run"
    elif job.route == "shim-always" and local:
        job.cls, job.why = "wrong", "policy always, yet it ran locally"
    elif job.rc == job.id % 64 and job.out == job.expected_out() and n == 1:
        job.cls = "ran-once local" if local else "ran-once host"
    else:
        job.cls = "wrong"
        job.why = (f"exit {job.rc} (expected {job.id % 64}), stdout {job.out[:80]!r}, "
                   f"{n} line(s)")


def said_255(jobs: list[Job]) -> list[dict]:
    """What the 255s said, each text with numbers, ports and job ids blanked out: its class,
    how often, and how many of those jobs ran."""
    found: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        if job.rc == 255 and not job.hung:
            text = re.sub(r"\b[0-9a-f]{16}\b|\d+", "N",
                          job.err.decode(errors="replace").strip().replace("\n", " | "))
            found.setdefault((job.cls, text[:300]), []).append(len(job.lines))
    return [{"class": cls, "text": text, "count": len(ran), "ran": sum(1 for n in ran if n)}
            for (cls, text), ran in sorted(found.items(), key=lambda kv: -len(kv[1]))]


def job_detail(job: Job) -> dict:
    """A failed job in full, for the JSON and the report."""
    return {"id": job.id, "class": job.cls, "route": job.route, "why": job.why, "rc": job.rc,
            "sleep": job.sleep, "stdout": job.out.decode(errors="replace")[:300],
            "stderr": job.err.decode(errors="replace")[:600],
            "lines": [f"{where} {at:.3f}" for where, at in job.lines]}


# --- helpers ---------------------------------------------------------------------------------

def start_time(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks since boot), None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def terminate(proc: subprocess.Popen, deadline: float, errors: list, what: str) -> None:
    """SIGTERM ``proc`` and wait; SIGKILL (and say so) after ``deadline`` s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(deadline)
    except subprocess.TimeoutExpired:
        errors.append(f"{what} ignored SIGTERM for {deadline:g} s")
        proc.kill()
        proc.wait()


def unmount(mnt: Path, proc: subprocess.Popen) -> None:
    """``offloadfs umount`` and wait for the mount process; SIGKILL and a lazy unmount if it
    does not go."""
    if proc.poll() is None and mounted(mnt):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([tool("offloadfs"), "umount", str(mnt)], capture_output=True,
                           timeout=20, check=False)
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    end = time.monotonic() + 5
    while mounted(mnt) and time.monotonic() < end:
        time.sleep(0.05)
    if mounted(mnt):
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], capture_output=True, check=False)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, indented."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("  " + line for line in text)
    return "  (no log)"


# --- the benchmark ---------------------------------------------------------------------------

def table_rows(r: dict) -> list[list]:
    """One row per class: its count on each route and in all."""
    routes = r["settings"]["routes"]
    return [[c, *(r["counts"][c][route] for route in routes), r["totals"][c]] for c in CLASSES]


def run_chaos(s: Settings, base: Path | None = None) -> dict:
    """One chaos run with settings ``s`` (temp dir under ``base``); the result."""
    return Chaos(s, base).run()


def run(opts) -> dict:
    """``python -m bench chaos``: run, print the table, publish; fail if anything ran twice,
    was wrong, lied, said nothing or hung."""
    s = settings(opts)
    print(f"chaos: {s.jobs} jobs, {s.clients} clients, {s.hosts} hosts x {s.slots} slots, "
          f"{s.host_kills} host kills, {s.broker_restarts} broker restarts", flush=True)
    r = run_chaos(s)
    report(r)
    publish(NAME, r, plot(r))
    bad = {c: r["totals"][c] for c in FAILURES if r["totals"][c]}
    if bad or r["errors"]:
        raise BenchError("chaos: " + ", ".join(f"{n} {c}" for c, n in bad.items())
                         + ("; " if bad and r["errors"] else "") + "; ".join(r["errors"][:3]))
    return r


def report(r: dict) -> None:
    """The table, the kills' detection times, and every failure (a few lines each)."""
    print()
    print_table(["class", *r["settings"]["routes"], "all"], table_rows(r))
    d = r["detection"]
    kills, restarts = chaos_counts(r)
    print(f"\n{r['jobs']} jobs in {r['duration_s']} s ({r['jobs_per_s']} jobs/s); "
          f"{kills} host kills, {restarts} broker restarts")
    print(f"host kill -> the broker drops it: p50 {d['broker_dropped_p50_s']} s, max "
          f"{d['broker_dropped_max_s']} s (status asked every {d['resolution_s']} s, answered "
          f"in p50 {d['status_answer_p50_s']} s, max {d['status_answer_max_s']} s); -> first "
          f"client ended (a 255 naming it): p50 {d['client_ended_p50_s']} s, max "
          f"{d['client_ended_max_s']} s")
    if r["said_255"]:
        print("\nwhat the 255s said (numbers blanked):")
        print_table(["class", "count", "ran", "stderr"],
                    [[x["class"], x["count"], x["ran"], x["text"][:110]] for x in r["said_255"]])
    for f in r["failures"][:20]:
        print(f"  {f['class']}: job {f['id']} ({f['route']}): {f['why']}; exit {f['rc']}, "
              f"stderr {f['stderr'].strip()!r}, log {f['lines']}")
    for e in r["errors"]:
        print(f"  error: {e}")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    s, d = r["settings"], r["detection"]
    kills, restarts = chaos_counts(r)
    verdict = ("nothing ran twice, nothing was wrong, lied, said nothing or hung"
               if not r["failed"] else f"**{r['failed']} failures** ("
               + ", ".join(f"{r['totals'][c]} {c}" for c in FAILURES if r["totals"][c]) + ")")
    return [md_table(["class", *s["routes"], "all"], table_rows(r)), "",
            f"{r['jobs']} jobs from {s['clients']} clients in {r['duration_s']} s through a "
            f"broker and {s['hosts']} hosts of {s['slots']} slots, {kills} host SIGKILLs "
            f"(down {s['down']:g} s each), {restarts} broker restarts "
            f"({s['broker_signal']}); {verdict}. A killed host left the broker's status after "
            f"p50 {d['broker_dropped_p50_s']} s (max {d['broker_dropped_max_s']} s; asked "
            f"every {d['resolution_s']} s, answered in p50 {d['status_answer_p50_s']} s, max "
            f"{d['status_answer_max_s']} s); the first client of a job on it ended (255) after p50 "
            f"{d['client_ended_p50_s']} s (max {d['client_ended_max_s']} s).", "",
            "What the clients' 255s said (numbers blanked out), and how many of those jobs "
            "ran:", "",
            md_table(["class", "count", "ran", "stderr"],
                     [[x["class"], x["count"], x["ran"], f"`{x['text'][:160]}`"]
                      for x in r["said_255"]])]


def chaos_counts(r: dict) -> tuple[int, int]:
    """How many host kills and broker restarts the run had."""
    whats = [e["what"] for e in r["events"]]
    return whats.count("host kill"), whats.count("broker SIGTERM") + whats.count("broker SIGKILL")


def plot(r: dict):
    """Top: hosts' and the broker's down times; bottom: job outcomes over time (by end)."""
    plt = pyplot()
    fig, (lanes, outcomes) = plt.subplots(2, 1, figsize=(13, 6.5), sharex=True,
                                          height_ratios=(1, 2))
    end = r["duration_s"]
    names = sorted({e["target"].split("-")[0] for e in r["events"] if e["target"][0] == "h"}
                   | {f"h{i + 1}" for i in range(r["settings"]["hosts"])}) + ["broker"]
    down: dict[str, float] = {}
    for e in r["events"]:
        lane = "broker" if e["target"].startswith("broker") else e["target"].split("-")[0]
        y = names.index(lane)
        if e["what"] in ("host kill", "broker SIGTERM", "broker SIGKILL"):
            down[lane] = e["t"]
            lanes.plot([e["t"]], [y], "x", color="black" if "KILL" in e["what"]
                       or e["what"] == "host kill" else "tab:blue", markersize=8)
        elif lane in down:
            since = down.pop(lane)
            lanes.barh(y, e["t"] - since, left=since, height=0.5, color="tab:red", alpha=0.5)
    lanes.set_yticks(range(len(names)), names)
    lanes.set_title("down (red) after SIGKILL (x) or SIGTERM (blue x)")
    colors = {"ran-once host": "tab:green", "ran-once local": "tab:olive",
              "255 never ran": "tab:blue", "255 may have run, did not": "tab:orange",
              "255 may have run, ran": "tab:purple", "lie": "tab:red", "unsaid": "black",
              "ran-twice": "magenta", "wrong": "tab:brown", "hung": "tab:gray"}
    width = max(0.5, end / 120)
    bins = [i * width for i in range(int(end / width) + 2)]
    data, labels, cols = [], [], []
    for n, cls in enumerate(CLASSES):
        ends = [e for s, e, c in r["timeline"] if c == n]
        if ends:
            data.append(ends)
            labels.append(f"{cls} ({len(ends)})")
            cols.append(colors.get(cls, "black"))
    if data:
        outcomes.hist(data, bins=bins, stacked=True, label=labels, color=cols)
        outcomes.legend(fontsize=8, loc="upper right")
    outcomes.set_xlabel("seconds since the first job")
    outcomes.set_ylabel(f"jobs ended per {width:.2g} s")
    fig.suptitle(f"chaos: {r['jobs']} jobs, {r['settings']['clients']} clients — "
                 f"{r['machine']['cpu']}, {r['machine']['nproc']} CPUs")
    return fig
