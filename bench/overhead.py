"""Per-job cost of a no-op, run locally, through offld and through a shim, with a real offloadd.

Every path in :func:`paths` runs the same no-op; the runs are interleaved (one of each path per
round) so that drift in the machine's load hits every path alike. The first path is the
baseline the others are compared with. ``offld -p`` also gives the stage breakdown. The shim
path runs ``MOUNTPOINT/true`` of an ``offloadfs mount`` of the same daemon, the file a PATH
lookup finds with the mount first on PATH; the mount's counters must show every run offloaded.
"""
from __future__ import annotations

import dataclasses

from offloadfs import protocol

from .common import (
    BenchError,
    Daemon,
    Shims,
    daemon,
    machine_info,
    median_by_key,
    parse_profile,
    print_table,
    publish,
    pyplot,
    shims,
    summary,
    timed_run,
    tool,
)

NAME = "overhead"
RUNS, QUICK_RUNS = 200, 30
WARMUP, QUICK_WARMUP = 5, 3
DAEMON_COMMANDS = {"true": "/bin/true"}
THESIS_BAND_MS = (50, 350)
STAGES = tuple(s for s in protocol.STAGES if s != "total")


@dataclasses.dataclass(frozen=True)
class NoopPath:
    """One way of running the no-op: a short name (the JSON key prefix), a label, a command."""

    name: str
    label: str
    argv: list[str]


def add_arguments(parser) -> None:
    """The options of this benchmark besides --quick."""
    parser.add_argument("-n", "--runs", type=int, help=f"runs per path (default {RUNS}, "
                        f"--quick {QUICK_RUNS})")


def paths(d: Daemon, m: Shims) -> list[NoopPath]:
    """The paths measured, baseline first; later ones (ssh, distcc) are added here."""
    return [
        NoopPath("local", "local /bin/true", ["/bin/true"]),
        NoopPath("offld", "offld -- true", [tool("offld"), "-p", "-H", d.host, "--", "true"]),
        NoopPath("shim", "shim MOUNTPOINT/true", [m.shim("true")]),
    ]


def run(opts) -> dict:
    """Measure, print the table, write overhead.json and overhead.png."""
    runs = opts.runs or (QUICK_RUNS if opts.quick else RUNS)
    warmup = QUICK_WARMUP if opts.quick else WARMUP
    with daemon(DAEMON_COMMANDS) as d, shims(d, list(DAEMON_COMMANDS)) as m:
        measured = paths(d, m)
        print(f"overhead: {runs} runs of each path after {warmup} warm-up, interleaved ...")
        samples, profiles = measure(measured, runs, warmup, d.client_env())
        shim_stats = offloaded(m, "true", warmup + runs)
    result = results(measured, samples, profiles, warmup)
    result["shim_stages_mean_ms"] = {k: shim_stats["mean_ms"][k] for k in STAGES
                                     if k in shim_stats["mean_ms"]}
    report(measured, result)
    publish(NAME, result, plot(result))
    return result


def measure(measured: list[NoopPath], runs: int, warmup: int, env: dict[str, str]):
    """Wall times (ms) per path and the ``-p`` stages of the runs that print them."""
    samples: dict[str, list[float]] = {p.name: [] for p in measured}
    profiles: dict[str, list[dict[str, float]]] = {p.name: [] for p in measured}
    for i in range(warmup + runs):
        for p in measured:
            ms, stderr = timed_run(p.argv, env)
            stages = parse_profile(stderr)
            if i >= warmup:
                samples[p.name].append(ms)
                profiles[p.name] += [stages] if stages else []
    return samples, profiles


def offloaded(m: Shims, name: str, expected: int) -> dict:
    """The mount's stats of shim ``name``, after checking that all ``expected`` runs went to
    the daemon (a local fallback would measure the wrong thing)."""
    stats = m.stats(name)
    if (stats["jobs"], stats["failures"], stats["fallbacks"]) != (expected, 0, 0):
        raise BenchError(f"{name} shim: expected {expected} offloaded jobs, the mount counted "
                         f"{stats}:\n{m.log_tail()}")
    return stats


def results(measured: list[NoopPath], samples: dict, profiles: dict, warmup: int) -> dict:
    """The JSON record: per-path p50/p99, overhead and ratio over the baseline, stages."""
    stats = {name: summary(s) for name, s in samples.items()}
    base = stats[measured[0].name]["p50"]
    out: dict = {"benchmark": NAME, "n": len(samples[measured[0].name]), "warmup": warmup,
                 "baseline": measured[0].name}
    for p in measured:
        out[f"{p.name}_p50_ms"] = round(stats[p.name]["p50"], 3)
        out[f"{p.name}_p99_ms"] = round(stats[p.name]["p99"], 3)
    for p in measured[1:]:
        out[f"{p.name}_overhead_p50_ms"] = round(stats[p.name]["p50"] - base, 3)
        out[f"{p.name}_ratio_p50"] = round(stats[p.name]["p50"] / base, 2)
    out["stages_ms"] = {k: round(v, 3) for k, v in median_by_key(profiles["offld"]).items()}
    out["offld_unprofiled_p50_ms"] = round(out["offld_p50_ms"] - out["stages_ms"]["total"], 3)
    out["commands"] = {p.name: p.argv for p in measured}
    out["labels"] = {p.name: p.label for p in measured}
    out["samples_ms"] = {k: [round(v, 3) for v in s] for k, s in samples.items()}
    out["machine"] = machine_info()
    return out


def report(measured: list[NoopPath], r: dict) -> None:
    """Print the per-path table and the stage breakdown."""
    rows = [[p.name, r[f"{p.name}_p50_ms"], r[f"{p.name}_p99_ms"],
             r.get(f"{p.name}_overhead_p50_ms", 0.0), r.get(f"{p.name}_ratio_p50", 1.0)]
            for p in measured]
    print()
    print_table(["path", "p50 ms", "p99 ms", f"p50 - {r['baseline']} ms", "x baseline"], rows)
    print(f"\noffld -p stages (median of {r['n']} runs):")
    stage_rows = [[k, v] for k, v in r["stages_ms"].items()]
    stage_rows.append(["outside -p (interpreter, imports, exit)", r["offld_unprofiled_p50_ms"]])
    print_table(["stage", "ms"], stage_rows)
    daemon_ms = sum(r["shim_stages_mean_ms"].values())
    print("\nshim: the daemon's stages (mean of the mount's jobs) "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in r["shim_stages_mean_ms"].items())
          + f"; the other {r['shim_p50_ms'] - daemon_ms:.1f} ms of its p50 are sh, FUSE, the "
          "mount's agent and the round trip")


def plot(r: dict):
    """Distributions per path (log scale) beside the stacked offld stage breakdown."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(3, 2))
    plot_distributions(left, r)
    plot_stages(right, r)
    fig.suptitle(f"Per-job overhead of a no-op ({r['n']} runs per path) — "
                 f"{r['machine']['cpu']}, {r['machine']['nproc']} CPUs")
    return fig


def thesis_band(ax) -> None:
    """Shade the thesis's reported overhead range on ``ax``."""
    ax.axhspan(*THESIS_BAND_MS, color="0.6", alpha=0.2, zorder=0,
               label=f"thesis overhead {THESIS_BAND_MS[0]}–{THESIS_BAND_MS[1]} ms")


def plot_distributions(ax, r: dict) -> None:
    """A box plot per path, with the median written beside each box."""
    names = list(r["samples_ms"])
    ax.boxplot([r["samples_ms"][n] for n in names], showfliers=True, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), [r["labels"][n] for n in names])
    for i, n in enumerate(names, start=1):
        ax.annotate(f"p50 {r[f'{n}_p50_ms']:.1f} ms\np99 {r[f'{n}_p99_ms']:.1f} ms",
                    (i + 0.3, r[f"{n}_p50_ms"]), va="center", fontsize=9)
    ax.set_xlim(0.5, len(names) + 0.95)   # room for the last box's label
    thesis_band(ax)
    ax.set_yscale("log")
    ax.set_ylabel("wall time per job (ms, log scale)")
    ax.set_title("wall time of the whole command")
    ax.legend(loc="upper left", fontsize=9)


def plot_stages(ax, r: dict) -> None:
    """One stacked bar: offld's median stages, topped by the time outside its -p total."""
    segments = [(k, r["stages_ms"].get(k, 0.0)) for k in STAGES]
    segments.append(("outside -p: interpreter,\nimports, exit", r["offld_unprofiled_p50_ms"]))
    bottom = 0.0
    for label, ms in segments:
        ax.bar([r["labels"]["offld"]], [ms], bottom=bottom, width=0.5, zorder=2,
               label=f"{label} {ms:.1f} ms")
        bottom += ms
    ax.annotate(f"-p total {r['stages_ms']['total']:.1f} ms", (0, r["stages_ms"]["total"]),
                xytext=(0, -14), textcoords="offset points", ha="center", color="white",
                fontsize=9)
    thesis_band(ax)
    ax.set_ylim(0, max(bottom, THESIS_BAND_MS[1]) * 1.1)
    ax.set_ylabel("median ms")
    ax.set_title(f"offld stages (p50 wall {r['offld_p50_ms']:.1f} ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="stage")
