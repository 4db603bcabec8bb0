"""The thesis's fio job on the caller's disk against the host's NFS view of the same directory.

The caller's tree (a temp dir, or one under ``--dir``) is exported by the shim mount's
nfs-ganesha (``[export] backend = "ganesha"``); the daemon reaches it with its userspace NFS
client (``[mounts] client = "userspace"``: ``offloadd.nfs``, FUSE over libnfs), because
this machine has no kernel NFS client. The same fio job (the thesis's: libaio, direct=1 where
the filesystem allows it, invalidate=1, bs=4k, iodepth=32; size and runtime scaled down by
``--quick``) runs twice per pattern, interleaved: here with ``fio`` in that directory (the
caller's disk), and through the ``fio`` shim, so that it runs on the host in its NFS mount of
the same directory (checked with an offloaded ``findmnt -T .``). Random read, random write,
sequential read, sequential write, and sequential read and write in 1 MiB blocks (``LARGE``,
not the thesis's); bandwidth, IOPS and completion latency (p50, p99) from fio's JSON, and the
CPU seconds the NFS server and client spent, in all and per GB moved.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from tests.harness import descendants, free_port

from .common import (
    BenchError,
    Daemon,
    Shims,
    cpu_seconds,
    daemon,
    machine_info,
    md_table,
    median,
    print_table,
    publish,
    pyplot,
    shims,
)

NAME = "io"
FIO = "/usr/bin/fio"
FINDMNT = "/usr/bin/findmnt"
PATTERNS = {"randread": "random read", "randwrite": "random write", "read": "sequential read",
            "write": "sequential write"}   # the thesis's jobs: 4 KiB blocks
LARGE = {"seqread_1m": "sequential read, 1 MiB", "seqwrite_1m": "sequential write, 1 MiB"}
FIO_JOBS = {"seqread_1m": ("read", "1m"), "seqwrite_1m": ("write", "1m")}  # else (name, 4k)
PLACES = {"local": "caller's disk", "nfs": "host's NFS view"}
SIZE, QUICK_SIZE = "1G", "64M"
RUNTIME_S, QUICK_RUNTIME_S = 30, 3
ROUNDS = 1
FIO_DEADLINE_S = 600
NFS_FSTYPE = "fuse.offloadnfs"


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("--size", help=f"fio's file size (default {SIZE}, --quick {QUICK_SIZE})")
    parser.add_argument("--runtime", type=int, help=f"seconds per fio job (default {RUNTIME_S}, "
                        f"--quick {QUICK_RUNTIME_S})")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"runs of each job in each place (default {ROUNDS}); medians kept")
    parser.add_argument("--dir", help="make the caller's tree under this directory (default: "
                        "the system's temp dir); its disk is the 'caller's disk'")


def fio_argv(pattern: str, size: str, runtime: int, direct: int, filename: str) -> list[str]:
    """The thesis's fio job for one pattern (its block size changed for LARGE ones), JSON on
    stdout."""
    rw, bs = FIO_JOBS.get(pattern, (pattern, "4k"))
    return [f"--name={pattern}", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=32", "--ioengine=libaio", f"--direct={direct}", "--invalidate=1",
            f"--size={size}", f"--runtime={runtime}", "--output-format=json"]


def configs(tmp: Path, root: Path, vm_address: str = "127.0.0.1",
            host_address: str = "127.0.0.1") -> tuple[Path, Path]:
    """The VM's config (export ``root`` with nfs-ganesha on a free port of ``vm_address``, to
    the host at ``host_address``; both loopback unless told) and the host's (userspace NFS
    mounts under ``tmp``)."""
    vm, host = tmp / "vm.toml", tmp / "host.toml"
    vm.write_text(f'[export]\nbackend = "ganesha"\nroot = "{root}"\n'
                  f'listen = "{vm_address}:{free_port()}"\nclients = ["{host_address}"]\n')
    host.write_text(f'[mounts]\nclient = "userspace"\ndir = "{tmp}/hostmnt"\n'
                    'idle_unmount = 3600\n')
    return vm, host


def run(opts) -> dict:
    """Measure, print the table, write io.json and io.png."""
    size = opts.size or (QUICK_SIZE if opts.quick else SIZE)
    runtime = opts.runtime or (QUICK_RUNTIME_S if opts.quick else RUNTIME_S)
    if not Path("/usr/bin/ganesha.nfsd").exists():
        raise BenchError("nfs-ganesha is not installed (make install)")
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-io-", dir=opts.dir) as name:
        tmp = Path(name)
        root, work = tmp / "vm", tmp / "vm" / "work"
        work.mkdir(parents=True)
        vm_toml, host_toml = configs(tmp, root)
        commands = {"fio": FIO, "findmnt": FINDMNT}
        with daemon(commands, "-c", str(host_toml)) as d, \
                shims(d, list(commands), "-c", str(vm_toml)) as m:
            where = {"local": fstype(["/usr/bin/findmnt"], work, d),
                     "nfs": fstype([m.shim("findmnt")], work, d)}
            if where["nfs"]["fstype"] != NFS_FSTYPE:
                raise BenchError(f"the offloaded job's cwd is on {where['nfs']}, not the host's "
                                 f"userspace NFS mount ({NFS_FSTYPE})")
            print(f"io: fio {size}, {runtime} s per job, {opts.rounds} round(s); caller's disk "
                  f"{where['local']['source']} ({where['local']['fstype']}), host's view "
                  f"{where['nfs']['fstype']} ...")
            runs = measure(d, m, work, size, runtime, opts.rounds, patterns=PATTERNS | LARGE)
            fio_jobs = m.stats("fio")
        if fio_jobs["fallbacks"] or fio_jobs["failures"]:
            raise BenchError(f"fio shim: {fio_jobs} (every run must be offloaded)")
    result = results(runs, where, size, runtime, opts.rounds)
    report(result)
    publish(NAME, result, plot(result))
    return result


def fstype(prefix: list[str], cwd: Path, d: Daemon) -> dict:
    """Where ``findmnt -T .`` run with ``prefix`` in ``cwd`` says that directory lives."""
    done = subprocess.run([*prefix, "-n", "-o", "FSTYPE,SOURCE,TARGET", "-T", "."], cwd=cwd,
                          capture_output=True, text=True, env=d.client_env(), check=False)
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) < 3:
        raise BenchError(f"findmnt -T . in {cwd}: exit {done.returncode}: {done.stderr.strip()}")
    return {"fstype": fields[0], "source": fields[1], "target": fields[2]}


def nfs_processes(d: Daemon, m: Shims) -> dict[str, int]:
    """The pids of the NFS server (ganesha, below the mount) and client (below the daemon)."""
    found = {}
    for who, top, mark in (("server", m.proc.pid, b"ganesha"),
                           ("client", d.proc.pid, b"offloadd.nfs")):
        for pid in descendants(top):
            with contextlib.suppress(OSError):
                if mark in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found[who] = pid
    return found


def measure(d: Daemon, m: Shims, work: Path, size: str, runtime: int, rounds: int,
            prefixes: dict[str, list[str]] | None = None,
            patterns: dict[str, str] = PATTERNS) -> dict:
    """fio's figures per place and pattern (of ``patterns``), the places interleaved per
    pattern; fio runs after ``prefixes[place]`` (default: ``fio`` here, and its shim)."""
    prefixes = prefixes or {"local": [FIO], "nfs": [m.shim("fio")]}
    runs = {place: {p: [] for p in patterns} for place in PLACES}
    direct = {place: 1 for place in PLACES}
    nfs = nfs_processes(d, m)
    for place in PLACES:
        lay_out(work / f"{place}.dat", size)
    for _ in range(rounds):
        for pattern in patterns:
            for place in PLACES:
                cpu0 = {who: cpu_seconds(pid) for who, pid in nfs.items()}
                figures, direct[place] = fio(prefixes[place], pattern, size, runtime, direct[place],
                                             f"{place}.dat", work, d)
                figures["nfs_cpu_s"] = {who: round(cpu_seconds(pid) - cpu0[who], 2)
                                        for who, pid in nfs.items()}
                runs[place][pattern].append(figures)
                print(f"io: {PLACES[place]:16} {patterns[pattern]:23} "
                      f"{figures['mb_per_s']:8.1f} MB/s (direct={figures['direct']})")
    return runs


def lay_out(path: Path, size: str) -> None:
    """Write fio's file here beforehand, so that no measured job (nor its NFS CPU count)
    includes fio laying it out, through NFS or not."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    count = int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)
    block = bytes(1 << 23)
    with open(path, "wb") as f:
        for _ in range(count // len(block)):
            f.write(block)
        f.write(bytes(count % len(block)))
        os.fsync(f.fileno())


def fio(prefix: list[str], pattern: str, size: str, runtime: int, direct: int, filename: str,
        cwd: Path, d: Daemon) -> tuple[dict, int]:
    """Run one fio job; its figures, and the direct setting that worked (direct=1 is retried
    as direct=0 if the filesystem refuses O_DIRECT)."""
    argv = [*prefix, *fio_argv(pattern, size, runtime, direct, filename)]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=d.client_env(),
                          timeout=FIO_DEADLINE_S, check=False)
    if done.returncode != 0 and direct and "direct" in (done.stderr + done.stdout).lower():
        return fio(prefix, pattern, size, runtime, 0, filename, cwd, d)
    if done.returncode != 0 or "{" not in done.stdout:
        raise BenchError(f"fio {pattern} ({' '.join(prefix)}) exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in pattern else "read"]
    clat = side["clat_ns"].get("percentile", {})
    return {"mb_per_s": round(side["bw_bytes"] / 1e6, 2), "iops": round(side["iops"]),
            "io_bytes": side["io_bytes"],
            "clat_p50_ms": round(clat.get("50.000000", 0) / 1e6, 3),
            "clat_p99_ms": round(clat.get("99.000000", 0) / 1e6, 3),
            "runtime_s": round(side["runtime"] / 1000, 2), "direct": direct}, direct


def results(runs: dict, where: dict, size: str, runtime: int, rounds: int) -> dict:
    """The JSON record: per place and pattern the median MB/s, IOPS and latencies, the NFS
    view's ratio to the caller's disk, and the NFS server's and client's CPU (last run)."""
    patterns = {p: (PATTERNS | LARGE)[p] for p in runs["nfs"]}
    out: dict = {"benchmark": NAME, "size": size, "runtime_s": runtime, "rounds": rounds,
                 "where": where, "patterns": patterns, "places": PLACES, "results": {}}
    for pattern in patterns:
        row = {}
        for place in PLACES:
            rs = runs[place][pattern]
            row[place] = {k: round(median([r[k] for r in rs]), 3)
                          for k in ("mb_per_s", "clat_p50_ms", "clat_p99_ms")}
            row[place]["iops"] = round(median([r["iops"] for r in rs]))
            row[place]["direct"] = rs[-1]["direct"]
            out[f"{place}_{pattern}_mb_per_s"] = row[place]["mb_per_s"]
        row["nfs_vs_local"] = round(row["nfs"]["mb_per_s"] / row["local"]["mb_per_s"], 3)
        last = runs["nfs"][pattern][-1]
        row["nfs_cpu_s"] = last["nfs_cpu_s"]
        row["nfs_busy_cpus"] = round(sum(row["nfs_cpu_s"].values()) / last["runtime_s"], 2)
        row["nfs_cpu_s_per_gb"] = {who: round(cpu / max(last.get("io_bytes", 0) / 1e9, 1e-9), 2)
                                   for who, cpu in row["nfs_cpu_s"].items()}
        for who, per_gb in row["nfs_cpu_s_per_gb"].items():
            out[f"nfs_{pattern}_{who}_cpu_s_per_gb"] = per_gb
        out["results"][pattern] = row
    out["runs"] = runs
    out["machine"] = machine_info()
    return out


TABLE_HEADERS = ["pattern", "disk MB/s", "NFS MB/s", "NFS / disk", "disk IOPS", "NFS IOPS",
                 "disk p50 ms", "NFS p50 ms", "disk p99 ms", "NFS p99 ms", "direct (disk, NFS)",
                 "NFS CPU s (server, client)", "NFS CPU s/GB (server, client)", "NFS CPUs busy"]


def table_rows(r: dict) -> list[list]:
    """One row per pattern: both places side by side, with the ratio."""
    rows = []
    for pattern, row in r["results"].items():
        local, nfs = row["local"], row["nfs"]
        cpu, per_gb = row["nfs_cpu_s"], row.get("nfs_cpu_s_per_gb", {})
        rows.append([r["patterns"][pattern], local["mb_per_s"], nfs["mb_per_s"],
                     f"{row['nfs_vs_local']:.2f}x", local["iops"], nfs["iops"],
                     local["clat_p50_ms"], nfs["clat_p50_ms"], local["clat_p99_ms"],
                     nfs["clat_p99_ms"], f"{local['direct']}, {nfs['direct']}",
                     f"{cpu.get('server', 0):.1f}, {cpu.get('client', 0):.1f}",
                     f"{per_gb.get('server', 0):.1f}, {per_gb.get('client', 0):.1f}",
                     row["nfs_busy_cpus"]])
    return rows


def report(r: dict) -> None:
    """Print the table."""
    print()
    print_table(TABLE_HEADERS, table_rows(r))


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    w = r["where"]
    return [f"fio: libaio, bs=4k (1 MiB in the 1 MiB rows), iodepth=32, invalidate=1, "
            f"size={r['size']}, runtime "
            f"{r['runtime_s']} s per job (the thesis: 1GB, 30 s), direct=1 unless the "
            f"filesystem refused it; median of {r['rounds']} run(s). The caller's disk: "
            f"`{w['local']['source']}` ({w['local']['fstype']}). The host's NFS view: the "
            "caller's directory exported by nfs-ganesha (userspace, on the caller's side) and "
            f"mounted by the daemon with its userspace client (`{w['nfs']['fstype']}`, "
            "FUSE over libnfs): this machine has no kernel NFS client, so the kernel client's "
            "figures (the thesis's) are not measured here. Latencies are fio's completion "
            "latencies (clat) per request. NFS CPUs busy: the CPU seconds of the NFS server "
            "and client per second of the job (near the machine's CPU count: CPU-bound); NFS "
            "CPU s/GB: the same per GB moved.", "", md_table(TABLE_HEADERS, table_rows(r))]


COLORS = {"local": "0.55", "nfs": "tab:blue"}


def plot(r: dict):
    """Grouped bars of MB/s per pattern (disk vs NFS view) beside their p99 latencies."""
    plt = pyplot()
    fig, (bw, lat) = plt.subplots(1, 2, figsize=(14, 5))
    names = list(r["results"])
    width = 0.38
    for k, place in enumerate(PLACES):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        values = [r["results"][n][place]["mb_per_s"] for n in names]
        bw.bar(xs, values, width, label=PLACES[place], color=COLORS[place], zorder=2)
        lat.bar(xs, [r["results"][n][place]["clat_p99_ms"] for n in names], width,
                label=PLACES[place], color=COLORS[place], zorder=2)
        for x, v in zip(xs, values, strict=True):
            bw.annotate(f"{v:.0f}", (x, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=8)
    for i, n in enumerate(names):
        top = max(r["results"][n][p]["mb_per_s"] for p in PLACES)
        bw.annotate(f"NFS {r['results'][n]['nfs_vs_local']:.2f}x", (i, top), xytext=(0, 14),
                    textcoords="offset points", ha="center", fontsize=9, color="tab:blue")
    for ax in (bw, lat):
        ax.set_xticks(range(len(names)), [r["patterns"][n] for n in names])
        ax.legend(fontsize=9)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    bw.set_ylabel("MB/s")
    bw.set_ylim(0, max(r["results"][n][p]["mb_per_s"] for n in names for p in PLACES) * 1.25)
    bw.set_title(f"fio bs=4k iodepth=32, {r['size']}, {r['runtime_s']} s per job")
    lat.set_yscale("log")
    lat.set_ylabel("completion latency p99 (ms, log scale)")
    lat.set_title("p99 latency per 4 KiB request")
    fig.suptitle(f"I/O: the caller's disk vs the host's userspace NFS view — "
                 f"{r['machine']['cpu']}, {r['machine']['nproc']} CPUs")
    return fig
