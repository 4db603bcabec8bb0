"""The thesis's ImageMagick table: a slow VM alone, the VM offloading through the shim, native.

One generated JPEG (``plasma:fractal``, default 3000x3000; ``--size 10000`` is the thesis's
own) goes through the thesis's six jobs (blur 5x5, 10x10, 20x20; resize 5%, 10%, 20%), each
three ways, interleaved (one of each way per job per round):

- **VM**: Debian's ``/usr/bin/convert`` run locally inside a cgroup capped at ``--quota`` % of
  one CPU (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``, whichever the machine has), the
  thesis's CPU-capped VM;
- **offloaded**: the same VM (the caller *and* the ``offloadfs mount`` process, its agent, in
  that cgroup) running ``convert`` through the shim; ``offloadd``, outside the cgroup, runs it
  natively in the caller's directory (the same tree: shared mode);
- **native**: ``convert`` on the host directly, no cgroup.

Speed-up = VM / offloaded, efficiency = native / offloaded (1.0: offloading costs nothing);
medians over the rounds. Every output must be byte-identical across the three ways.
"""
from __future__ import annotations

import dataclasses
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from .common import (
    BenchError,
    CpuCgroup,
    cpu_quota,
    daemon,
    machine_info,
    md_table,
    percentile,
    print_table,
    publish,
    pyplot,
    shims,
    summary,
    timed_run,
)

NAME = "imagemagick"
CONVERT = "/usr/bin/convert"   # Debian's; /usr/local/bin/convert on these machines is a stand-in
IDENTIFY = "/usr/bin/identify"
SIZE, QUICK_SIZE = 3000, 1500
RUNS, QUICK_RUNS = 5, 2
QUOTA_PCT = 25.0
SEED = 7
WAYS = {"vm": "VM alone", "offloaded": "VM, offloaded (shim)", "native": "native on the host"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One of the thesis's jobs: a name, convert's operation, the thesis's seconds (10000x10000:
    VM alone, offloaded) and output."""

    name: str
    op: list[str]
    thesis_vm_s: float
    thesis_offloaded_s: float
    thesis_output: str

    @property
    def slug(self) -> str:
        """The job's name as a file name part."""
        return self.name.replace(" ", "-").replace("%", "pct")


JOBS = [
    Job("blur 5x5", ["-blur", "5x5"], 778.1, 5.8, "10000x10000, 6307 KB"),
    Job("blur 10x10", ["-blur", "10x10"], 810.3, 7.6, "10000x10000, 5219 KB"),
    Job("blur 20x20", ["-blur", "20x20"], 806.4, 11.1, "10000x10000, 4379 KB"),
    Job("resize 5%", ["-resize", "5%"], 28.6, 1.7, "500x500, 90 KB"),
    Job("resize 10%", ["-resize", "10%"], 26.1, 7.6, "1000x1000, 238 KB"),
    Job("resize 20%", ["-resize", "20%"], 37.7, 11.3, "2000x2000, 707 KB"),
]


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("--size", type=int, help=f"image width and height in pixels (default "
                        f"{SIZE}, --quick {QUICK_SIZE}; the thesis: 10000)")
    parser.add_argument("--quota", type=float, default=QUOTA_PCT,
                        help=f"the VM's CPU: %% of one CPU (default {QUOTA_PCT:g})")
    parser.add_argument("-n", "--runs", type=int, help=f"rounds (default {RUNS}, "
                        f"--quick {QUICK_RUNS})")


def run(opts) -> dict:
    """Measure, print the table, write imagemagick.json and imagemagick.png."""
    size = opts.size or (QUICK_SIZE if opts.quick else SIZE)
    runs = opts.runs or (QUICK_RUNS if opts.quick else RUNS)
    if not Path(CONVERT).exists():
        raise BenchError(f"{CONVERT} not found: install Debian's imagemagick (make install)")
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-im-") as name:
        work = Path(name)
        source = make_image(work, size)
        with cpu_quota(opts.quota) as vm, daemon({"convert": CONVERT}) as d, \
                shims(d, ["convert"]) as m:
            vm.add(m.proc.pid)   # the VM's agent is as slow as the VM
            argvs = ways(vm, m.shim("convert"))
            print(f"imagemagick: {size}x{size} image, {runs} round(s) of {len(JOBS)} jobs x "
                  f"{len(argvs)} ways; the VM: {vm.describe()} ...")
            samples, cpu = measure(argvs, source, work, runs, d.client_env())
            m.offloaded("convert", runs * len(JOBS))
            throttled = throttling(vm)
            quota = vm.describe()
        outputs = check_outputs(work)
        result = results(samples, cpu, outputs, size, runs, opts.quota, quota, throttled,
                         source)
    report(result)
    publish(NAME, result, plot(result))
    return result


def make_image(work: Path, size: int) -> Path:
    """A ``size`` x ``size`` JPEG of seeded plasma (the same pixels for the same size)."""
    path = work / f"input-{size}.jpg"
    started = time.perf_counter()
    subprocess.run([CONVERT, "-size", f"{size}x{size}", "-seed", str(SEED), "plasma:fractal",
                    "-quality", "92", str(path)], check=True, capture_output=True)
    print(f"imagemagick: generated {path.name} ({path.stat().st_size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.1f} s")
    return path


def ways(vm: CpuCgroup, shim: str) -> dict[str, list[str]]:
    """The command prefix of each way (convert's arguments follow)."""
    return {"vm": vm.wrap([CONVERT]), "offloaded": vm.wrap([shim]), "native": [CONVERT]}


def measure(argvs: dict[str, list[str]], source: Path, work: Path, runs: int,
            env: dict[str, str]) -> dict:
    """Seconds per job per way, one of each way per job per round."""
    samples = {j.name: {w: [] for w in argvs} for j in JOBS}
    cpu = {j.name: {w: [] for w in argvs} for j in JOBS}
    for n in range(runs):
        for job in JOBS:
            for way, prefix in argvs.items():
                out = work / f"{way}-{job.slug}.jpg"
                before = children_cpu()
                ms, _ = timed_run([*prefix, str(source), *job.op, str(out)], env)
                samples[job.name][way].append(ms / 1000)
                cpu[job.name][way].append(children_cpu() - before)
        print(f"imagemagick: round {n + 1}/{runs} done")
    return samples, cpu


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (a run's: the difference)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def throttling(vm: CpuCgroup) -> dict:
    """The cgroup's cpu.stat (periods throttled): proof the quota bit."""
    stat = {}
    for line in (vm.path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        stat[key] = int(value)
    return stat


def check_outputs(work: Path, ways=WAYS, jobs=JOBS) -> dict:
    """Per job: the output's geometry and size, and whether all ``ways`` (the three of this
    benchmark unless told) wrote the same bytes (else: the same pixels, by signature) in
    ``work/WAY-JOB.jpg``; a difference in pixels is an error."""
    out = {}
    for job in jobs:
        files = [work / f"{way}-{job.slug}.jpg" for way in ways]
        same_bytes = len({f.read_bytes() for f in files}) == 1
        signatures = {identify(f, "%#") for f in files}
        if len(signatures) != 1:
            raise BenchError(f"{job.name}: the {len(files)} ways wrote different pixels")
        out[job.name] = {"geometry": identify(files[0], "%wx%h"),
                         "kb": round(files[0].stat().st_size / 1024),
                         "identical": "bytes" if same_bytes else "pixels"}
    return out


def identify(path: Path, fmt: str) -> str:
    """``identify -format FMT`` of ``path``."""
    return subprocess.run([IDENTIFY, "-format", fmt, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def results(samples: dict, cpu: dict, outputs: dict, size: int, runs: int, quota: float,
            how: str, throttled: dict, source: Path) -> dict:
    """The JSON record: per job and way p50/p99 seconds and the CPU seconds of what ran here,
    speed-up and efficiency; how many CPUs native convert keeps busy, and the speed-up that
    allows at this quota."""
    jobs = {}
    for job in JOBS:
        row = {w: summary(s) for w, s in samples[job.name].items()}
        off = row["offloaded"]["p50"]
        jobs[job.name] = {
            **{f"{w}_p50_s": round(row[w]["p50"], 3) for w in WAYS},
            **{f"{w}_p99_s": round(row[w]["p99"], 3) for w in WAYS},
            **{f"{w}_cpu_s": round(percentile(cpu[job.name][w], 50), 3) for w in WAYS},
            "speedup": round(row["vm"]["p50"] / off, 2),
            "efficiency": round(row["native"]["p50"] / off, 3),
            "offload_added_s": round(off - row["native"]["p50"], 3),
            **outputs[job.name],
            "thesis": {"vm_s": job.thesis_vm_s, "offloaded_s": job.thesis_offloaded_s,
                       "speedup": round(job.thesis_vm_s / job.thesis_offloaded_s, 1),
                       "output": job.thesis_output},
        }
    speedups = [j["speedup"] for j in jobs.values()]
    efficiencies = [j["efficiency"] for j in jobs.values()]
    parallelism = percentile([c / t for j in JOBS for c, t in
                              zip(cpu[j.name]["native"], samples[j.name]["native"], strict=True)],
                             50)
    return {"benchmark": NAME, "size": size, "input_mb": round(source.stat().st_size / 1e6, 2),
            "runs": runs, "quota_pct": quota, "vm": how, "throttled": throttled,
            "jobs": jobs, "speedup_min": min(speedups), "speedup_max": max(speedups),
            "native_parallelism": round(parallelism, 2),
            "speedup_bound": round(parallelism * 100 / quota, 1),
            "efficiency_min": min(efficiencies),
            "efficiency_median": round(percentile(efficiencies, 50), 3),
            "samples_s": {j: {w: [round(v, 3) for v in s] for w, s in ways_.items()}
                          for j, ways_ in samples.items()},
            "machine": machine_info()}


TABLE_HEADERS = ["job", "output", "VM s", "offloaded s", "native s", "speed-up", "efficiency",
                 "same output", "thesis VM s", "thesis offl. s", "thesis speed-up"]


def table_rows(r: dict) -> list[list]:
    """One row per job, ours then the thesis's."""
    return [[name, f"{j['geometry']}, {j['kb']} KB", j["vm_p50_s"], j["offloaded_p50_s"],
             j["native_p50_s"], f"{j['speedup']:.1f}x", f"{j['efficiency']:.2f}",
             j["identical"], j["thesis"]["vm_s"], j["thesis"]["offloaded_s"],
             f"{j['thesis']['speedup']:.1f}x"] for name, j in r["jobs"].items()]


def p99_rows(r: dict) -> list[list]:
    """One row per job: the p99 of each way, and the CPU seconds spent here."""
    return [[name, j["vm_p99_s"], j["offloaded_p99_s"], j["native_p99_s"], j["vm_cpu_s"],
             j["offloaded_cpu_s"], j["native_cpu_s"]] for name, j in r["jobs"].items()]


def report(r: dict) -> None:
    """Print the table and the summary line."""
    print()
    print(f"{r['size']}x{r['size']} JPEG, median of {r['runs']} round(s); VM: {r['vm']}")
    print_table(TABLE_HEADERS, table_rows(r))
    print(f"\n{summary_line(r)}; throttled periods {r['throttled'].get('nr_throttled', '?')}")


def summary_line(r: dict) -> str:
    """Speed-up and efficiency ranges, and the bound the quota puts on the speed-up."""
    return (f"speed-up {r['speedup_min']:.1f}x to {r['speedup_max']:.1f}x (thesis: 3.4x to "
            f"134x at 10000x10000 on a 500 MHz-1 GHz VM); efficiency {r['efficiency_min']:.2f} "
            f"to 1 (median {r['efficiency_median']:.2f}); native convert keeps "
            f"{r['native_parallelism']:.2f} CPUs busy, so a VM at {r['quota_pct']:g}% of one "
            f"CPU can gain at most about {r['speedup_bound']:.1f}x")


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    return [f"A {r['size']}x{r['size']} JPEG ({r['input_mb']} MB, seeded plasma); median "
            f"seconds of {r['runs']} round(s), the three ways interleaved. The VM: {r['vm']}; "
            f"it was throttled in {r['throttled'].get('nr_throttled', '?')} periods. "
            "Speed-up = VM / offloaded; efficiency = native / offloaded. The thesis's columns "
            "are its 10000x10000 figures on a VM capped at 500 MHz-1 GHz of a 3.4 GHz i7.", "",
            md_table(TABLE_HEADERS, table_rows(r)), "",
            summary_line(r)[0].upper() + summary_line(r)[1:] + ". p99 seconds, and the CPU "
            "seconds spent on this side (the VM's convert; the offloaded way: the shim only):",
            "", md_table(["job", "VM p99", "offloaded p99", "native p99", "VM CPU s",
                          "offloaded CPU s (shim)", "native CPU s"], p99_rows(r))]


COLORS = {"vm": "tab:red", "offloaded": "tab:green", "native": "0.55"}


def plot(r: dict):
    """Grouped bars per job (log scale), speed-up and efficiency written above each group."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5.5))
    names = list(r["jobs"])
    width = 0.27
    for k, way in enumerate(WAYS):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax.bar(xs, [r["jobs"][n][f"{way}_p50_s"] for n in names], width, label=WAYS[way],
               color=COLORS[way], zorder=2)
    for i, n in enumerate(names):
        j = r["jobs"][n]
        ax.annotate(f"{j['speedup']:.1f}x\neff. {j['efficiency']:.2f}", (i - width, j["vm_p50_s"]),
                    xytext=(0, 3), textcoords="offset points", ha="left", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, log scale)")
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    ax.legend(loc="upper right")
    ax.set_title(f"ImageMagick convert on a {r['size']}x{r['size']} JPEG: VM at "
                 f"{r['quota_pct']:g}% of one CPU alone, offloaded, native — speed-up and "
                 f"efficiency above each job\n{r['machine']['cpu']}, {r['machine']['nproc']} CPUs",
                 fontsize=11)
    ax.set_ylim(top=max(j["vm_p50_s"] for j in r["jobs"].values()) * 3)
    return fig
