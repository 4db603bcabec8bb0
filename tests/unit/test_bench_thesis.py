"""bench/thesis.py's pure parts: the environments, the link's commands and tbf parameters, the
CPU cap's arithmetic, the split of an offloaded run and the tables."""
from __future__ import annotations

import re

import pytest

from bench import thesis
from bench.common import BenchError
from bench.imagemagick import JOBS
from bench.io import PATTERNS


def test_the_environments_are_the_thesis_s_table_5_2():
    """A-D: 500 MHz or 1 GHz, 100 Mbit/s or 1 Gbit/s, in that order."""
    assert [(e.name, e.mhz, e.mbit) for e in thesis.ENVS] == [
        ("A", 500, 100), ("B", 500, 1000), ("C", 1000, 100), ("D", 1000, 1000)]
    assert thesis.ENVS[1].label == "500 MHz, 1 Gbit/s"
    assert thesis.network(100) == "100 Mbit/s"


def test_envs_are_picked_by_letter_in_the_thesis_s_order():
    """Letters in any order and case, commas allowed; anything else is a one-line error."""
    assert [e.name for e in thesis.envs_of("da")] == ["A", "D"]
    assert [e.name for e in thesis.envs_of("B,C")] == ["B", "C"]
    for bad in ("", "AE", "A-B"):
        with pytest.raises(BenchError, match="--envs"):
            thesis.envs_of(bad)


def test_tbf_buckets_hold_a_gso_packet_and_a_millisecond():
    """64 KiB at 100 Mbit/s (1 ms would be only 12.5 KB), 1 ms (125 KB) at 1 Gbit/s; the
    queue holds 10 ms; a rate must be positive."""
    assert thesis.tbf_args(100) == ["tbf", "rate", "100mbit", "burst", "65536",
                                    "latency", "10ms"]
    assert thesis.tbf_args(1000)[3:5] == ["burst", "125000"]
    with pytest.raises(BenchError):
        thesis.tbf_args(0)


def test_the_link_s_names_fit_the_kernel_and_carry_the_run_s_tag():
    """Interface names are at most 15 characters even for the largest pid; the namespaces
    and interfaces are this run's own."""
    link = thesis.Link("4194304")
    assert [link.dev(r) for r in thesis.ROLES] == ["ofsv-4194304", "ofsh-4194304"]
    assert link.netns("vm") == "ofs-vm-4194304"
    assert link.enter("host") == ["nsenter", "--net=/run/netns/ofs-host-4194304", "--"]
    with pytest.raises(BenchError, match="longer than 15"):
        thesis.Link("12345678901").dev("vm")


def test_the_link_is_made_with_private_addresses_and_shaped_on_both_ends():
    """Both namespaces, one veth pair moved into them with the /30's two addresses, lo up in
    each, then a tbf on each end (replace: the same command reshapes it later)."""
    link = thesis.Link("77")
    argvs = link.setup_commands(100)
    assert argvs[:3] == [["ip", "netns", "add", "ofs-vm-77"], ["ip", "netns", "add", "ofs-host-77"],
                         ["ip", "link", "add", "ofsv-77", "type", "veth", "peer", "name",
                          "ofsh-77"]]
    assert ["ip", "-n", "ofs-vm-77", "addr", "add", "10.77.0.1/30", "dev", "ofsv-77"] in argvs
    assert ["ip", "-n", "ofs-host-77", "addr", "add", "10.77.0.2/30", "dev", "ofsh-77"] in argvs
    assert ["ip", "-n", "ofs-host-77", "link", "set", "lo", "up"] in argvs
    assert argvs[-2:] == link.shape_commands(100)
    assert link.shape_commands(1000)[1] == ["tc", "-n", "ofs-host-77", "qdisc", "replace", "dev",
                                            "ofsh-77", "root", *thesis.tbf_args(1000)]
    every_ip = [a for argv in argvs for a in argv if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", a)]
    assert {a.split("/")[0] for a in every_ip} <= set(thesis.ADDRESSES.values())


def test_the_quota_is_the_target_clock_over_this_core_s():
    """500 MHz of a 2 GHz core is 25% of one CPU; a VM faster than the core, or of no clock,
    cannot be made."""
    assert thesis.quota_pct(500, 2000) == 25.0
    assert thesis.quota_pct(1000, 2000) == 50.0
    for target in (2500, 0):
        with pytest.raises(BenchError):
            thesis.quota_pct(target, 2000)


def test_the_probe_s_reading_is_cycles_per_second():
    """The probe's line gives MHz per CPU second (the core) or per wall second (a capped
    process); its iteration count takes the asked time at that clock."""
    line = "1200000000 cycles in 0.600000 s wall, 0.500000 s cpu (1)\n"
    assert thesis.probe_mhz(line, "cpu") == pytest.approx(2400)
    assert thesis.probe_mhz(line, "wall") == pytest.approx(2000)
    for bad in ("", "12 cycles in 0.000000 s wall, 0.000000 s cpu (1)", "cycles"):
        with pytest.raises(BenchError, match="probe"):
            thesis.probe_mhz(bad, "wall")
    n = thesis.probe_iterations(500, 2.0)
    assert n * thesis.PROBE_CYCLES_PER_ITERATION / 500e6 == pytest.approx(2.0, rel=1e-6)


def test_cpuinfo_s_first_clock_is_read():
    """The first "cpu MHz" line; none is an error."""
    text = "processor\t: 0\ncpu MHz\t\t: 2000.000\ncpu MHz\t\t: 1800.5\n"
    assert thesis.cpuinfo_mhz(text) == 2000.0
    with pytest.raises(BenchError):
        thesis.cpuinfo_mhz("processor\t: 0\n")


def test_an_offloaded_run_splits_into_execution_and_overhead():
    """Execution is the host's run time; overhead the rest of the caller's wall time; a job
    that failed on the host cannot be split."""
    got = thesis.split(1.0, {"status": 0, "run": 0.8, "attach": 0.01, "queue": 0.001})
    assert got == {"total_s": 1.0, "execution_s": 0.8, "overhead_s": 0.2, "queue_s": 0.001,
                   "attach_s": 0.01, "drain_s": 0.0}
    for job in ({"status": 1, "run": 0.8}, {"status": 0}):
        with pytest.raises(BenchError, match="did not run"):
            thesis.split(1.0, job)


def test_every_way_has_its_own_output_prefix():
    """VM alone per CPU setting, offloaded per environment, native."""
    assert thesis.ways_of(thesis.ENVS) == ["vm500", "vm1000", "offloadedA", "offloadedB",
                                           "offloadedC", "offloadedD", "native"]
    assert thesis.ways_of(thesis.envs_of("C")) == ["vm1000", "offloadedC", "native"]


def fake_result(vm_s: float = 4.0, total_s: float = 1.0, run_s: float = 0.9) -> dict:
    """A result built from made-up samples: every job alike in every environment."""
    envs = thesis.ENVS
    rec = thesis.split(total_s, {"status": 0, "run": run_s})
    samples = {"vm": {str(m): {j.name: [vm_s, vm_s * 1.5, vm_s * 0.5] for j in JOBS}
                      for m in (500, 1000)},
               "offloaded": {e.name: {j.name: [rec] for j in JOBS} for e in envs},
               "native": {j.name: [0.5] for j in JOBS}}
    side = {"mb_per_s": 10.0, "clat_p99_ms": 2.0}
    fio = {e.name: {"results": {p: {"local": side, "nfs": side, "nfs_vs_local": 1.0}
                                for p in PATTERNS}} for e in envs}
    calibration = {"core_mhz": 2000, "cpuinfo_mhz": 2000.0, "cgroup": "cgroup v2 /x",
                   "settings": {str(m): {"target_mhz": m, "quota_pct": m / 20, "probe_mhz": m,
                                         "error_pct": 0.0} for m in (500, 1000)}}
    timeline = {"client": 1, "hello": 0.0, "submit": 0.01, "started": 0.02, "exit": 0.32,
                "connect_s": 0.01, "queue_s": 0.01, "run_s": 0.3, "positions": []}
    measured = {"calibration": calibration, "first_job": rec, "samples": samples, "fio": fio,
                "fio_where": {"local": {"fstype": "ext4"}, "nfs": {"source": "offloadnfs#x"}},
                "gpu": [timeline]}
    outputs = {j.name: {"geometry": "8x8", "kb": 1, "identical": "bytes"} for j in JOBS}
    s = {"envs": envs, "size": 64, "runs": 1, "fio_size": "1M", "fio_runtime": 1}
    return thesis.results(s, measured, {100: 95.0, 1000: 900.0}, outputs, 1000)


def test_the_tables_have_a_row_per_environment_and_per_job():
    """The summary's rows start with the environment's letter (what the acceptance check
    greps); medians, sums and speed-ups come from the samples; the thesis's figures beside."""
    r = fake_result()
    text = "\n".join(thesis.markdown(r))
    for env in "ABCD":
        assert re.search(rf"^\| *{env} *\|", text, re.MULTILINE), env
    a = r["environments"]["A"]
    assert a["vm_s"] == pytest.approx(4.0 * len(JOBS))
    assert (a["offloaded_s"], a["execution_s"]) == (pytest.approx(len(JOBS)),
                                                   pytest.approx(0.9 * len(JOBS)))
    assert a["speedup_min"] == a["speedup_max"] == a["speedup_total"] == 4.0
    assert a["cpu_ratio"] == 4.0 and r["environments"]["C"]["cpu_ratio"] == 2.0
    rows = thesis.job_rows(r)
    assert len(rows) == len(JOBS) * 4
    assert rows[0][:2] == [JOBS[0].name, "A"] and rows[0][-3:] == [778.1, 5.8, "134.2x"]
    assert thesis.summary_rows(r)[0][-2:] == ["3.4x-134x", "0.05-0.35"]


def test_outputs_that_differ_in_bytes_fail_the_run():
    """The same pixels in other bytes is not byte-identical: the run fails."""
    outputs = {j.name: {"geometry": "8x8", "kb": 1, "identical": "bytes"} for j in JOBS}
    outputs[JOBS[2].name]["identical"] = "pixels"
    with pytest.raises(BenchError, match=f"byte-identical.*{JOBS[2].name}"):
        thesis.results({"envs": thesis.ENVS}, {}, {}, outputs, 0)


def test_bad_options_are_one_line_errors():
    """A size below 16 px, no runs, or a size fio cannot take."""
    class Opts:
        quick, envs, size, runs, fio_size, fio_runtime = True, "AB", None, None, None, None
    assert thesis.settings(Opts)["size"] == 1500
    for name, value in (("size", 8), ("runs", -1), ("fio_size", "lots")):
        opts = type("Bad", (Opts,), {name: value})
        with pytest.raises(BenchError):
            thesis.settings(opts)
