"""A real project's `configure && make -j2 && make check`: locally and through the shims.

The project is Debian's zlib (its upstream tarball, from ``apt-get source --download-only``
through a private deb-src list made from the archives this machine's apt uses, kept in ``CACHE``
and checked against the .dsc's SHA-256 each run). Each round builds a fresh copy of the same
tree, at the same path, three ways, interleaved (the order reversed every other round):

- **local**: the machine's PATH;
- **shim_cc**: the shims of an ``offloadfs mount`` of a real loopback ``offloadd`` allowing
  ``gcc`` and ``cc`` first on PATH: every compile and link of configure and of make is a job,
  as with distcc (``ar``, ``ranlib``, the tests and make itself stay local);
- **shim_make**: a mount of a daemon that also allows ``make``: configure's compiles are jobs
  one by one, and ``make -j2`` and ``make check`` are one job each, the whole build on the
  host (the host's PATH there: its compiles are the host's own, not jobs again).

Each phase (configure, make, check) is timed on its own; the sum is the build's time. Every
build must pass ``make check``, print the same test output and leave byte-identical objects
and libraries (zlib builds without debug information, so nothing in them names the path); the
mounts' counters give the jobs each build offloaded, and none may have failed or fallen back
to local. CPU seconds per build (the builds' own processes, the daemon's and its jobs', the
mount's) do not depend on the machine's load as much as wall time does. Every build, daemon
and mount runs in one cpu cgroup without a cap (see :func:`ways`: fairness under other load).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .common import (
    BenchError,
    CpuCgroup,
    Daemon,
    Shims,
    cpu_quota,
    cpu_seconds,
    daemon,
    machine_info,
    md_table,
    median,
    percentile,
    print_table,
    publish,
    pyplot,
    shims,
)

NAME = "build"
PACKAGE = "zlib"
CACHE = Path(os.environ.get("OFFLOADFS_BENCH_CACHE", "/var/cache/offloadfs-bench"))
ROUNDS, QUICK_ROUNDS = 5, 1
JOBS = 2
PHASES = (("configure", ["./configure"]), ("make", ["make", f"-j{JOBS}"]),
          ("check", ["make", "check"]))
COMPILERS = {"gcc": "/usr/bin/gcc", "cc": "/usr/bin/cc"}
CONFIGS = {"local": "local (the machine's PATH)",
           "shim_cc": "shims of gcc and cc first on PATH",
           "shim_make": "shims of gcc, cc and make first on PATH"}
DAEMON_COMMANDS = {"shim_cc": COMPILERS, "shim_make": {**COMPILERS, "make": "/usr/bin/make"}}
TARGET_RATIO = 1.2
BUILT = re.compile(r"\.(o|lo|a)$|\.so(\.[0-9.]+)?$")   # what must be byte-identical
TEST_OK = re.compile(r"\*\*\* zlib .*test OK \*\*\*")
APT_TIMEOUT = 300
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")
PACKAGES_URI = re.compile(r"^'(\S+)/dists/(\S+)/([^/\s]+)/binary-[^/\s]+/Packages",
                          re.MULTILINE)   # an archive's suite and component, from apt's URIs
PHASE_MARK = "=== bench build: "   # in a build's log, before each phase's output


# --- the source ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """An upstream tarball of a Debian source package, checked against its .dsc."""

    package: str
    version: str
    tarball: Path
    sha256: str
    how: str   # "cache" or "apt-get source"


def dsc_fields(text: str) -> tuple[str, dict[str, str]]:
    """The Version of a .dsc and its Checksums-Sha256 files ({name: sha256})."""
    version = re.search(r"^Version: (\S+)$", text, re.MULTILINE)
    files, in_sums = {}, False
    for line in text.splitlines():
        if line.startswith("Checksums-Sha256:"):
            in_sums = True
        elif in_sums and line.startswith(" "):
            sha, _, name = line.split()
            files[name] = sha
        else:
            in_sums = False
    if not version or not files:
        raise BenchError("the .dsc has no Version or no Checksums-Sha256")
    return version.group(1), files


def sha256(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_source(package: str, cache: Path) -> Source | None:
    """The newest ``package`` source in ``cache`` whose orig tarball matches its .dsc, or
    None."""
    for dsc in sorted(cache.glob(f"{package}_*.dsc"), reverse=True):
        version, files = dsc_fields(dsc.read_text(errors="replace"))
        for name, sha in files.items():
            tarball = cache / name
            if ".orig.tar." in name and tarball.exists() and sha256(tarball) == sha:
                return Source(package, version, tarball, sha, "cache")
    return None


def deb_src_lines() -> list[str]:
    """A deb-src line for each archive and component this machine's apt takes packages from
    (``apt-get update --print-uris``: it needs no package lists, as a fresh machine has
    none), in apt's order."""
    done = subprocess.run(["apt-get", "update", "--print-uris"], capture_output=True,
                          text=True, timeout=APT_TIMEOUT, check=False)
    entries = dict.fromkeys(f"deb-src {m[0]} {m[1]} {m[2]}"
                            for m in PACKAGES_URI.findall(done.stdout))
    if not entries:
        raise BenchError(f"apt lists no archive (apt-get update --print-uris): cannot get "
                         f"the source of {PACKAGE}")
    return list(entries)


def download_source(package: str, cache: Path) -> None:
    """``apt-get source --download-only package`` into ``cache``: through every archive at once
    (the newest version), else through each alone (an archive may have no sources, or a mirror
    may lack one archive's, as the security archive's here)."""
    lines = deb_src_lines()
    why = ""
    for archives in [lines, *([line] for line in lines)] if len(lines) > 1 else [lines]:
        try:
            apt_source(package, archives, cache)
            return
        except BenchError as exc:
            why = str(exc)
    raise BenchError(f"{why}\n(or put Debian's {package} .dsc and orig tarball in {cache})")


def apt_source(package: str, archives: list[str], cache: Path) -> None:
    """apt-get source --download-only through ``archives`` (deb-src lines), with a source list
    and package lists of its own (the machine's apt configuration is not touched); the files
    moved into ``cache``."""
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-apt-") as name:
        tmp = Path(name)
        (tmp / "lists" / "partial").mkdir(parents=True)
        (tmp / "cache" / "archives" / "partial").mkdir(parents=True)
        (tmp / "sources.list").write_text("\n".join(archives) + "\n")
        (tmp / "get").mkdir()
        opts = ["-o", f"Dir::Etc::SourceList={tmp / 'sources.list'}",
                "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State::Lists={tmp}/lists",
                "-o", f"Dir::Cache={tmp}/cache", "-o", "APT::Sandbox::User=root", "-q"]
        for step in (["update"], ["source", "--download-only", package]):
            done = subprocess.run(["apt-get", *opts, *step], cwd=tmp / "get", capture_output=True,
                                  text=True, timeout=APT_TIMEOUT, check=False)
            if done.returncode:
                errors = [x for x in done.stderr.splitlines() if x.startswith("E:")] or ["?"]
                raise BenchError(f"apt-get {' '.join(step)} via {'; '.join(archives)}: "
                                 + errors[0])
        cache.mkdir(parents=True, exist_ok=True)
        for f in (tmp / "get").iterdir():
            shutil.move(f, cache / f.name)


def source(package: str = PACKAGE, cache: Path = CACHE) -> Source:
    """The checked upstream tarball of ``package``: from the cache, else downloaded first."""
    if found := cached_source(package, cache):
        return found
    print(f"build: getting Debian's {package} source (apt-get source) into {cache} ...")
    download_source(package, cache)
    if found := cached_source(package, cache):
        return dataclasses.replace(found, how="apt-get source")
    raise BenchError(f"apt-get source {package} left no tarball matching its .dsc in {cache}")


def unpack(src: Source, where: Path) -> Path:
    """The tarball's one top directory, unpacked fresh at ``where`` (which is replaced)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    with tarfile.open(src.tarball) as tar:
        tar.extractall(where)   # a tarball checked against its .dsc
    tops = list(where.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise BenchError(f"{src.tarball.name} has no single top directory")
    return tops[0]


# --- one build -----------------------------------------------------------------------------

@dataclasses.dataclass
class Build:
    """One configure && make && make check: seconds per phase, CPU seconds, jobs per shim,
    the test output and the hashes of what it built."""

    phases_s: dict[str, float]
    cpu_s: float
    jobs: dict[str, int]
    tests: list[str]
    built: dict[str, str]

    @property
    def wall_s(self) -> float:
        """The whole build's time."""
        return sum(self.phases_s.values())


@dataclasses.dataclass
class Way:
    """How a build runs: its PATH, the cgroup its processes start in and, for a shim
    configuration, the daemon and mount whose CPU and counters it reads."""

    name: str
    env: dict[str, str]
    group: CpuCgroup
    d: Daemon | None = None
    m: Shims | None = None

    def counters(self) -> dict[str, dict]:
        """The mount's counts per shim ({} locally)."""
        return {n: self.m.stats(n) for n in DAEMON_COMMANDS[self.name]} if self.m else {}

    def server_cpu(self) -> float:
        """CPU seconds so far of the daemon (with its reaped jobs) and of the mount."""
        if not self.d:
            return 0.0
        return cpu_seconds(self.d.proc.pid) + cpu_seconds(self.m.proc.pid)


def children_cpu() -> float:
    """CPU seconds of this process's reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_phase(argv: list[str], tree: Path, env: dict[str, str], log) -> float:
    """One phase in ``tree``, its output appended to ``log``; its wall time in s. Fails on a
    non-zero exit with the log's tail."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode:
        log.flush()
        tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{' '.join(argv[4:])} exited {done.returncode}:\n{tail}")
    return elapsed


def build(way: Way, src: Source, where: Path) -> Build:
    """Unpack a fresh tree at ``where`` and build and check it the way ``way`` says."""
    tree = unpack(src, where)
    before = way.counters()
    cpu = children_cpu() + way.server_cpu()
    phases = {}
    with open(where.parent / f"{way.name}.log", "w") as log:
        for phase, argv in PHASES:
            log.write(f"{PHASE_MARK}{phase}\n")
            log.flush()
            phases[phase] = run_phase(way.group.wrap(argv), tree, way.env, log)
    cpu = children_cpu() + way.server_cpu() - cpu
    after = way.counters()
    text = Path(log.name).read_text(errors="replace")
    check_output = text.rsplit(f"{PHASE_MARK}check\n", 1)[1]
    return Build(phases, cpu, offloaded(before, after), test_lines(check_output),
                 built_hashes(tree))


def offloaded(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """Jobs per shim between two counter readings; a failure or a local fallback is an error
    (the build would measure the wrong thing with the same output)."""
    jobs = {}
    for shim, now in after.items():
        delta = {k: now[k] - before[shim][k] for k in ("jobs", "failures", "fallbacks")}
        if delta["failures"] or delta["fallbacks"]:
            raise BenchError(f"{shim} shim: {delta['failures']} failures and "
                             f"{delta['fallbacks']} local fallbacks in one build")
        jobs[shim] = delta["jobs"]
    return jobs


def test_lines(check_output: str) -> list[str]:
    """What ``make check`` printed, without make's own lines (which name directories)."""
    return [line for line in check_output.splitlines() if not line.startswith("make")]


def built_hashes(tree: Path) -> dict[str, str]:
    """SHA-256 of every object and library the build left, by path in the tree."""
    return {str(p.relative_to(tree)): sha256(p) for p in sorted(tree.rglob("*"))
            if p.is_file() and not p.is_symlink() and BUILT.search(p.name)}


# --- the rig and the rounds ----------------------------------------------------------------

@contextlib.contextmanager
def ways() -> Iterator[list[Way]]:
    """The local way and one daemon and mount per shim configuration, every process of them
    (and every build) in one uncapped cpu cgroup; all stopped on the way out.

    The cgroup is for fairness under other load: this kernel may schedule each session as a
    group (autogroup), and the daemon starts each job in a session of its own, so outside a
    cgroup each offloaded compile would get a whole group's share of the machine where a local
    build's compiles share one. Inside a cgroup no autogroup applies: every build's processes
    compete one by one, as on a machine of their own."""
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(cpu_quota(100 * len(os.sched_getaffinity(0))))
        out = [Way("local", dict(os.environ), group)]
        for name, commands in DAEMON_COMMANDS.items():
            d = stack.enter_context(daemon(commands, prefix=group.wrap([])))
            m = stack.enter_context(shims(d, list(commands), prefix=group.wrap([])))
            out.append(Way(name, m.env(d.client_env()), group, d, m))
        yield out


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("-n", "--rounds", type=int, help=f"builds of each configuration "
                        f"(default {ROUNDS}, --quick {QUICK_ROUNDS}), after one local warm-up")


def rounds(all_ways: list[Way], src: Source, n: int, where: Path) -> dict[str, list[Build]]:
    """A local warm-up build, then ``n`` rounds of one build per way, the order reversed every
    other round."""
    build(all_ways[0], src, where)
    builds: dict[str, list[Build]] = {w.name: [] for w in all_ways}
    for i in range(n):
        order = all_ways if i % 2 == 0 else all_ways[::-1]
        for way in order:
            b = build(way, src, where)
            builds[way.name].append(b)
            print(f"build: round {i + 1}/{n} {way.name}: {b.wall_s:.2f} s "
                  + " ".join(f"{k} {v:.2f}" for k, v in b.phases_s.items())
                  + (f"; jobs {b.jobs}" if b.jobs else ""), flush=True)
    return builds


def run(opts) -> dict:
    """Build, compare, print the table, write build.json and build.png."""
    n = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    src = source()
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"build: {PACKAGE} {src.version} ({src.tarball.name}, from the {src.how}); "
          f"{n} rounds of {len(CONFIGS)} builds after a local warm-up ...")
    with tempfile.TemporaryDirectory(prefix="offloadfs-bench-build-") as tmp, ways() as ws:
        builds = rounds(ws, src, n, Path(tmp).resolve() / "tree")
    result = results(src, builds)
    result["loadavg_start"] = load
    result["autogroup"] = autogroup()
    result["cgroup"] = CGROUP_NOTE
    report(result)
    publish(NAME, result, plot(result))
    return result


CGROUP_NOTE = ("every build, daemon and mount in one cpu cgroup without a cap: no autogroup "
               "inside it, so offloaded jobs (each in a session of its own) and local "
               "compiles compete alike with the machine's other load")


def autogroup() -> bool:
    """True if the kernel groups each session's processes for the scheduler (autogroup)."""
    with contextlib.suppress(OSError):
        return AUTOGROUP.read_text().strip() == "1"
    return False


def same(builds: dict[str, list[Build]], what: str) -> bool:
    """True if every build has the same ``what`` (tests or built) as the first local one."""
    first = getattr(builds["local"][0], what)
    return all(getattr(b, what) == first for bs in builds.values() for b in bs)


def results(src: Source, builds: dict[str, list[Build]]) -> dict:
    """The JSON record: per configuration p50 wall and CPU seconds, phases, ratio over local,
    jobs per build; the checks; the source."""
    local = builds["local"][0]
    if not same(builds, "built") or not same(builds, "tests"):
        diff = {name: sorted(k for k in set(local.built) | set(b.built)
                             if local.built.get(k) != b.built.get(k))
                for name, bs in builds.items() for b in bs[:1]}
        raise BenchError(f"the builds differ: tests the same: {same(builds, 'tests')}; "
                         f"objects that differ from the local build's: {diff}")
    out: dict = {"benchmark": NAME, "rounds": len(builds["local"]), "jobs": JOBS,
                 "commands": [" ".join(argv) for _, argv in PHASES], "labels": CONFIGS,
                 "source": {"package": src.package, "version": src.version,
                            "tarball": src.tarball.name, "sha256": src.sha256, "from": src.how},
                 "objects_identical": True, "tests_identical": True,
                 "objects_compared": len(local.built),
                 "tests_ok": sum(1 for line in local.tests if TEST_OK.search(line)),
                 "target_ratio": TARGET_RATIO}
    base = median([b.wall_s for b in builds["local"]])
    for name, bs in builds.items():
        walls = [b.wall_s for b in bs]
        out[f"{name}_p50_s"] = round(median(walls), 3)
        out[f"{name}_max_s"] = round(max(walls), 3)
        out[f"{name}_cpu_p50_s"] = round(median([b.cpu_s for b in bs]), 3)
        out[f"{name}_phases_p50_s"] = {p: round(median([b.phases_s[p] for b in bs]), 3)
                                       for p, _ in PHASES}
        out[f"{name}_jobs_per_build"] = bs[0].jobs
        if name != "local":
            ratio = median(walls) / base
            out[f"{name}_ratio_p50"] = round(ratio, 3)
            paired = [b.wall_s / a.wall_s for a, b in zip(builds["local"], bs, strict=True)]
            out[f"{name}_paired_ratio_p50"] = round(percentile(paired, 50), 3)
            out[f"{name}_met"] = ratio <= TARGET_RATIO
    out["samples_s"] = {name: [round(b.wall_s, 3) for b in bs] for name, bs in builds.items()}
    out["machine"] = machine_info()
    return out


# --- the report ----------------------------------------------------------------------------

TABLE_HEADERS = ["configuration", "what", "p50 s", "configure s", "make s", "check s",
                 "CPU s", "x local", "jobs per build"]


def table_rows(r: dict) -> list[list]:
    """One row per configuration."""
    rows = []
    for name, label in r["labels"].items():
        phases = r[f"{name}_phases_p50_s"]
        jobs = ", ".join(f"{k} {v}" for k, v in r[f"{name}_jobs_per_build"].items()) or "-"
        rows.append([name, label, r[f"{name}_p50_s"], phases["configure"], phases["make"],
                     phases["check"], r[f"{name}_cpu_p50_s"],
                     f"{r.get(f'{name}_ratio_p50', 1.0):.2f}x", jobs])
    return rows


def summary_lines(r: dict) -> list[str]:
    """The verdicts and the checks, one line each."""
    s = r["source"]
    lines = [f"{s['package']} {s['version']} (`{s['tarball']}`, Debian's source package, "
             f"from {'the bench cache' if s['from'] == 'cache' else 'apt-get source'}): "
             f"`{' && '.join(r['commands'])}`, {r['rounds']} rounds, interleaved"]
    for name in r["labels"]:
        if name != "local":
            lines.append(f"{name}: {r[f'{name}_ratio_p50']:.2f}x local at p50 (paired per "
                         f"round {r[f'{name}_paired_ratio_p50']:.2f}x), target at most "
                         f"{r['target_ratio']:g}x: {'met' if r[f'{name}_met'] else 'MISSED'}")
    lines.append(f"every build passed make check ({r['tests_ok']} zlib test OK lines, the same "
                 f"output) and left the same {r['objects_compared']} objects and libraries, "
                 "byte for byte; no job failed or fell back to local")
    return lines


def report(r: dict) -> None:
    """Print the table and the verdicts."""
    print()
    print_table(TABLE_HEADERS, table_rows(r))
    print()
    for line in summary_lines(r):
        print(line)


def markdown(r: dict) -> list[str]:
    """This benchmark's section of RESULTS.md."""
    return [md_table(TABLE_HEADERS, table_rows(r)), "",
            *[f"- {line}" for line in summary_lines(r)], "",
            "CPU s: the build's own processes, plus the daemon with its jobs and the mount's "
            "agent for a shim configuration (load does not change it as it does wall time). "
            "`shim_cc` offloads each compile and link (what distcc does); `shim_make` "
            "offloads configure's compiles and then `make` itself, so the build runs on the "
            "host as one job per make (docs/decisions.md, *Builds through the shims*).",
            "", f"Load average {' '.join(map(str, r.get('loadavg_start', [])))} at the start "
            f"and {' '.join(map(str, r['machine']['loadavg']))} at the end; "
            + (f"{r['cgroup']} (this kernel has autogroup on)." if r.get("autogroup")
               else f"{r.get('cgroup', 'no cgroup')}.")]


def plot(r: dict):
    """Stacked phases per configuration, each build's time as a dot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(r["labels"])
    colors = plt.cm.tab10.colors
    for x, name in enumerate(names):
        bottom = 0.0
        for i, (phase, seconds) in enumerate(r[f"{name}_phases_p50_s"].items()):
            ax.bar(x, seconds, bottom=bottom, width=0.5, color=colors[i], zorder=2,
                   label=phase if x == 0 else None)
            bottom += seconds
        samples = r["samples_s"][name]
        ax.scatter([x + 0.32] * len(samples), samples, color="k", s=12, zorder=3,
                   label="each build" if x == 0 else None)
        ax.annotate(f"{r[f'{name}_p50_s']:.1f} s\n{r.get(f'{name}_ratio_p50', 1.0):.2f}x",
                    (x, bottom), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize=9)
    ax.axhline(r["local_p50_s"] * r["target_ratio"], color="0.5", ls="--", zorder=1,
               label=f"target: {r['target_ratio']:g}x local")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("seconds (median phases)")
    ax.set_ylim(0, max(max(s) for s in r["samples_s"].values()) * 1.2)
    s = r["source"]
    ax.set_title(f"{s['package']} {s['version']}: configure && make -j{r['jobs']} && make check")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig
