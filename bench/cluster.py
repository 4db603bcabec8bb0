"""Jobs/s through the broker (real and fake hosts), its added latency, and the ten-VM GPU queue.

Three measurements against a throw-away ``offloadd broker`` on loopback, in one run:

1. **Throughput**: closed-loop clients (each submits a no-op job, waits for its exit, submits
   the next) through the broker, with 1 and 3 hosts and 1..64 clients, counted over a fixed
   window after a warm-up. Every client is a ZeroMQ DEALER speaking the wire protocol itself
   (hello, then submit with argv, cwd, uid/gid/groups, env and window, as ``offld`` sends
   them; the bytes are checked equal to ``protocol.encode``'s), spread over ``--load-procs``
   load processes. Three kinds of host, labelled for what they measure:

   - ``real``: ``offloadd serve --connect`` hosts running ``/bin/true`` (a fork/exec per
     job): the whole system, bounded on a small machine by process spawns.
   - ``fake``: stand-ins (DEALERs in one process) that announce themselves with ``ready``,
     answer each ``submit`` at once with ``started`` and ``exit 0`` and ping; as many slots
     as a real host, so the broker queues jobs when clients outnumber slots.
   - ``fake-wide``: the same stand-ins with a slot per client: nothing waits in the broker's
     queue; what is left is its routing capacity (the issue's target: over 2,000 jobs/s).

   The CPU time of every process involved (broker, and its loop thread alone; hosts with
   their reaped children; load processes) and of the rest of the machine ("other") over the
   window is recorded: on a small machine the load generators and the hosts compete with the
   broker for the same cores, and whatever else runs there slows every case down. So the
   whole grid runs ``--rounds`` times (a fresh cluster each time) and each case keeps its
   best round; every round's figure is kept too.
2. **Broker hop**: one real host that listens for clients *and* takes jobs from the broker,
   and one fake host likewise; the same no-op submitted directly and through the broker,
   interleaved; the broker's added latency is the difference of the medians (and of the p99s).
3. **The thesis's GPU queue**: one one-slot host tagged ``gpu`` (``gpujob`` = ``/bin/sleep``),
   ten clients connecting at once, each submitting one ``gpujob 0.3`` with tags ["gpu"]; each
   client's connect (hello round trip), queue (submit to started) and run (started to exit).

``--profile`` also records the broker with py-spy (raw format, 200 Hz) during each kind's
largest case in the last round, into bench/results/cluster_profile_KIND_Nh.txt, and prints
where its time goes; those cases are slowed down by the sampling.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import select
import statistics
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import zmq

from offloadfs import environ, protocol
from tests.harness import Broker

from .common import (
    PROJECT,
    RESULTS,
    BenchError,
    broker,
    cpu_seconds,
    host,
    machine_info,
    md_table,
    percentile,
    print_table,
    publish,
    pyplot,
    save_png,
    start_py_spy,
    stop_py_spy,
    summarize_profile,
    summary,
    system_cpu,
)

NAME = "cluster"
HOSTS = (1, 3)
CLIENTS, QUICK_CLIENTS = (1, 4, 16, 64), (1, 16, 64)
KINDS = {
    "real": "real hosts (offloadd serve, /bin/true per job)",
    "fake": "fake hosts, as many slots as a real one",
    "fake-wide": "fake hosts, a slot per client (no broker queue)",
}
WINDOW_S, QUICK_WINDOW_S = 1.5, 0.6
WARMUP_S, QUICK_WARMUP_S = 0.4, 0.2
ROUNDS, QUICK_ROUNDS = 2, 1           # the grid is run this often; each case keeps its best
RUNS, QUICK_RUNS = 200, 40            # broker-hop samples per path
HOP_WARMUP = 10
TARGET_JOBS_PER_S = 10000          # issue 16 (it was 2,000)
TARGET_ADDED_P50_MS = 1.0
GPU_CLIENTS = 10
GPU_JOB_S = 0.3
START_DEADLINE = 30.0                 # load processes: spawn, import, connect, hello
DRAIN_S = 10.0                        # after the window: jobs in flight must end within this
JOB_DEADLINE = 10.0                   # one latency sample
HEARTBEAT = 1.0
JOB_ID_PAD = 8                        # packer's placeholder id (any length will do)
# frame 0 of an exit or an error holds one of these (its kind): the rest are not unpacked
ENDS = tuple(msgpack.packb("t") + msgpack.packb(kind) for kind in ("exit", "error"))
FAKE_COMMAND = "fakenoop"             # what fake hosts offer in the hop test (real ones: true)
REAL_COMMANDS = {"true": "/bin/true"}
GPU_COMMANDS = {"gpujob": "/bin/sleep"}
STAGE_COLORS = {"connect": "#4c72b0", "queue": "#dd8452", "run": "#55a868"}
EXIT_RUSAGE = {"utime": 0.0, "stime": 0.0, "maxrss_kb": 0}
EXIT_TIMINGS = {"queue": 0.0, "attach": 0.0, "run": 0.0, "drain": 0.0}


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"host kinds to measure, comma-separated (default: all of "
                             f"{', '.join(KINDS)})")
    parser.add_argument("--clients", help="client counts, comma-separated (default "
                        f"{','.join(map(str, CLIENTS))}; "
                        f"--quick {','.join(map(str, QUICK_CLIENTS))})")
    parser.add_argument("--hosts", default=",".join(map(str, HOSTS)),
                        help="host counts, comma-separated (default 1,3)")
    parser.add_argument("--window", type=float, help=f"seconds counted per case (default "
                        f"{WINDOW_S:g}, --quick {QUICK_WINDOW_S:g})")
    parser.add_argument("--rounds", type=int, help=f"runs of the whole grid, each case keeping "
                        f"its best (default {ROUNDS}, --quick {QUICK_ROUNDS}): other work on "
                        f"the machine only ever slows a case down")
    parser.add_argument("--load-procs", type=int, default=1,
                        help="processes the clients are spread over (default 1)")
    parser.add_argument("--slots", type=int, default=len(os.sched_getaffinity(0)),
                        help="slots of each real host and each 'fake' host (default: CPUs)")
    parser.add_argument("-n", "--runs", type=int, help=f"broker-hop samples per path (default "
                        f"{RUNS}, --quick {QUICK_RUNS})")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the broker during each kind's largest case (last "
                        "round), written to bench/results/cluster_profile_*.txt")


# --- the wire, fast: plain msgpack, the same bytes as protocol.encode -----------------------

def pack(kind: str, job: str | None = None, **fields) -> bytes:
    """Frame 0 of a message, as ``protocol.encode`` builds it but without its checks (which
    would cost the load generators and fake hosts CPU the broker needs)."""
    header = {"v": protocol.VERSION, "t": kind, **fields}
    if job is not None:
        header["job"] = job
    return msgpack.packb(header, use_bin_type=True)


def unpack(frame: bytes) -> dict:
    """Frame 0 of a message as a dict (no checks: the peers are the project's own code)."""
    return msgpack.unpackb(frame, raw=False)


def packer(kind: str, **fields):
    """A function of a job id to frame 0 of that job's message of ``kind`` with ``fields``:
    the same bytes as :func:`pack`, packed once but for the id (which :func:`pack` puts last),
    so that a load generator or fake host spends next to nothing per message."""
    mark = "\x00" * JOB_ID_PAD
    whole = pack(kind, mark, **fields)
    prefix = whole[:-len(msgpack.packb(mark))]
    return lambda job: prefix + msgpack.packb(job)


def job_fields(argv: list[bytes], tags: list[str] | None = None) -> dict:
    """The fields of a submit as ``offld`` fills them: this process's cwd-independent root
    directory, ids and the environment it would pass."""
    env = environ.passing(dict(os.environb), list(environ.DEFAULT_PASS))
    fields = {"argv": argv, "cwd": b"/", "uid": os.getuid(), "gid": os.getgid(),
              "groups": os.getgroups(), "env": env, "window": protocol.WINDOW}
    if tags:
        fields["tags"] = tags
    return fields


def check_wire(fields: dict) -> None:
    """Our submit's bytes are those of ``protocol.encode`` (which also validates them), and so
    are the fake hosts' answers."""
    if pack("submit", "1", **fields) != protocol.encode("submit", "1", **fields)[0]:
        raise BenchError("the benchmark's submit differs from protocol.encode's")
    made = [packer("submit", **fields)("1f"), *(make("1f") for make in fake_answers("f1", 1))]
    if any(frame != encoded(frame) for frame in made):
        raise BenchError("the benchmark's packed messages differ from protocol.encode's")


def encoded(frame: bytes) -> bytes:
    """Frame 0 of the message in ``frame`` as :func:`protocol.encode` makes (and checks) it."""
    header = unpack(frame)
    del header["v"]
    return protocol.encode(header.pop("t"), header.pop("job", None), None, **header)[0]


def fake_answers(name: str, pid: int) -> tuple:
    """The fake host ``name``'s answers to a submit (``started`` and ``exit 0``), as
    :func:`packer` functions of the job id."""
    return (packer("started", host=name, pid=pid, window=protocol.WINDOW),
            packer("exit", status=0, signal=None, rusage=EXIT_RUSAGE, timings=EXIT_TIMINGS))


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A client's DEALER socket, set up as ``offloadfs.channel.Channel`` does."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(11))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def inbox(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """The messages ``sock`` holds now, each as its frames, without blocking (ZMQ_EVENTS and
    Frame.more: no zmq.Again at the end, no RCVMORE getsockopt per frame)."""
    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        frames = [sock.recv(zmq.NOBLOCK, copy=False)]
        while frames[-1].more:
            frames.append(sock.recv(zmq.NOBLOCK, copy=False))
        yield [f.bytes for f in frames]


def reply(sock: zmq.Socket, route: list[bytes], frame: bytes) -> None:
    """Send one frame back where a message came from (``route``: a ROUTER's peer, or none)."""
    if route:
        sock.send_multipart(route + [frame])
    else:
        sock.send(frame)


def hello_all(socks: list[zmq.Socket], deadline: float) -> None:
    """Say hello on every socket and wait for every welcome."""
    poller = zmq.Poller()
    for sock in socks:
        sock.send(pack("hello"))
        poller.register(sock, zmq.POLLIN)
    waiting = set(socks)
    end = time.monotonic() + deadline
    while waiting and time.monotonic() < end:
        for sock, _ in poller.poll(100):
            for frames in inbox(sock):
                if unpack(frames[0]).get("t") == "welcome":
                    waiting.discard(sock)
    if waiting:
        raise RuntimeError(f"{len(waiting)} of {len(socks)} clients got no welcome")


# --- load processes: closed-loop clients ---------------------------------------------------

def load_worker(endpoint: str, clients: int, fields: dict, conn) -> None:
    """A load process: ``clients`` DEALERs; after ``go`` (t_start, t_end) each submits a job,
    waits for its exit and submits the next until t_end; reports what finished in the window."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        socks = [dealer(ctx, endpoint) for _ in range(clients)]
        hello_all(socks, START_DEADLINE)
        conn.send(("ready", os.getpid()))
        t_start, t_end = conn.recv()
        late = time.monotonic() - t_start
        conn.send(("done", {**closed_loop(socks, fields, t_start, t_end), "late_s": late}))
    except Exception:
        conn.send(("failed", traceback.format_exc()))
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def closed_loop(socks: list[zmq.Socket], fields: dict, t_start: float, t_end: float) -> dict:
    """Every socket keeps one job in flight until ``t_end``; the jobs whose exit came within
    [t_start, t_end) are counted, with their submit-to-exit latency. The sockets are watched
    through their ZMQ_FD with epoll, which costs per socket ready, where a zmq.Poller of 64
    sockets costs per socket watched (most of a load process's CPU, per job)."""
    with contextlib.closing(select.epoll()) as ep:
        index = {}
        for i, sock in enumerate(socks):
            fd = sock.getsockopt(zmq.FD)
            ep.register(fd, select.EPOLLIN)
            index[fd] = i
        return clients_loop(socks, fields, t_start, t_end, ep, index)


def clients_loop(socks: list[zmq.Socket], fields: dict, t_start: float, t_end: float, ep,
                 index: dict[int, int]) -> dict:
    """:func:`closed_loop`'s loop: ``ep`` watches the sockets' ZMQ_FDs, ``index`` gives each
    fd's socket. A ZMQ_FD only says that the socket has news: each socket it names (and each
    one we sent on) is read until ZMQ_EVENTS has no POLLIN."""
    seq = [0] * len(socks)
    sent = [0.0] * len(socks)
    done, total, live = 0, 0, len(socks)
    latencies: list[float] = []
    errors: list[str] = []
    make = packer("submit", **fields)

    def submit(i: int) -> None:
        seq[i] += 1
        sent[i] = time.monotonic()
        socks[i].send(make(format(seq[i], "x")))

    for i in range(len(socks)):
        submit(i)
    ready = list(range(len(socks)))
    while live and time.monotonic() < t_end + DRAIN_S:
        for i in ready:
            sock = socks[i]
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:   # no zmq.Again exceptions
                frame = sock.recv(zmq.NOBLOCK)
                if not any(mark in frame for mark in ENDS):
                    continue                          # queued, started, ping: not read
                header = unpack(frame)
                kind = header.get("t")
                if kind not in ("exit", "error"):
                    continue
                if kind == "error" or header.get("status") != 0:
                    errors.append(f"{kind}: {header.get('kind', '')} {header.get('text', '')}"
                                  f"{header.get('status', '')}")
                if header.get("job") != format(seq[i], "x"):
                    continue
                now = time.monotonic()
                total += 1
                if t_start <= now < t_end:
                    done += 1
                    latencies.append((now - sent[i]) * 1000)
                if now < t_end:
                    submit(i)
                else:
                    live -= 1
        ready = [index[fd] for fd, _ in ep.poll(0.1)]
    return {"done": done, "total": total, "latencies_ms": latencies, "errors": errors[:5],
            "n_errors": len(errors), "unfinished": live}


# --- fake hosts -----------------------------------------------------------------------------

def fake_hosts(workers: str, n: int, slots: int, command: str, direct: bool, conn) -> None:
    """``n`` fake hosts (DEALERs to the broker's worker port) offering ``command`` with
    ``slots`` slots each, answering every submit at once with started and exit 0, pinging
    every heartbeat; with ``direct`` also a ROUTER for clients, answering alike. Runs until
    anything arrives on ``conn``."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    router = None
    try:
        names = {}
        for i in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(workers)
            names[sock] = f"fake{i + 1}"
            socks.append(sock)
        ready = {s: pack("ready", host=names[s], commands=[command], slots=slots, tags=[])
                 for s in socks}
        for sock in socks:
            sock.send(ready[sock])
        endpoint = ""
        if direct:
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind("tcp://127.0.0.1:*")
            endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            names[router] = "fake-direct"
        conn.send(("ready", os.getpid(), endpoint))
        serve_fakes(socks, router, names, ready, conn)
    except Exception:
        conn.send(("failed", traceback.format_exc()))
    finally:
        for sock in socks + ([router] if router is not None else []):
            sock.close(linger=0)
        ctx.term()


def serve_fakes(socks: list[zmq.Socket], router, names: dict, ready: dict, conn) -> None:
    """The fake hosts' loop (see :func:`fake_hosts`)."""
    poller = zmq.Poller()
    for sock in socks + ([router] if router is not None else []):
        poller.register(sock, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    pid = os.getpid()
    answers = {sock: fake_answers(name, pid) for sock, name in names.items()}
    next_beat = time.monotonic() + HEARTBEAT
    while True:
        events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
        if conn.fileno() in events:
            return
        for sock in events:
            if not isinstance(sock, zmq.Socket):
                continue
            started, ended = answers[sock]
            for frames in inbox(sock):
                route, frame = (frames[:1], frames[1]) if sock is router else ([], frames[0])
                header = unpack(frame)
                kind = header.get("t")
                if kind == "submit":
                    job = header["job"]
                    reply(sock, route, started(job))
                    reply(sock, route, ended(job))
                elif kind == "hello":
                    reply(sock, route, pack("welcome", host=names[sock], commands=[], slots=1))
                elif kind == "error" and header.get("kind") == "reannounce" and sock in ready:
                    sock.send(ready[sock])
        if time.monotonic() >= next_beat:
            for sock in socks:
                sock.send(pack("ping", jobs=[]))
            next_beat = time.monotonic() + HEARTBEAT


@contextlib.contextmanager
def fake_farm(workers: str, n: int, slots: int, command: str = "true", direct: bool = False):
    """A process of ``n`` fake hosts; yields (pid, direct endpoint or ""); always stopped."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=fake_hosts, args=(workers, n, slots, command, direct, child),
                       name="bench-fake-hosts", daemon=True)
    proc.start()
    try:
        msg = expect(parent, proc, "ready", START_DEADLINE)
        yield msg[1], msg[2]
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        end_process(proc)


def end_process(proc) -> None:
    """Join a multiprocessing child; terminate, then kill it if it does not end in time."""
    proc.join(5)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


# --- a cluster: a broker and its hosts --------------------------------------------------------

@contextlib.contextmanager
def cluster(kind: str, hosts: int, slots: int, wide_slots: int):
    """A broker with ``hosts`` hosts of ``kind``; yields (broker, {role: [pids]})."""
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(broker())
        pids = {"broker": [b.proc.pid]}
        if kind == "real":
            pids["hosts"] = [stack.enter_context(host(
                REAL_COMMANDS, b.workers, "--slots", str(slots), "--name", f"h{i + 1}")).proc.pid
                for i in range(hosts)]
        else:
            farm_pid, _ = stack.enter_context(fake_farm(
                b.workers, hosts, wide_slots if kind == "fake-wide" else slots))
            pids["hosts"] = [farm_pid]
        b.wait_hosts(hosts)
        yield b, pids


# --- 1. throughput --------------------------------------------------------------------------

def throughput_case(b: Broker, pids: dict, clients: int, procs: int, fields: dict,
                    window: float, warmup: float, profile_to: Path | None) -> dict:
    """One case: ``clients`` closed-loop clients over ``procs`` load processes for ``window``
    seconds after ``warmup``; jobs/s, latency, CPU of each role and of the machine."""
    ctx = multiprocessing.get_context("spawn")
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    workers = []
    spy = None
    try:
        for share in (s for s in shares if s):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=load_worker, args=(b.clients, share, fields, child),
                               name="bench-load", daemon=True)
            proc.start()
            workers.append((proc, parent))
        load_pids = [expect(conn, proc, "ready", START_DEADLINE)[1] for proc, conn in workers]
        roles = {**pids, "load": load_pids}
        if profile_to is not None:
            spy = start_py_spy(b.proc.pid, profile_to)
        t_start = time.monotonic() + warmup
        t_end = t_start + window
        for _, conn in workers:
            conn.send((t_start, t_end))
        time.sleep(max(0.0, t_start - time.monotonic()))
        cpu0 = role_cpu(roles)
        sys0 = system_cpu()
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = role_cpu(roles)
        sys1 = system_cpu()
        if spy is not None:
            stop_py_spy(spy)
            spy = None
        reports = [expect(conn, proc, "done", window + DRAIN_S + 5)[1] for proc, conn in workers]
    finally:
        if spy is not None:
            stop_py_spy(spy)
        for proc, _ in workers:
            end_process(proc)
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise BenchError(f"{sum(r['n_errors'] for r in reports)} jobs failed, e.g. {errors[0]}:\n"
                         + b.log_tail())
    latencies = [x for r in reports for x in r["latencies_ms"]]
    done = sum(r["done"] for r in reports)
    late = max(r["late_s"] for r in reports)
    if late > 0 or not done:
        raise BenchError(f"the load processes were late for the window ({late:+.3f} s) or "
                         f"finished no job in it ({done} done, "
                         f"{sum(r['total'] for r in reports)} in all): is the machine busy?")
    elapsed = t_end - t_start
    busy, total = sys1[0] - sys0[0], sys1[1] - sys0[1]
    cpu = {role: round(100 * (cpu1[role] - cpu0[role]) / elapsed, 1) for role in cpu0}
    ours = sum(v for role, v in cpu.items() if role != "broker_loop")
    cpu["other"] = round(max(0.0, 100 * busy / elapsed - ours), 1)
    per_job = {role: (cpu1[role] - cpu0[role]) / done for role in cpu0}
    return {
        "jobs_per_s": round(done / elapsed, 1),
        "jobs": done,
        # CPU per job of the window's jobs: the broker's (µs) and the hosts' with the jobs
        # they spawned (ms; for real hosts the fork and exec of /bin/true and its reaping)
        "broker_cpu_us_per_job": round(1e6 * per_job["broker"], 1),
        "host_cpu_ms_per_job": round(1e3 * per_job["hosts"], 3),
        "window_s": round(elapsed, 3),
        "latency_p50_ms": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 99), 3) if latencies else None,
        "cpu_pct": cpu,                       # % of one CPU; "other": the rest of the machine
        "machine_busy_pct": round(100 * busy / total, 1) if total else None,
        "load_procs": len(workers),
        "unfinished": sum(r["unfinished"] for r in reports),
    }


def role_cpu(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far per role, and of the broker's loop thread (its main thread) alone:
    at 100 % that thread is the bottleneck, whatever ZeroMQ's I/O thread adds."""
    cpu = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
    cpu["broker_loop"] = cpu_seconds(roles["broker"][0], roles["broker"][0])
    return cpu


def expect(conn, proc, what: str, deadline: float):
    """The next message from child process ``proc``, which must be ``what``; fails at once
    if the child dies first."""
    ready = multiprocessing.connection.wait([conn, proc.sentinel], deadline)
    if conn not in ready or not conn.poll():
        state = "died" if not proc.is_alive() else f"sent no {what!r} within {deadline:.0f} s"
        raise BenchError(f"{proc.name} (pid {proc.pid}) {state}")
    msg = conn.recv()
    if msg[0] != what:
        raise BenchError(f"{proc.name} failed:\n{msg[1]}")
    return msg


def throughput(opts, kinds: list[str], hosts_list: list[int], clients_list: list[int],
               window: float, warmup: float, fields: dict, rounds: int) -> list[dict]:
    """Every (kind, hosts, clients) case, ``rounds`` times over (a fresh broker and hosts per
    (kind, hosts) and round); each case keeps its best round, and every round's jobs/s."""
    best: dict[tuple, dict] = {}
    wide = max(clients_list)
    for rnd in range(1, rounds + 1):
        for kind in kinds:
            for hosts in hosts_list:
                with cluster(kind, hosts, opts.slots, wide) as (b, pids):
                    for clients in clients_list:
                        profile_to = None
                        if opts.profile and rnd == rounds and clients == wide:
                            profile_to = RESULTS / f"{NAME}_profile_{kind}_{hosts}h.txt"
                        row = one_case(b, pids, kind, hosts, clients, opts, fields, window,
                                       warmup, profile_to)
                        row["round"] = rnd
                        if profile_to is not None:
                            row["profiled_round"] = rnd
                        print(f"  round {rnd}: {kind:9} {hosts} host(s) x "
                              f"{row['slots_per_host']:2} slots, {clients:2} clients: "
                              f"{row['jobs_per_s']:7.0f} jobs/s, p50 {row['latency_p50_ms']} ms,"
                              f" CPU% broker {row['cpu_pct']['broker']:.0f} (loop "
                              f"{row['cpu_pct']['broker_loop']:.0f}) hosts "
                              f"{row['cpu_pct']['hosts']:.0f} load {row['cpu_pct']['load']:.0f}"
                              f" other {row['cpu_pct']['other']:.0f}", flush=True)
                        keep_best(best, row)
    return [best[(k, h, c)] for k in kinds for h in hosts_list for c in clients_list]


def keep_best(best: dict, row: dict) -> None:
    """Keep the faster of ``row`` and the case's earlier best; remember every round's jobs/s
    and the profile, whichever round took it."""
    key = (row["kind"], row["hosts"], row["clients"])
    old = best.get(key)
    seen = (old["rounds_jobs_per_s"] if old else []) + [row["jobs_per_s"]]
    profile = {k: v for src in (old or {}, row) for k, v in src.items()
               if k in ("profile", "profile_summary", "profiled_round")}
    winner = row if old is None or row["jobs_per_s"] > old["jobs_per_s"] else old
    best[key] = {**winner, **profile, "rounds_jobs_per_s": seen}


def one_case(b: Broker, pids: dict, kind: str, hosts: int, clients: int, opts,
             fields: dict, window: float, warmup: float, profile_to: Path | None) -> dict:
    """One measured case as a row of the table."""
    procs = max(1, min(opts.load_procs, clients))
    row = {"kind": kind, "hosts": hosts,
           "slots_per_host": opts.slots if kind != "fake-wide" else clients_max(opts),
           "clients": clients,
           **throughput_case(b, pids, clients, procs, fields, window, warmup, profile_to)}
    if profile_to is not None:
        row["profile"] = str(profile_to.relative_to(PROJECT))
        row["profile_summary"] = summarize_profile(profile_to)
    return row


# --- profiling the broker -------------------------------------------------------------------

# --- 2. the broker hop ------------------------------------------------------------------------

def broker_hop(runs: int, fields: dict, fake_fields: dict) -> dict:
    """Direct vs through the broker, to the same real host and to the same fake host,
    interleaved one of each per round; samples in ms per path."""
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(broker())
        real = stack.enter_context(host(REAL_COMMANDS, b.workers, "--slots", "1",
                                        "--name", "hop", listen=True))
        _, fake_direct = stack.enter_context(fake_farm(b.workers, 1, 1, FAKE_COMMAND,
                                                       direct=True))
        b.wait_hosts(2)
        ctx = zmq.Context()
        stack.callback(ctx.term)
        paths = {"direct": (f"tcp://{real.host}", fields),
                 "broker": (b.clients, fields),
                 "fake_direct": (fake_direct, fake_fields),
                 "fake_broker": (b.clients, fake_fields)}
        socks = {}
        for name, (endpoint, _) in paths.items():
            socks[name] = dealer(ctx, endpoint)
            stack.callback(socks[name].close, 0)
        hello_all(list(socks.values()), START_DEADLINE)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(HOP_WARMUP + runs):
            for name, (_, f) in paths.items():
                ms = one_job(socks[name], f"{i:x}", f)
                if i >= HOP_WARMUP:
                    samples[name].append(ms)
        return samples


def one_job(sock: zmq.Socket, job: str, fields: dict) -> float:
    """Submit one job on ``sock`` and wait for its exit 0; the wall time in ms."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    started = time.perf_counter()
    sock.send(pack("submit", job, **fields))
    end = time.monotonic() + JOB_DEADLINE
    while time.monotonic() < end:
        if not poller.poll(100):
            continue
        for frames in inbox(sock):
            header = unpack(frames[0])
            if header.get("t") == "error":
                raise BenchError(f"job {job}: {header.get('kind')}: {header.get('text')}")
            if header.get("t") == "exit" and header.get("job") == job:
                if header["status"] != 0:
                    raise BenchError(f"job {job} exited {header['status']}")
                return (time.perf_counter() - started) * 1000
    raise BenchError(f"job {job}: no exit within {JOB_DEADLINE:.0f} s")


# --- 3. the GPU queue -----------------------------------------------------------------------

def gpu_queue(clients: int, seconds: float) -> list[dict]:
    """Ten VMs, one GPU: each client's connect, queue and run, in seconds from the start."""
    with gpu_cluster() as b:
        return gpu_clients(b.clients, clients, seconds)


@contextlib.contextmanager
def gpu_cluster(clients: str = "tcp://127.0.0.1:0", prefix: Sequence[str] = ()):
    """A broker taking clients on ``clients`` and one one-slot host tagged gpu, both started
    after ``prefix`` (e.g. nsenter into a namespace); yields the broker once the host is in."""
    with broker(clients=clients, prefix=prefix) as b, \
            host(GPU_COMMANDS, b.workers, "--slots", "1", "--tag", "gpu", "--name", "gpu1",
                 prefix=prefix):
        b.wait_hosts(1)
        yield b


def gpu_clients(endpoint: str, clients: int, seconds: float) -> list[dict]:
    """``clients`` clients of the broker at ``endpoint`` connecting at once, each submitting
    one ``gpujob SECONDS`` tagged gpu; their timelines, in seconds from the first connect."""
    fields = job_fields([b"gpujob", f"{seconds:g}".encode()], tags=["gpu"])
    with contextlib.ExitStack() as stack:
        ctx = zmq.Context()
        stack.callback(ctx.term)
        socks, records = [], []
        t0 = time.monotonic()
        for i in range(clients):
            at = time.monotonic()
            sock = dealer(ctx, endpoint)
            stack.callback(sock.close, 0)
            sock.send(pack("hello"))
            socks.append(sock)
            records.append({"client": i + 1, "hello": at - t0, "positions": []})
        drive_gpu_clients(socks, records, fields, t0, clients * seconds + 30)
    return records


def gpu_record(timelines: list[dict]) -> dict:
    """The GPU queue's JSON record: what ran, each client's timeline, when the last ended."""
    return {
        "clients": len(timelines), "job_s": GPU_JOB_S, "host": "one host, 1 slot, tag gpu",
        "timelines": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in timelines],
        "total_s": round(max(r["exit"] for r in timelines), 3),
    }


def drive_gpu_clients(socks: list, records: list[dict], fields: dict, t0: float,
                      deadline: float) -> None:
    """Submit on each welcome, note queued/started/exit, ping every heartbeat; all must end."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    index = {sock: i for i, sock in enumerate(socks)}
    open_jobs = set(range(len(socks)))
    next_beat = time.monotonic() + HEARTBEAT
    end = time.monotonic() + deadline
    while open_jobs and time.monotonic() < end:
        for sock, _ in poller.poll(50):
            r = records[index[sock]]
            for frames in inbox(sock):
                now = time.monotonic() - t0
                header = unpack(frames[0])
                kind = header.get("t")
                if kind == "welcome":
                    r["welcome"] = now
                    sock.send(pack("submit", "gpu", **fields))
                    r["submit"] = time.monotonic() - t0
                elif kind == "queued":
                    r["positions"].append(header["position"])
                elif kind == "started":
                    r["started"], r["host"] = now, header["host"]
                elif kind == "exit":
                    r["exit"], r["status"] = now, header["status"]
                    r["host_timings"] = header.get("timings", {})
                    open_jobs.discard(index[sock])
                elif kind == "error":
                    raise BenchError(f"GPU client {r['client']}: {header.get('kind')}: "
                                     f"{header.get('text')}")
        if time.monotonic() >= next_beat:
            for i in open_jobs:
                if "submit" in records[i]:
                    socks[i].send(pack("ping", jobs=["gpu"]))
            next_beat = time.monotonic() + HEARTBEAT
    if open_jobs:
        raise BenchError(f"{len(open_jobs)} GPU clients did not finish within {deadline:.0f} s")
    for r in records:
        if r["status"] != 0:
            raise BenchError(f"GPU client {r['client']}: gpujob exited {r['status']}")
        r["connect_s"] = r["submit"] - r["hello"]
        r["queue_s"] = r["started"] - r["submit"]
        r["run_s"] = r["exit"] - r["started"]


def clients_list_of(opts) -> list[int]:
    """The client counts of this run."""
    if opts.clients:
        return [int(x) for x in opts.clients.split(",")]
    return list(QUICK_CLIENTS if opts.quick else CLIENTS)


def clients_max(opts) -> int:
    """The largest client count: the slots of each fake-wide host."""
    return max(clients_list_of(opts))


# --- the run --------------------------------------------------------------------------------

def run(opts) -> dict:
    """Measure, print the tables, write cluster.json, cluster.png, cluster_gpu_queue.png."""
    kinds = [k for k in opts.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        raise BenchError(f"unknown kinds {', '.join(unknown)}; known: {', '.join(KINDS)}")
    hosts_list = [int(x) for x in opts.hosts.split(",")]
    clients_list = clients_list_of(opts)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    window = opts.window or (QUICK_WINDOW_S if opts.quick else WINDOW_S)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    runs = opts.runs or (QUICK_RUNS if opts.quick else RUNS)
    fields = job_fields([b"true"])
    fake_fields = job_fields([FAKE_COMMAND.encode()])
    check_wire(fields)
    started = time.monotonic()

    print(f"cluster: throughput, {window:g} s per case after {warmup:g} s warm-up, "
          f"{rounds} round(s) ...")
    rows = throughput(opts, kinds, hosts_list, clients_list, window, warmup, fields, rounds)
    print(f"cluster: broker hop, {runs} jobs per path, interleaved ...")
    hop = broker_hop(runs, fields, fake_fields)
    print(f"cluster: GPU queue, {GPU_CLIENTS} clients, one one-slot gpu host, "
          f"gpujob {GPU_JOB_S:g} s ...")
    timelines = gpu_queue(GPU_CLIENTS, GPU_JOB_S)

    result = results(rows, hop, timelines, fields, opts, window, warmup, runs, rounds)
    result["duration_s"] = round(time.monotonic() - started, 1)
    report(result)
    png = save_png(f"{NAME}_gpu_queue", plot_gpu(result))
    publish(NAME, result, plot(result))
    print(f"wrote {png.relative_to(PROJECT)}")
    return result


def results(rows: list[dict], hop: dict, timelines: list[dict], fields: dict, opts,
            window: float, warmup: float, runs: int, rounds: int) -> dict:
    """The JSON record."""
    table: dict = {}
    for r in rows:
        table.setdefault(r["kind"], {}).setdefault(str(r["hosts"]), {})[str(r["clients"])] = \
            r["jobs_per_s"]
    stats = {name: summary(s) for name, s in hop.items()}
    out: dict = {"benchmark": NAME, "kinds": {k: KINDS[k] for k in table},
                 "jobs_per_s": table, "throughput": rows}
    for name in hop:
        out[f"{name}_p50_ms"] = round(stats[name]["p50"], 3)
        out[f"{name}_p99_ms"] = round(stats[name]["p99"], 3)
    for prefix in ("", "fake_"):
        direct, via = stats[f"{prefix}direct"], stats[f"{prefix}broker"]
        out[f"{prefix}broker_added_p50_ms"] = round(via["p50"] - direct["p50"], 3)
        out[f"{prefix}broker_added_p99_ms"] = round(via["p99"] - direct["p99"], 3)
    fake = [r["jobs_per_s"] for r in rows if r["kind"] != "real"]
    out["best_fake_jobs_per_s"] = max(fake) if fake else None
    best = max((r for r in rows if r["kind"] != "real"), key=lambda r: r["jobs_per_s"],
               default=None)
    out["best_fake_broker_cpu_us_per_job"] = best["broker_cpu_us_per_job"] if best else None
    real = [r["host_cpu_ms_per_job"] for r in rows if r["kind"] == "real"]
    out["real_host_cpu_ms_per_job"] = round(statistics.median(real), 3) if real else None
    out["targets"] = {
        "broker_jobs_per_s": TARGET_JOBS_PER_S,
        "broker_jobs_per_s_met": bool(fake) and max(fake) > TARGET_JOBS_PER_S,
        "broker_added_p50_ms": TARGET_ADDED_P50_MS,
        "broker_added_p50_met": out["broker_added_p50_ms"] < TARGET_ADDED_P50_MS,
    }
    out["hop_n"] = runs
    out["hop_samples_ms"] = {k: [round(v, 3) for v in s] for k, s in hop.items()}
    out["gpu_queue"] = gpu_record(timelines)
    out["settings"] = {"window_s": window, "warmup_s": warmup, "rounds": rounds,
                       "load_procs": opts.load_procs,
                       "slots": opts.slots, "env_vars": len(fields["env"]),
                       "submit_bytes": len(pack("submit", "1", **fields)),
                       "transport": "tcp over loopback"}
    out["machine"] = machine_info()
    return out


THROUGHPUT_HEADERS = ["kind", "hosts", "slots/host", "clients", "jobs/s", "rounds", "p50 ms",
                      "p99 ms", "broker %", "its loop %", "hosts %", "load %", "other %",
                      "broker µs/job", "host ms/job"]
HOP_HEADERS = ["path", "p50 ms", "p99 ms"]
GPU_HEADERS = ["client", "connect ms", "queue ms", "run ms", "first position"]


def throughput_rows(r: dict) -> list[list]:
    """One row per throughput case."""
    return [[x["kind"], x["hosts"], x["slots_per_host"], x["clients"], x["jobs_per_s"],
             "/".join(f"{v:.0f}" for v in x["rounds_jobs_per_s"]),
             x["latency_p50_ms"], x["latency_p99_ms"], x["cpu_pct"]["broker"],
             x["cpu_pct"]["broker_loop"], x["cpu_pct"]["hosts"], x["cpu_pct"]["load"],
             x["cpu_pct"]["other"], x["broker_cpu_us_per_job"], x["host_cpu_ms_per_job"]]
            for x in r["throughput"]]


def hop_rows(r: dict) -> list[list]:
    """The broker hop's paths: direct and through the broker, real and fake host."""
    return [[name, r[f"{name}_p50_ms"], r[f"{name}_p99_ms"]]
            for name in ("direct", "broker", "fake_direct", "fake_broker")]


def gpu_rows(r: dict) -> list[list]:
    """The GPU queue: per client its connect, queue and run."""
    return [[x["client"], x["connect_s"] * 1000, x["queue_s"] * 1000, x["run_s"] * 1000,
             x["positions"][0] if x["positions"] else "-"] for x in r["gpu_queue"]["timelines"]]


def throughput_line(r: dict) -> str:
    """The broker's best jobs/s against its target, and the CPU a job costs."""
    t = r["targets"]
    host = r.get("real_host_cpu_ms_per_job")
    return (f"broker alone (fake hosts): best {r['best_fake_jobs_per_s']} jobs/s "
            f"({r.get('best_fake_broker_cpu_us_per_job')} µs of broker CPU per job); target "
            f"over {t['broker_jobs_per_s']}: "
            f"{'met' if t['broker_jobs_per_s_met'] else 'NOT met'}"
            + (f"; a real host's CPU per no-op job (its daemon and the job it spawns, median "
               f"of the real cases): {host} ms" if host is not None else ""))


def hop_line(r: dict) -> str:
    """What the broker adds to a job, against its target."""
    t = r["targets"]
    return (f"added by the broker, real host: p50 {r['broker_added_p50_ms']:.3f} ms, p99 "
            f"{r['broker_added_p99_ms']:.3f} ms (target under {t['broker_added_p50_ms']:g} ms at "
            f"p50: {'met' if t['broker_added_p50_met'] else 'NOT met'}); fake host: p50 "
            f"{r['fake_broker_added_p50_ms']:.3f} ms, p99 {r['fake_broker_added_p99_ms']:.3f} ms")


def gpu_line(r: dict) -> str:
    """What the GPU queue case ran."""
    g = r["gpu_queue"]
    return (f"GPU queue: {g['clients']} clients, {g['host']}, gpujob {g['job_s']:g} s "
            f"(all done after {g['total_s']:.2f} s)")


def report(r: dict) -> None:
    """Print the throughput, hop and GPU queue tables."""
    print()
    print(f"jobs/s: the best of {r['settings']['rounds']} round(s); latency and CPU (% of one "
          "CPU; other = the rest of the machine) of that round")
    print_table(THROUGHPUT_HEADERS, throughput_rows(r))
    print(f"\n{throughput_line(r)}")
    for x in r["throughput"]:
        if "profile_summary" in x and x["profile_summary"].get("samples"):
            print(f"\npy-spy of the broker, {x['kind']} {x['hosts']} host(s) {x['clients']} "
                  f"clients, round {x['profiled_round']} ({x['profile_summary']['samples']} "
                  f"samples, {x['profile']}):")
            print_table(["function", "incl. %", "self %"], x["profile_summary"]["functions"])
    print(f"\nbroker hop ({r['hop_n']} no-op jobs per path, interleaved):")
    print_table(HOP_HEADERS, hop_rows(r))
    print(hop_line(r))
    print(f"\n{gpu_line(r)}:")
    print_table(GPU_HEADERS, gpu_rows(r))


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    return [f"Jobs/s: the best of {r['settings']['rounds']} round(s) of "
            f"{r['settings']['window_s']:g} s; latency and CPU (% of one CPU; other = the rest "
            "of the machine) of that round. " + ", ".join(f"`{k}`: {v}" for k, v in KINDS.items())
            + ".", "", md_table(THROUGHPUT_HEADERS, throughput_rows(r)), "",
            throughput_line(r) + ".", "",
            f"Broker hop, {r['hop_n']} no-op jobs per path, interleaved:", "",
            md_table(HOP_HEADERS, hop_rows(r)), "", hop_line(r) + ".", "",
            gpu_line(r) + " — the thesis's ten VMs sharing one GPU host:", "",
            md_table(GPU_HEADERS, gpu_rows(r))]


def plot(r: dict):
    """Throughput vs clients per (kind, hosts), beside the broker hop's distributions."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.5), width_ratios=(3, 2))
    styles = {"real": "o-", "fake": "s--", "fake-wide": "^-"}
    colors = {1: "#4c72b0", 3: "#c44e52"}
    for kind, by_hosts in r["jobs_per_s"].items():
        for hosts, by_clients in by_hosts.items():
            xs = [int(c) for c in by_clients]
            left.plot(xs, list(by_clients.values()), styles.get(kind, "o-"),
                      color=colors.get(int(hosts), "0.3"),
                      label=f"{KINDS[kind]}, {hosts} host{'s' if hosts != '1' else ''}")
    left.axhline(TARGET_JOBS_PER_S, color="0.4", ls=":", lw=1.2,
                 label=f"target: broker alone over {TARGET_JOBS_PER_S:,} jobs/s")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    clients = sorted({x["clients"] for x in r["throughput"]})
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_xlabel("concurrent clients (closed loop, one job in flight each)")
    left.set_ylabel("no-op jobs per second (log scale)")
    left.set_title(f"throughput through the broker (best of {r['settings']['rounds']} "
                   f"round(s) of {r['settings']['window_s']:g} s)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    names = ["direct", "broker", "fake_direct", "fake_broker"]
    labels = ["real host\ndirect", "real host\nvia broker", "fake host\ndirect",
              "fake host\nvia broker"]
    right.boxplot([r["hop_samples_ms"][n] for n in names], showfliers=False, widths=0.5)
    right.set_xticks(range(1, 5), labels)
    for i, n in enumerate(names, start=1):
        right.annotate(f"p50 {r[f'{n}_p50_ms']:.2f}", (i, r[f"{n}_p50_ms"]), xytext=(18, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.set_ylabel("submit to exit, ms (whiskers 1.5 IQR, no outliers)")
    right.set_title(f"broker hop: +{r['broker_added_p50_ms']:.2f} ms p50 (real), "
                    f"+{r['fake_broker_added_p50_ms']:.2f} ms (fake)")
    right.grid(True, axis="y", alpha=0.3)
    m = r["machine"]
    fig.suptitle(f"offloadd broker on loopback — {m['cpu']}, {m['nproc']} CPUs "
                 f"(load generators, hosts and broker share them)")
    return fig


def plot_gpu(r: dict):
    """One bar per client: connect, queue, run on a time axis (the thesis's figure)."""
    plt = pyplot()
    g = r["gpu_queue"]
    fig, ax = plt.subplots(figsize=(11, 5))
    order = {x["client"]: n for n, x in
             enumerate(sorted(g["timelines"], key=lambda x: x["started"]), start=1)}
    for x in g["timelines"]:
        y = x["client"]
        segments = [("connect", x["hello"], x["connect_s"]), ("queue", x["submit"], x["queue_s"]),
                    ("run", x["started"], x["run_s"])]
        for stage, start, width in segments:
            ax.barh(y, width, left=start, height=0.6, color=STAGE_COLORS[stage],
                    label=stage if y == 1 else None)
        ax.annotate(f"GPU #{order[y]}: connect {x['connect_s'] * 1000:.1f} ms, queue "
                    f"{x['queue_s']:.2f} s, run {x['run_s']:.2f} s", (x["exit"], y),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks([x["client"] for x in g["timelines"]])
    ax.set_ylim(len(g["timelines"]) + 0.7, 0.3)
    ax.set_xlim(0, g["total_s"] * 1.45)
    ax.set_xlabel("seconds since the clients started")
    ax.set_ylabel("client (VM)")
    over = f", over {g['network']}" if "network" in g else ""
    ax.set_title(f"{g['clients']} VMs, one one-slot gpu host, gpujob {g['job_s']:g} s each, "
                 f"through the broker{over}")
    ax.grid(True, axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    labels = [f"{label} (hello round trip, a few ms: too thin to see here)"
              if label == "connect" else label for label in labels]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
              fontsize=9)
    return fig
