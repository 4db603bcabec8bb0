"""1 GB through ``cat``, stdin to stdout: locally, over ssh, through offld and through the shim.

Each path reads the same file on stdin (written once, then read from the page cache) and
writes to a pipe this process drains and counts; a run is timed from the start of the command
to its exit with every byte counted. Paths are interleaved, one of each per round. Per run:
MB/s (10^6 bytes per second); the peak resident memory (VmHWM) of the daemon and of the
mount's agent (the ``offloadfs mount`` process, which holds the connection for the shims),
reset before each run with ``/proc/PID/clear_refs``, and of the client (``cat``, ``offld``,
``ssh``), read while it runs; the CPU seconds each process spent, which bound the rate on a
machine this small. ``--profile`` (the default of a full run when py-spy is in the venv)
records the daemon and the agent with py-spy (the samples holding the GIL: where the
interpreter spends CPU) during one more shim run and prints where their time goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import (
    RESULTS,
    BenchError,
    Daemon,
    Shims,
    cpu_seconds,
    daemon,
    machine_info,
    md_table,
    peak_rss_mb,
    percentile,
    print_table,
    publish,
    pyplot,
    reset_peak_rss,
    shims,
    sshd,
    start_py_spy,
    stop_py_spy,
    summarize_profile,
    system_cpu,
    tool,
)

NAME = "stream"
SIZE = 1_000_000_000
ROUNDS, QUICK_ROUNDS = 5, 1
# Issue 16: the shim and offld at 0.9x local cat's rate in the same run; issue 6's 100 MB.
TARGET_VS_LOCAL, TARGET_RSS_MB = 0.9, 100
DAEMON_COMMANDS = {"cat": "/bin/cat"}
CHUNK = 1 << 20
RSS_EVERY = 256   # reads of the client's output between looks at its peak RSS
RUN_DEADLINE = 300.0


@dataclasses.dataclass(frozen=True)
class StreamPath:
    """One way of running ``cat``: a short name, a label and the command."""

    name: str
    label: str
    argv: list[str]


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("--size", type=int, default=SIZE,
                        help=f"bytes through cat per run (default {SIZE:,})")
    parser.add_argument("--rounds", type=int, help=f"runs of each path (default {ROUNDS}, "
                        f"--quick {QUICK_ROUNDS})")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction,
                        help="py-spy the daemon and the agent during one more shim run "
                             "(bench/results/stream_profile_*.txt; default: without --quick, "
                             "if py-spy is in the venv)")


def paths(d: Daemon, m: Shims, ssh) -> list[StreamPath]:
    """The paths measured, local first (the baseline)."""
    return [
        StreamPath("local", "local cat", ["/bin/cat"]),
        StreamPath("shim", "shim MOUNTPOINT/cat", [m.shim("cat")]),
        StreamPath("offld", "offld -- cat", [tool("offld"), "-q", "-H", d.host, "--", "cat"]),
        StreamPath("ssh", "ssh 127.0.0.1 cat", ssh.argv(["cat"])),
    ]


def run(opts) -> dict:
    """Measure, print the table, write stream.json and stream.png."""
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-stream-") as tmp, \
            daemon(DAEMON_COMMANDS) as d, shims(d, list(DAEMON_COMMANDS)) as m, sshd() as ssh:
        source = make_input(Path(tmp) / "input", opts.size)
        measured = paths(d, m, ssh)
        print(f"stream: {opts.size / 1e9:g} GB through cat, {rounds} round(s) of "
              f"{len(measured)} paths, interleaved ...")
        runs = {p.name: [] for p in measured}
        for _ in range(rounds):
            for p in measured:
                runs[p.name].append(one_run(p, source, opts.size, d, m))
        profile = profiled(measured[1], source, opts.size, d, m) if want_profile(opts) else None
    result = results(measured, runs, opts.size, profile)
    report(result)
    publish(NAME, result, plot(result))
    return result


def make_input(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes, written out (not sparse: reading a hole costs the reader
    more CPU than reading the page cache) and left in the page cache."""
    block = bytes(CHUNK * 8)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(bytes(size % len(block)))
    with open(path, "rb") as f:   # read it once: every run then reads the page cache
        while f.read(len(block)):
            pass
    return path


def one_run(p: StreamPath, source: Path, size: int, d: Daemon, m: Shims) -> dict:
    """Run ``p`` once with ``source`` on stdin; its time, MB/s, memory and CPU."""
    for pid in (d.proc.pid, m.proc.pid):
        reset_peak_rss(pid)
    cpu0 = {"daemon": cpu_seconds(d.proc.pid), "agent": cpu_seconds(m.proc.pid),
            "daemon_own": cpu_seconds(d.proc.pid, children=False), "reader": own_cpu(),
            "machine": system_cpu()[0]}
    with open(source, "rb") as stdin:
        started = time.perf_counter()
        proc = subprocess.Popen(p.argv, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=d.client_env())
    got, client_rss = drain(proc)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0 or got != size:
        raise BenchError(f"{p.label}: exit {proc.returncode}, {got} of {size} bytes: "
                         f"{stderr.strip()}")
    return {"seconds": round(seconds, 4), "mb_per_s": round(size / 1e6 / seconds, 1),
            "client_rss_mb": round(client_rss, 1),
            "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "daemon_rss_mb": round(peak_rss_mb(d.proc.pid), 1),
            "agent_rss_mb": round(peak_rss_mb(m.proc.pid), 1),
            "daemon_cpu_s": round(cpu_seconds(d.proc.pid) - cpu0["daemon"], 3),
            "daemon_own_cpu_s": round(cpu_seconds(d.proc.pid, children=False)
                                      - cpu0["daemon_own"], 3),
            "agent_cpu_s": round(cpu_seconds(m.proc.pid) - cpu0["agent"], 3),
            "reader_cpu_s": round(own_cpu() - cpu0["reader"], 3),
            "machine_cpu_s": round(system_cpu()[0] - cpu0["machine"], 3)}


def own_cpu() -> float:
    """CPU seconds this process (the reader of the commands' stdout) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drain(proc: subprocess.Popen) -> tuple[int, float]:
    """Read ``proc``'s stdout to EOF; the number of bytes, and the peak RSS (MB) of ``proc``
    seen meanwhile (its VmHWM, read every few reads: its rusage would also count the memory of
    this process, which it was forked from)."""
    buf = bytearray(CHUNK)
    view, total, fd, peak, reads = memoryview(buf), 0, proc.stdout.fileno(), 0.0, 0
    deadline = time.monotonic() + RUN_DEADLINE
    while n := os.readv(fd, [view]):
        total += n
        reads += 1
        if reads % RSS_EVERY == 0:
            peak = max(peak, peak_rss_mb(proc.pid))
            if time.monotonic() > deadline:
                raise BenchError(f"no EOF after {RUN_DEADLINE:.0f} s")
    return total, max(peak, peak_rss_mb(proc.pid))


def want_profile(opts) -> bool:
    """--profile, or by default a full run's when py-spy is there."""
    if opts.profile is not None:
        return opts.profile
    return not opts.quick and (Path(sys.executable).parent / "py-spy").exists()


def profiled(p: StreamPath, source: Path, size: int, d: Daemon, m: Shims) -> dict:
    """One more run of ``p`` with py-spy on the daemon and the agent; where their time went."""
    out = {}
    spies = {who: start_py_spy(pid, RESULTS / f"stream_profile_{who}.txt", gil=True)
             for who, pid in (("daemon", d.proc.pid), ("agent", m.proc.pid))}
    try:
        out["run"] = one_run(p, source, size, d, m)
    finally:
        for spy in spies.values():
            stop_py_spy(spy)
    for who in spies:
        out[who] = summarize_profile(RESULTS / f"stream_profile_{who}.txt", top=12)
    return out


def results(measured: list[StreamPath], runs: dict, size: int, profile: dict | None) -> dict:
    """The JSON record: per path the median MB/s and the peak memory; the shim's as the
    headline keys (``mb_per_s``, ``agent_rss_mb``, ``daemon_rss_mb``)."""
    out: dict = {"benchmark": NAME, "bytes": size, "rounds": len(runs["local"]),
                 "targets": {"vs_local": TARGET_VS_LOCAL, "rss_mb": TARGET_RSS_MB}}
    local = median(runs["local"], "mb_per_s")
    for p in measured:
        r = runs[p.name]
        out[f"{p.name}_mb_per_s"] = median(r, "mb_per_s")
        out[f"{p.name}_min_mb_per_s"] = min(x["mb_per_s"] for x in r)
        out[f"{p.name}_seconds"] = median(r, "seconds")
        out[f"{p.name}_vs_local"] = round(out[f"{p.name}_mb_per_s"] / local, 3)
        out[f"{p.name}_client_rss_mb"] = max(x["client_rss_mb"] for x in r)
        out[f"{p.name}_client_cpu_s"] = median(r, "client_cpu_s")
        out[f"{p.name}_reader_cpu_s"] = median(r, "reader_cpu_s")
        if p.name in ("shim", "offld"):
            for key in ("daemon_rss_mb", "agent_rss_mb"):
                out[f"{p.name}_{key}"] = max(x[key] for x in r)
            for key in ("daemon_cpu_s", "daemon_own_cpu_s", "agent_cpu_s"):
                out[f"{p.name}_{key}"] = median(r, key)
    for p in measured:
        out[f"{p.name}_machine_cpu_s"] = median(runs[p.name], "machine_cpu_s")
        out[f"{p.name}_cpu_s_per_gb"] = round(path_cpu(out, p.name) / (size / 1e9), 2)
        out[f"{p.name}_busy_cpus"] = round(path_cpu(out, p.name) / out[f"{p.name}_seconds"], 2)
        out[f"{p.name}_others_cpus"] = round(max(out[f"{p.name}_machine_cpu_s"]
                                                 - path_cpu(out, p.name), 0)
                                             / out[f"{p.name}_seconds"], 2)
    out["nproc"] = len(os.sched_getaffinity(0))
    out["mb_per_s"] = out["shim_mb_per_s"]
    out["agent_rss_mb"] = out["shim_agent_rss_mb"]
    out["daemon_rss_mb"] = max(out["shim_daemon_rss_mb"], out["offld_daemon_rss_mb"])
    out["offld_rss_mb"] = out["offld_client_rss_mb"]
    out["labels"] = {p.name: p.label for p in measured}
    out["commands"] = {p.name: p.argv for p in measured}
    out["runs"] = runs
    if profile:
        out["profile"] = profile
    out["machine"] = machine_info()
    return out


def path_cpu(r: dict, name: str) -> float:
    """CPU seconds of everything a run of path ``name`` keeps busy: the client (not for the
    shim, whose sh only waits), the agent and the daemon with its cat where they take part,
    and this process reading the output."""
    parts = [r[f"{name}_reader_cpu_s"]]
    if name != "shim":
        parts.append(r[f"{name}_client_cpu_s"])
    if name == "shim":
        parts.append(r["shim_agent_cpu_s"])
    if name in ("shim", "offld"):
        parts.append(r[f"{name}_daemon_cpu_s"])
    return sum(parts)


def median(runs: list[dict], key: str) -> float:
    """The median of ``key`` over ``runs``."""
    return round(percentile([r[key] for r in runs], 50), 3)


TABLE_HEADERS = ["path", "MB/s (p50)", "slowest MB/s", "s per GB", "x local",
                 "client RSS MB", "client CPU s", "agent RSS MB", "daemon RSS MB",
                 "agent CPU s", "daemon CPU s"]


def table_rows(r: dict) -> list[list]:
    """One row per path (RSS and CPU of the daemon and agent only where they take part)."""
    rows = []
    for name in r["labels"]:
        part = name in ("shim", "offld")
        rows.append([r["labels"][name], r[f"{name}_mb_per_s"], r[f"{name}_min_mb_per_s"],
                     r[f"{name}_seconds"] / (r["bytes"] / 1e9), f"{r[f'{name}_vs_local']:.2f}x",
                     r[f"{name}_client_rss_mb"] if name != "shim" else "-",
                     r[f"{name}_client_cpu_s"] if name != "shim" else "-",
                     r[f"{name}_agent_rss_mb"] if name == "shim" else "-",
                     r[f"{name}_daemon_rss_mb"] if part else "-",
                     r[f"{name}_agent_cpu_s"] if name == "shim" else "-",
                     r[f"{name}_daemon_cpu_s"] if part else "-"])
    return rows


def target_rate(r: dict) -> float:
    """The rate the target asks of the shim and offld: TARGET_VS_LOCAL of local cat's, MB/s."""
    return TARGET_VS_LOCAL * r["local_mb_per_s"]


def verdict(r: dict) -> str:
    """The shim's figures against the targets, with by how much they miss."""
    rate, rss, goal = r["mb_per_s"], max(r["agent_rss_mb"], r["daemon_rss_mb"]), target_rate(r)
    parts = [f"{rate:.0f} MB/s through the shim, {rate / r['local_mb_per_s']:.2f}x local cat: "
             + ("target met" if rate >= goal else
                f"{goal - rate:.0f} MB/s ({100 * (1 - rate / goal):.0f}%) short of the target, "
                f"{TARGET_VS_LOCAL:g}x local cat ({goal:.0f} MB/s)"),
             f"peak RSS {rss:.0f} MB (agent {r['agent_rss_mb']:.0f}, daemon "
             f"{r['daemon_rss_mb']:.0f}): " + ("under" if rss < TARGET_RSS_MB else "OVER")
             + f" the {TARGET_RSS_MB} MB target"]
    return "; ".join(parts) + ". " + cpu_bound(r)


def cpu_bound(r: dict) -> str:
    """Why the shim's rate is what it is: the CPU it takes per GB against the CPUs there are."""
    per_gb, n = r["shim_cpu_s_per_gb"], r["nproc"]
    gb = r["bytes"] / 1e9
    job = r["shim_daemon_cpu_s"] - r["shim_daemon_own_cpu_s"]
    busy = r["shim_busy_cpus"] + r["shim_others_cpus"]
    return (f"Through the shim a GB costs {per_gb:.2f} CPU-seconds (the agent "
            f"{r['shim_agent_cpu_s'] / gb:.2f}, the daemon {r['shim_daemon_own_cpu_s'] / gb:.2f}"
            f", its cat {job / gb:.2f}, this reader {r['shim_reader_cpu_s'] / gb:.2f}), so "
            f"{n} CPUs allow at most "
            f"{n / per_gb * 1000:.0f} MB/s even if every process ran in parallel all the time; "
            f"{target_rate(r):.0f} MB/s needs at most {n / (target_rate(r) / 1000):.1f} "
            f"CPU-seconds per GB on {n} CPUs (local cat: {r['local_cpu_s_per_gb']:.2f}, offld: "
            f"{r['offld_cpu_s_per_gb']:.2f}, ssh: {r['ssh_cpu_s_per_gb']:.2f} without sshd's). "
            f"During the shim's runs its processes kept {r['shim_busy_cpus']:.2f} of the {n} "
            f"CPUs busy and the rest of the machine {r['shim_others_cpus']:.2f}: "
            f"{100 * busy / n:.0f}% of the machine"
            + (", so CPU is what bounds the rate" if busy > n * 0.9 else
               "; the rest of the time the stages waited on each other (a chunk crosses cat, "
               "the daemon, ZeroMQ, the agent and a pipe in turn)"))


def report(r: dict) -> None:
    """Print the table, the verdict and the profile summary."""
    print()
    print_table(TABLE_HEADERS, table_rows(r))
    print(f"\n{verdict(r)}")
    for who, summary in (r.get("profile") or {}).items():
        if who != "run":
            print(f"\npy-spy, {who} ({summary['samples']} samples holding the GIL): share "
                  "of samples in function (incl. callees) / own")
            print_table(["function", "% incl", "% own"], summary["functions"])


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    lines = [md_table(TABLE_HEADERS, table_rows(r)), "",
             f"{r['bytes'] / 1e9:g} GB per run from a file in the page cache on stdin to a pipe "
             f"this process drains; median of {r['rounds']} run(s) per path, interleaved. "
             f"CPU: seconds per run. {verdict(r)}."]
    for who, summary in (r.get("profile") or {}).items():
        if who != "run":
            lines += ["", f"py-spy of the {who} during one more shim run, samples holding the "
                      f"GIL ({summary['samples']} at 200 Hz; % of them in the function with "
                      "what it calls / in itself):", "",
                      md_table(["function", "% incl", "% own"], summary["functions"])]
    return lines


def plot(r: dict):
    """MB/s per path, CPU seconds per GB by process, and the peak memory."""
    plt = pyplot()
    fig, (rate, cpu, mem) = plt.subplots(1, 3, figsize=(17, 4.8), width_ratios=(3, 3, 2))
    plot_rates(rate, r)
    plot_cpu(cpu, r)
    plot_memory(mem, r)
    fig.suptitle(f"Streaming {r['bytes'] / 1e9:g} GB through cat — {r['machine']['cpu']}, "
                 f"{r['machine']['nproc']} CPUs")
    return fig


def plot_rates(ax, r: dict) -> None:
    """A bar per path: median MB/s and its ratio to local cat."""
    names = list(r["labels"])
    bars = ax.bar(range(len(names)), [r[f"{n}_mb_per_s"] for n in names], width=0.55,
                  color=["0.6", "tab:green", "tab:blue", "tab:red"][:len(names)], zorder=2)
    for bar, n in zip(bars, names, strict=True):
        ax.annotate(f"{r[f'{n}_mb_per_s']:.0f} MB/s\n{r[f'{n}_vs_local']:.2f}x local",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=9)
    ax.axhline(target_rate(r), color="tab:orange", linestyle="--",
               label=f"target {TARGET_VS_LOCAL:g}x local cat ({target_rate(r):.0f} MB/s)")
    ax.set_xticks(range(len(names)), [r["labels"][n] for n in names], fontsize=9)
    ax.set_ylim(0, max(target_rate(r), *(r[f"{n}_mb_per_s"] for n in names)) * 1.2)
    ax.set_ylabel("MB/s (median)")
    ax.set_title("throughput, stdin to stdout")
    ax.legend(fontsize=9, loc="upper right")


def plot_cpu(ax, r: dict) -> None:
    """Stacked CPU seconds per GB of each process taking part, per path."""
    gb = r["bytes"] / 1e9
    names = list(r["labels"])
    parts = {"client (cat, offld, ssh)": [0.0 if n == "shim" else r[f"{n}_client_cpu_s"] / gb
                                          for n in names],
             "mount's agent": [r["shim_agent_cpu_s"] / gb if n == "shim" else 0.0
                               for n in names],
             "daemon with its cat": [r[f"{n}_daemon_cpu_s"] / gb if n in ("shim", "offld")
                                     else 0.0 for n in names],
             "this reader": [r[f"{n}_reader_cpu_s"] / gb for n in names]}
    bottom = [0.0] * len(names)
    for label, values in parts.items():
        ax.bar(range(len(names)), values, bottom=bottom, width=0.55, label=label, zorder=2)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(names)), [r["labels"][n] for n in names], fontsize=9)
    ax.set_ylabel("CPU seconds per GB")
    ax.set_title(f"CPU spent per GB ({r['nproc']} CPUs shared by all of it; ssh: not sshd's)")
    ax.legend(fontsize=8, loc="upper left")


def plot_memory(ax, r: dict) -> None:
    """Peak RSS of the agent, the daemon, offld and the ssh client."""
    memory = {"agent (mount)": r["shim_agent_rss_mb"], "daemon": r["daemon_rss_mb"],
              "offld": r["offld_rss_mb"], "ssh client": r["ssh_client_rss_mb"]}
    ax.bar(range(len(memory)), list(memory.values()), width=0.55, color="tab:purple", zorder=2)
    ax.set_xticks(range(len(memory)), list(memory), fontsize=8)
    for i, v in enumerate(memory.values()):
        ax.annotate(f"{v:.0f} MB", (i, v), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=9)
    ax.axhline(TARGET_RSS_MB, color="tab:orange", linestyle="--",
               label=f"target {TARGET_RSS_MB} MB")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("peak memory during the runs")
    ax.legend(fontsize=9)
