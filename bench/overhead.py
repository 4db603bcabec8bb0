"""Per-job cost of a no-op and of a small compile: local, the shim, offld, ssh and distcc.

Every path in :func:`paths` runs in the same run on the same machine, interleaved (one of each
path per round), so that drift in the machine's load hits every path alike. Two groups:

- **no-op**: local ``/bin/true`` (the baseline); ``MOUNTPOINT/true``, the shim of an
  ``offloadfs mount`` of a real ``offloadd`` (the file a PATH lookup finds with the mount first
  on PATH; the mount's counters must show every run offloaded); ``offld -- true`` with that
  mount first on PATH (handed to the mount's agent: the mount counts its runs too) and
  ``offld -p -H HOST -- true`` (offld's own ZeroMQ path, as without a mount); ``ssh`` to
  Debian's sshd on a loopback port (key auth, a new connection per job, as a script would use
  it) and the same over an ssh ControlMaster connection (multiplexed: no handshake per job);
  and, when this build has CURVE keys (``offloadd keygen``), the shim and ``offld`` against a
  second daemon that requires them.
- **gcc**: ``gcc -O2 -c`` of a small C file locally (the baseline), through the ``gcc`` shim,
  and with ``distcc`` to Debian's distccd on a loopback port (it preprocesses here, compiles
  there); the objects must be byte-identical and distccd must log every compile.

``offld -p`` (the direct row) gives the stage breakdown (connect, queue, attach, run, drain)
the thesis's overhead figure shows; the mount's own counters give the daemon's stages of the
shim's (and the handed-off offld's) jobs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offloadfs import protocol, shim

from .common import (
    START_DEADLINE,
    XATTR_STATUS,
    BenchError,
    Daemon,
    Distccd,
    Shims,
    Sshd,
    cpu_seconds,
    daemon,
    distccd,
    machine_info,
    md_table,
    median,
    median_by_key,
    parse_profile,
    percentile,
    print_table,
    publish,
    pyplot,
    shims,
    ssh_master,
    sshd,
    summary,
    timed_run,
    tool,
)

NAME = "overhead"
RUNS, QUICK_RUNS = 200, 30
WARMUP, QUICK_WARMUP = 5, 3
DAEMON_COMMANDS = {"true": "/bin/true", "gcc": "/usr/bin/gcc"}
THESIS_BAND_MS = (50, 350)
BREAKDOWN_RUNS, QUICK_BREAKDOWN_RUNS = 50, 20   # at most the 50 jobs the mount's status keeps
ROUND_TRIPS = 200          # listxattr calls timed for the cost of one FUSE request
SHIM_TARGET_MS, SHIM_P99_TARGET_MS = 3.0, 6.0   # issue 16: over local true, p50 and p99
# The shim's no-op, part by part: (label, from, to) between the moments the mount stamps on
# each job (ShimRequest.stamp; "t0"/"t1": the bench starting the shim and seeing it end); the
# host's own stages come out of the ZeroMQ part.
PARTS = (
    ("spawn, the shim's start (the compiled program), up to its control open", "t0", "open"),
    ("control open: the caller's /proc, pidfd_getfd of its stdio", "open", "opened"),
    ("the arguments' write, the first read, parse and policy", "opened", "submitted"),
    ("hand-off to the agent thread (queue, wake pipe, poll)", "submitted", "dispatch"),
    ("agent: the job built and sent", "dispatch", "sent"),
    ("the daemon outside its stages, and the ZeroMQ round trip (submit to exit, less the "
     "host's stages)", "sent", "finished"),
    ("the host's queue, attach, run, drain (as the daemon reports them)", None, None),
    ("agent concludes, the FUSE thread wakes", "finished", "woke"),
    ("the reply line built (sinks joined)", "woke", "replied"),
    ("the shim reads the rest of the reply", "replied",
     "read_last"),
    ("the shim closes its control file and exits, the bench sees it end", "read_last", "t1"),
)
HOST_PART = PARTS[6][0]
HOST_STAGES = ("queue", "attach", "run", "drain")
STAGES = tuple(s for s in protocol.STAGES if s != "total")   # start: interpreter, imports
CURVE_TARGET_SHARE = 0.10   # CURVE may add at most this share of the shim's overhead
COMPARE = (("shim", "ssh"), ("shim", "ssh_cm"), ("offld", "ssh"), ("shim_gcc", "distcc"),
           ("shim_gcc", "local_gcc"))
SMALL_C = r"""/* bench overhead: a small C file, compiled three ways. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct item { char name[32]; int weight; double score; };

static int by_score(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    return (x->score < y->score) - (x->score > y->score);
}

static double score(const struct item *it)
{
    double s = 0;
    for (size_t i = 0; i < strlen(it->name); i++)
        s += (it->name[i] * 31 + it->weight) % 97;
    return s / (it->weight + 1);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 16;
    struct item *items = calloc((size_t)n, sizeof *items);
    if (!items)
        return 1;
    for (int i = 0; i < n; i++) {
        snprintf(items[i].name, sizeof items[i].name, "item-%d", i * 7919 % 1000);
        items[i].weight = i % 13;
        items[i].score = score(&items[i]);
    }
    qsort(items, (size_t)n, sizeof *items, by_score);
    for (int i = 0; i < n && i < 5; i++)
        printf("%-12s %3d %8.3f\n", items[i].name, items[i].weight, items[i].score);
    free(items);
    return 0;
}
"""


@dataclasses.dataclass(frozen=True)
class JobPath:
    """One way of running a job: a short name (the JSON key prefix), a label, its group
    ("noop" or "gcc"), a command, and its environment if not the daemon's clients' one."""

    name: str
    label: str
    group: str
    argv: list[str]
    env: dict[str, str] | None = None


@dataclasses.dataclass
class Setup:
    """Everything the paths run against: the daemons, mounts, sshd, distccd, temp dir."""

    tmp: Path
    d: Daemon
    m: Shims
    ssh: Sshd
    distcc: Distccd
    curve: tuple[Daemon, Shims, str] | None   # the CURVE daemon, its mount, the VM's config
    curve_skipped: str = ""                   # why there is none


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("-n", "--runs", type=int, help=f"runs per path (default {RUNS}, "
                        f"--quick {QUICK_RUNS})")


def gcc_argv(tmp: Path, out: str) -> list[str]:
    """``-O2 -c small.c -o OUT.o`` with absolute paths (the job runs in the caller's cwd)."""
    return ["-O2", "-c", str(tmp / "small.c"), "-o", str(tmp / f"{out}.o")]


def paths(s: Setup) -> list[JobPath]:
    """The paths measured; the first of each group is its baseline."""
    offld = tool("offld")
    out = [
        JobPath("local", "local /bin/true", "noop", ["/bin/true"]),
        JobPath("shim", "shim MOUNTPOINT/true", "noop", [s.m.shim("true")]),
        JobPath("offld", "offld -- true (a mount's agent)", "noop", [offld, "--", "true"],
                s.m.env(s.d.client_env())),
        JobPath("python", "python -c pass (offld's interpreter alone)", "noop",
                [interpreter(offld), "-c", "pass"]),
        JobPath("offld_direct", "offld -H -- true (its own path)", "noop",
                [offld, "-p", "-H", s.d.host, "--", "true"]),
        JobPath("ssh", "ssh 127.0.0.1 true", "noop", s.ssh.argv(["true"])),
        JobPath("ssh_cm", "ssh, ControlMaster", "noop", s.ssh.argv(["true"], mux=True)),
    ]
    if s.curve:
        cd, cm, vm_config = s.curve
        out += [
            JobPath("shim_curve", "shim, CURVE", "noop", [cm.shim("true")]),
            JobPath("offld_curve", "offld -- true, CURVE", "noop",
                    [offld, "-p", "-c", vm_config, "-H", cd.host, "--", "true"]),
        ]
    out += [
        JobPath("local_gcc", "local gcc -c", "gcc", ["/usr/bin/gcc", *gcc_argv(s.tmp, "local")]),
        JobPath("shim_gcc", "shim gcc -c", "gcc", [s.m.shim("gcc"), *gcc_argv(s.tmp, "shim")]),
        JobPath("distcc", "distcc gcc -c", "gcc",
                ["distcc", "gcc", *gcc_argv(s.tmp, "distcc")], s.distcc.env()),
    ]
    return out


def interpreter(script: str) -> str:
    """The interpreter a console script's ``#!`` line names (offld's floor: its start)."""
    with open(script, "rb") as f:
        return os.fsdecode(f.readline()[2:].split()[0])


def curve_available() -> bool:
    """True if this build makes CURVE keys (``offloadd keygen``)."""
    done = subprocess.run([tool("offloadd"), "keygen", "--help"], capture_output=True, check=False)
    return done.returncode == 0


def curve_configs(tmp: Path) -> tuple[Path, Path]:
    """Keys for a host and a VM, and their TOML files (host's, VM's) authorizing the VM."""
    keys, authorized = tmp / "keys", tmp / "authorized"
    for program, name in (("offloadd", "host"), ("offloadfs", "vm")):
        subprocess.run([tool(program), "keygen", str(keys), name], check=True,
                       capture_output=True)
    authorized.mkdir()
    (authorized / "vm.key").write_bytes((keys / "vm.key").read_bytes())
    host_toml, vm_toml = tmp / "host.toml", tmp / "vm.toml"
    host_toml.write_text(f'[security]\nsecret_key = "{keys}/host.key_secret"\n'
                         f'authorized_keys = "{authorized}"\n'
                         f'[security.vms.vm]\nuids = "{os.getuid()}"\n')   # root needs a rule
    vm_toml.write_text(f'[security]\nsecret_key = "{keys}/vm.key_secret"\n'
                       f'server_key = "{keys}/host.key"\n')
    return host_toml, vm_toml


@contextlib.contextmanager
def setup(names: list[str]):
    """The daemon and its mount, sshd with a ControlMaster connection, distccd, and the CURVE
    daemon and mount if this build has keys; all stopped on the way out."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="offloadfs-bench-o-")))
        (tmp / "small.c").write_text(SMALL_C)
        if shim.program() is None:   # the shim a user gets, not the script it falls back to
            raise BenchError(f"{shim.PROGRAM} is not built (make install builds it)")
        d = stack.enter_context(daemon(DAEMON_COMMANDS))
        m = stack.enter_context(shims(d, names))
        ssh = stack.enter_context(sshd())
        stack.enter_context(ssh_master(ssh))
        dcc = stack.enter_context(distccd())
        curve, skipped = None, ""
        if curve_available():
            try:
                curve = curve_setup(stack, tmp, names)
            except (BenchError, subprocess.CalledProcessError) as exc:
                skipped = f"the CURVE daemon or mount did not start: {str(exc).splitlines()[0]}"
        else:
            skipped = "this build has no `offloadd keygen`"
        if skipped:
            print(f"overhead: CURVE rows skipped: {skipped}")
        yield Setup(tmp, d, m, ssh, dcc, curve, skipped)


def curve_setup(stack: contextlib.ExitStack, tmp: Path, names: list[str]):
    """A daemon requiring CURVE keys and a mount of it with the VM's keys, on ``stack``."""
    host_toml, vm_toml = curve_configs(tmp)
    cd = stack.enter_context(daemon(DAEMON_COMMANDS, "-c", str(host_toml)))
    cm = stack.enter_context(shims(cd, names, "-c", str(vm_toml)))
    return cd, cm, str(vm_toml)


def run(opts) -> dict:
    """Measure, print the tables, write overhead.json and overhead.png."""
    runs = opts.runs or (QUICK_RUNS if opts.quick else RUNS)
    warmup = QUICK_WARMUP if opts.quick else WARMUP
    with setup(list(DAEMON_COMMANDS)) as s:
        measured = paths(s)
        print(f"overhead: {runs} runs of each of {len(measured)} paths after {warmup} warm-up, "
              "interleaved ...")
        samples, profiles = measure(measured, runs, warmup, s.d.client_env())
        total = warmup + runs
        shim_stats = s.m.offloaded("true", 2 * total)   # the shim's runs and offld's
        s.m.offloaded("gcc", total)
        if s.curve:
            s.curve[1].offloaded("true", total)
        if s.distcc.compiled() != total:
            raise BenchError(f"distccd logged {s.distcc.compiled()} compiles of {total}:\n"
                             + s.distcc.log.read_text(errors="replace")[-2000:])
        identical = same_objects(s.tmp)
        breakdown = shim_breakdown(s.d, s.m, QUICK_BREAKDOWN_RUNS if opts.quick
                                   else BREAKDOWN_RUNS)
    result = results(measured, samples, profiles, warmup)
    result["shim_stages_mean_ms"] = {k: shim_stats["mean_ms"][k] for k in STAGES
                                     if k in shim_stats["mean_ms"]}
    result["shim_breakdown_ms"] = breakdown
    result["gcc_objects_identical"] = identical
    result["curve"] = curve_figures(result) if s.curve else {"skipped": s.curve_skipped}
    result["small_c"] = SMALL_C
    report(measured, result)
    publish(NAME, result, plot(result))
    return result


def measure(measured: list[JobPath], runs: int, warmup: int, env: dict[str, str]):
    """Wall times (ms) per path and the ``-p`` stages of the runs that print them."""
    samples: dict[str, list[float]] = {p.name: [] for p in measured}
    profiles: dict[str, list[dict[str, float]]] = {p.name: [] for p in measured}
    for i in range(warmup + runs):
        for p in measured:
            ms, stderr = timed_run(p.argv, p.env or env)
            stages = parse_profile(stderr)
            if i >= warmup:
                samples[p.name].append(ms)
                profiles[p.name] += [stages] if stages else []
    return samples, profiles


def shim_breakdown(d: Daemon, m: Shims, runs: int) -> dict:
    """Where a no-op through the shim spends its time: ``runs`` shim runs (each after a
    local ``true``, the reference), the moments the mount stamped on each job, the host's
    stages, the FUSE callbacks per run, and what one FUSE request (listxattr) and one ZeroMQ
    round trip (an echo) cost."""
    env = d.client_env()
    ops_before = fuse_ops(m)
    cpu_before = cpu_seconds(m.proc.pid, children=False)
    local, bounds = [], []
    for _ in range(runs):
        local.append(timed_run(["/bin/true"], env)[0])
        t0 = time.monotonic_ns()
        timed_run([m.shim("true")], env)
        bounds.append((t0, time.monotonic_ns()))
    ops_after = fuse_ops(m)
    mount_cpu_ms = (cpu_seconds(m.proc.pid, children=False) - cpu_before) * 1000 / runs
    jobs = json.loads(os.getxattr(str(m.path), XATTR_STATUS))["jobs"][-runs:]
    parts = [job_parts(job, t0, t1) for job, (t0, t1) in zip(jobs, bounds, strict=True)]
    per_run = {op: round((n - ops_before.get(op, (0, 0))[0]) / runs, 2)
               for op, (n, _) in ops_after.items() if op not in ("getxattr", "listxattr")}
    callback_ms = {op: round((ns - ops_before.get(op, (0, 0))[1]) / runs / 1e6, 3)
                   for op, (_, ns) in ops_after.items() if op in per_run}
    return {"runs": runs, "parts": {k: round(median([p[k] for p in parts]), 3)
                                    for k in parts[0]},
            "total_ms": round(median([p["total"] for p in parts]), 3),
            "local_true_ms": round(median(local), 3),
            "fuse_callbacks_per_run": {k: v for k, v in per_run.items() if v},
            "fuse_requests_per_run": round(sum(per_run.values()), 2),
            "fuse_callback_ms_per_run": {k: v for k, v in callback_ms.items() if per_run[k]},
            "mount_cpu_ms_per_run": round(mount_cpu_ms, 3),
            "fuse_round_trip_ms": fuse_round_trip(m),
            "zmq_round_trip_ms": zmq_round_trip()}


def job_parts(job: dict, t0: int, t1: int) -> dict[str, float]:
    """One job's parts (ms, PARTS), and its ``total`` from the bench's own clock."""
    stamps = {**job["stamps"], "t0": t0, "t1": t1}
    host = 1000 * sum(job.get(k, 0.0) for k in HOST_STAGES)
    out = {}
    for label, start, end in PARTS:
        if start is None:
            out[label] = host
            continue
        out[label] = (stamps[end] - stamps[start]) / 1e6
    out[PARTS[5][0]] -= host
    out["total"] = (t1 - t0) / 1e6
    return out


def fuse_ops(m: Shims) -> dict[str, tuple[int, int]]:
    """The mount's FUSE callbacks so far: {op: (calls, ns spent in them)}."""
    ops = json.loads(os.getxattr(str(m.path), XATTR_STATUS)).get("fuse_ops", {})
    return {op: (v["calls"], v["ns"]) for op, v in ops.items()}


def fuse_round_trip(m: Shims) -> float:
    """The median time (ms) of one FUSE request from here to the mount and back: a
    listxattr of a shim, which no cache answers."""
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter_ns()
        os.listxattr(m.shim("true"))
        times.append((time.perf_counter_ns() - start) / 1e6)
    return round(median(times), 3)


ECHO = """import sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""


def zmq_round_trip() -> float:
    """The median time (ms) of a message and its echo between a DEALER here and a ROUTER in
    another Python process over loopback (pyzmq both ends, as agent and daemon): the floor of
    the shim's ZeroMQ part."""
    import zmq

    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(f"tcp://127.0.0.1:{int(echo.stdout.readline())}")
        times = []
        for _ in range(ROUND_TRIPS + 5):
            start = time.perf_counter_ns()
            sock.send(b"x" * 200)
            if not sock.poll(START_DEADLINE * 1000):
                raise BenchError("the ZeroMQ echo process did not answer")
            sock.recv()
            times.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        sock.close(linger=0)
        ctx.term()
        echo.kill()
        echo.wait()
    return round(median(times[5:]), 3)


def same_objects(tmp: Path) -> bool:
    """True if the three compiles wrote byte-identical objects."""
    objects = {(tmp / f"{out}.o").read_bytes() for out in ("local", "shim", "distcc")}
    return len(objects) == 1


def results(measured: list[JobPath], samples: dict, profiles: dict, warmup: int) -> dict:
    """The JSON record: per-path p50/p99, overhead and ratio over its group's baseline, the
    comparisons, the stages."""
    stats = {name: summary(s) for name, s in samples.items()}
    base = {}
    for p in measured:
        base.setdefault(p.group, p.name)
    out: dict = {"benchmark": NAME, "n": len(samples[measured[0].name]), "warmup": warmup,
                 "baselines": base}
    for p in measured:
        out[f"{p.name}_p50_ms"] = round(stats[p.name]["p50"], 3)
        out[f"{p.name}_p99_ms"] = round(stats[p.name]["p99"], 3)
        b = stats[base[p.group]]["p50"]
        if p.name != base[p.group]:
            out[f"{p.name}_overhead_p50_ms"] = round(stats[p.name]["p50"] - b, 3)
            out[f"{p.name}_ratio_p50"] = round(stats[p.name]["p50"] / b, 2)
    out["compare"] = {f"{a}_vs_{b}": round(stats[a]["p50"] / stats[b]["p50"], 3)
                      for a, b in COMPARE if a in stats and b in stats}
    out["stages_ms"] = {k: round(v, 3)
                        for k, v in median_by_key(profiles["offld_direct"]).items()}
    out["offld_unprofiled_p50_ms"] = round(out["offld_direct_p50_ms"]
                                           - out["stages_ms"]["total"], 3)
    if profiles.get("offld_curve"):
        out["curve_stages_ms"] = {k: round(v, 3)
                                  for k, v in median_by_key(profiles["offld_curve"]).items()}
    out["commands"] = {p.name: p.argv for p in measured}
    out["labels"] = {p.name: p.label for p in measured}
    out["groups"] = {p.name: p.group for p in measured}
    out["samples_ms"] = {k: [round(v, 3) for v in s] for k, s in samples.items()}
    out["machine"] = machine_info()
    return out


def curve_figures(r: dict) -> dict:
    """What CURVE adds to the shim and offld per job, and its share of the shim's overhead."""
    added = r["shim_curve_p50_ms"] - r["shim_p50_ms"]
    share = added / r["shim_overhead_p50_ms"] if r["shim_overhead_p50_ms"] > 0 else 0.0
    r["curve_added_p50_ms"] = round(added, 3)
    r["offld_curve_added_p50_ms"] = round(r["offld_curve_p50_ms"] - r["offld_direct_p50_ms"],
                                          3)
    r["curve_share_of_shim_overhead"] = round(share, 3)
    paired = [c - p for p, c in zip(r["samples_ms"]["shim"], r["samples_ms"]["shim_curve"],
                                    strict=True)]
    return {"added_p50_ms": round(added, 3), "share_of_shim_overhead": round(share, 3),
            "target_share": CURVE_TARGET_SHARE, "met": share <= CURVE_TARGET_SHARE,
            "paired_added_p50_ms": round(percentile(paired, 50), 3),
            "paired_added_p25_p75_ms": [round(percentile(paired, q), 3) for q in (25, 75)]}


def curve_line(r: dict) -> str:
    """What CURVE adds to a shim job, with how noisy that difference is, against its target."""
    c = r["curve"]
    low, high = c["paired_added_p25_p75_ms"]
    return (f"CURVE adds {c['added_p50_ms']:.2f} ms to the shim's p50 "
            f"({r['shim_curve_p50_ms']:.1f} vs {r['shim_p50_ms']:.1f} ms): "
            f"{100 * c['share_of_shim_overhead']:.0f}% of its "
            f"overhead, target under {100 * CURVE_TARGET_SHARE:.0f}% "
            f"({'met' if c['met'] else 'missed'}); per round, the CURVE run minus the plain one: "
            f"median {c['paired_added_p50_ms']:.2f} ms, middle half {low:.2f} to {high:.2f} ms; "
            f"offld +{r['offld_curve_added_p50_ms']:.2f} ms (a new CURVE handshake per run)")


def table_rows(r: dict) -> list[list]:
    """One row per path: p50, p99, over its baseline, and its ratio to the baseline."""
    rows = []
    for name, label in r["labels"].items():
        rows.append([name, label, r[f"{name}_p50_ms"], r[f"{name}_p99_ms"],
                     r.get(f"{name}_overhead_p50_ms", 0.0),
                     f"{r.get(f'{name}_ratio_p50', 1.0):.2f}x"])
    return rows


TABLE_HEADERS = ["path", "what", "p50 ms", "p99 ms", "p50 - baseline ms", "x baseline"]


def stage_rows(r: dict) -> list[list]:
    """offld's median stages, then what lies outside its -p total."""
    rows = [[k, v] for k, v in r["stages_ms"].items()]
    rows.append(["outside -p (interpreter, imports, exit)", r["offld_unprofiled_p50_ms"]])
    return rows


def breakdown_rows(r: dict) -> list[list]:
    """The shim's no-op part by part (median ms of each over the breakdown's runs)."""
    b = r["shim_breakdown_ms"]
    return [[label, ms] for label, ms in b["parts"].items() if label != "total"] + \
        [["total (median of the runs' totals)", b["total_ms"]],
         ["local `/bin/true`, the same loop", b["local_true_ms"]]]


def breakdown_lines(r: dict) -> list[str]:
    """The counts and costs under the breakdown table, and the issue's target."""
    b = r["shim_breakdown_ms"]
    ops = ", ".join(f"{op} {n:g}" for op, n in sorted(b["fuse_callbacks_per_run"].items()))
    over, over99 = r["shim_p50_ms"] - r["local_p50_ms"], r["shim_p99_ms"] - r["local_p99_ms"]
    met = over <= SHIM_TARGET_MS and over99 <= SHIM_P99_TARGET_MS
    return [f"FUSE requests per run: {b['fuse_requests_per_run']:g} ({ops}); one FUSE request "
            f"(listxattr) takes {b['fuse_round_trip_ms']:.3f} ms from a caller and back; a "
            f"ZeroMQ message and its echo between two Python processes "
            f"{b['zmq_round_trip_ms']:.3f} ms; the mount process spent "
            f"{b['mount_cpu_ms_per_run']:.2f} ms of CPU per run. "
            f"Medians of {b['runs']} runs each, so the parts need not add up to the total.",
            f"Issue 16's target, the shim within {SHIM_TARGET_MS:g} ms of local `true` at p50 "
            f"and {SHIM_P99_TARGET_MS:g} ms at p99: +{over:.2f} ms and +{over99:.2f} ms, "
            f"{'met' if met else 'missed'}."]


def report(measured: list[JobPath], r: dict) -> None:
    """Print the per-path table, the comparisons and the stage breakdown."""
    print()
    print_table(TABLE_HEADERS, table_rows(r))
    print("\nratios of medians: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["compare"].items()))
    print(f"gcc objects identical (local, shim, distcc): {r['gcc_objects_identical']}")
    print(f"\noffld -p stages (median of {r['n']} runs):")
    print_table(["stage", "ms"], stage_rows(r))
    daemon_ms = sum(r["shim_stages_mean_ms"].values())
    print("\nshim: the daemon's stages (mean of the mount's jobs) "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in r["shim_stages_mean_ms"].items())
          + f"; the other {r['shim_p50_ms'] - daemon_ms:.1f} ms of its p50 are the shim "
          "program, FUSE, the mount's agent and the round trip")
    print(f"\nshim no-op, part by part (median of {r['shim_breakdown_ms']['runs']} runs):")
    print_table(["part", "ms"], breakdown_rows(r))
    for line in breakdown_lines(r):
        print(line)
    if "skipped" in r["curve"]:
        print(f"\nCURVE: skipped ({r['curve']['skipped']})")
    else:
        print(f"\n{curve_line(r)}")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    c = r["compare"]
    lines = [md_table(TABLE_HEADERS, table_rows(r)), "",
             f"Baselines: local `/bin/true` for the no-op paths, local `gcc -O2 -c` for the "
             f"compiles; {r['n']} runs per path after {r['warmup']} warm-up, interleaved.", "",
             f"- the shim is **{1 / c['shim_vs_ssh']:.0f}x faster than ssh** with a new "
             f"connection ({r['shim_p50_ms']:.1f} vs {r['ssh_p50_ms']:.1f} ms) and "
             f"{1 / c['shim_vs_ssh_cm']:.1f}x faster than ssh over a ControlMaster connection "
             f"({r['ssh_cm_p50_ms']:.1f} ms); its overhead over local `true` is "
             f"{r['shim_overhead_p50_ms']:.1f} ms at p50 (p99 {r['shim_p99_ms']:.1f} ms)",
             f"- `gcc -c` through the shim takes {c['shim_gcc_vs_distcc']:.2f}x distcc's time "
             f"({r['shim_gcc_p50_ms']:.1f} vs {r['distcc_p50_ms']:.1f} ms) and "
             f"{c['shim_gcc_vs_local_gcc']:.2f}x local gcc's ({r['local_gcc_p50_ms']:.1f} ms); "
             f"objects byte-identical: {'yes' if r['gcc_objects_identical'] else 'NO'}"]
    if "skipped" in r["curve"]:
        lines.append(f"- CURVE: not measured ({r['curve']['skipped']})")
    else:
        lines.append(f"- {curve_line(r)}")
    lines += ["", f"`offld -p` stages, median of {r['n']} runs:", "",
              md_table(["stage", "ms"], stage_rows(r)), "",
              "The shim's jobs as the daemon timed them (mean): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in r["shim_stages_mean_ms"].items())
              + f"; the rest of its {r['shim_p50_ms']:.1f} ms are the shim program, FUSE, the "
              "mount's agent and the loopback round trip.", "",
              *(breakdown_section(r) if "shim_breakdown_ms" in r else [])]
    return lines


def breakdown_section(r: dict) -> list[str]:
    """The shim's breakdown in RESULTS.md: the table and what is under it."""
    return [f"The shim's no-op part by part, from the moments the mount stamps on each job "
            f"(`stamps` in `user.offload.status`), the host's stages and the bench's own "
            f"clock around each run ({r['shim_breakdown_ms']['runs']} runs after the "
            f"interleaved ones, each after a local `true`):", "",
            md_table(["part", "ms"], breakdown_rows(r)), "", *breakdown_lines(r)]


# --- the plot -------------------------------------------------------------------------------

def plot(r: dict):
    """No-op and gcc distributions per path (log scale) beside the stacked stage breakdown."""
    plt = pyplot()
    fig, (noop, gcc, stages) = plt.subplots(1, 3, figsize=(18, 5.5), width_ratios=(4, 2, 2))
    plot_distributions(noop, r, "noop", "no-op job")
    plot_distributions(gcc, r, "gcc", "gcc -O2 -c small.c")
    plot_stages(stages, r)
    fig.suptitle(f"Per-job overhead ({r['n']} runs per path, interleaved) — "
                 f"{r['machine']['cpu']}, {r['machine']['nproc']} CPUs")
    return fig


def thesis_band(ax) -> None:
    """Shade the thesis's reported overhead range on ``ax``."""
    ax.axhspan(*THESIS_BAND_MS, color="0.6", alpha=0.2, zorder=0,
               label=f"thesis overhead {THESIS_BAND_MS[0]}–{THESIS_BAND_MS[1]} ms")


def plot_distributions(ax, r: dict, group: str, title: str) -> None:
    """A box plot per path of ``group``, with the median and p99 written beside each box."""
    names = [n for n, g in r["groups"].items() if g == group]
    ax.boxplot([r["samples_ms"][n] for n in names], showfliers=True, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), [r["labels"][n] for n in names], rotation=20,
                  ha="right", fontsize=9)
    for i, n in enumerate(names, start=1):
        ax.annotate(f"p50 {r[f'{n}_p50_ms']:.1f}\np99 {r[f'{n}_p99_ms']:.1f}",
                    (i + 0.28, r[f"{n}_p50_ms"]), va="center", fontsize=8)
    ax.set_xlim(0.5, len(names) + 0.95)
    if group == "noop":
        thesis_band(ax)
        ax.legend(loc="upper left", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("wall time per job (ms, log scale)")
    ax.set_title(title)


def plot_stages(ax, r: dict) -> None:
    """Stacked bars: offld's median stages (and with CURVE), topped by the time outside -p;
    the shim's daemon-side stages topped by the rest of its median."""
    bars = [("offld -H", r["stages_ms"], r["offld_direct_p50_ms"])]
    if "curve_stages_ms" in r:
        bars.append(("offld, CURVE", r["curve_stages_ms"], r["offld_curve_p50_ms"]))
    bars.append(("shim", r["shim_stages_mean_ms"], r["shim_p50_ms"]))
    colors = dict(zip([*STAGES, "rest"], pyplot().cm.tab10.colors, strict=False))
    for x, (_, stages, wall) in enumerate(bars):
        bottom = 0.0
        for k in STAGES:
            ms = stages.get(k, 0.0)
            ax.bar(x, ms, bottom=bottom, width=0.5, color=colors[k], zorder=2,
                   label=k if x == 0 else None)
            bottom += ms
        ax.bar(x, max(wall - bottom, 0.0), bottom=bottom, width=0.5, color=colors["rest"],
               zorder=2, label="outside the stages (start-up, the shim, FUSE...)" if x == 0
               else None)
        ax.annotate(f"{wall:.1f} ms", (x, wall), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=9)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    thesis_band(ax)
    ax.set_ylim(0, max(max(b[2] for b in bars), THESIS_BAND_MS[1]) * 1.1)
    ax.set_ylabel("median ms (shim: the daemon's mean stages)")
    ax.set_title("stages: start, connect, queue, attach, run, drain")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="stage")
