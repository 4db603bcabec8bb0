"""bench thesis's rig for real: two network namespaces joined by a tbf-shaped veth pair, the
VM (a capped cgroup, the shim mount, nfs-ganesha) in one and the host (offloadd, userspace NFS)
in the other; a convert through the shim across the link, then nothing left behind."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import thesis

from ..harness import CONVERT, convert_both_ways, mounts_under

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/ganesha.nfsd")
    or not all(shutil.which(t) for t in thesis.TOOLS),
    reason="needs root, nfs-ganesha, nsenter, ip, tc and cc (make install, make bench)")


def netns_inode(pid: int) -> int:
    """The inode of process ``pid``'s network namespace."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def port(tmp: Path) -> str:
    """The port of the VM's NFS server, from the config bench.io wrote under ``tmp``."""
    return re.search(r'listen = "[0-9.]+:(\d+)"', (tmp / "vm.toml").read_text()).group(1)


def test_a_convert_through_the_shim_crosses_the_shaped_link(tmp_path):
    """The link carries about its rate; the VM's processes are in its namespace and cgroup,
    the daemon in the host's; the clock probe in the capped cgroup reads about its target;
    the job's output is byte-identical to a local run and came over the host's NFS mount of
    the VM's export; and the teardown leaves no namespace, interface, process, mount or
    cgroup."""
    link = thesis.Link(f"t{os.getpid()}")
    root = tmp_path / "vm"
    work = root / "work"
    work.mkdir(parents=True)
    with thesis.shaped_link(link, 100):
        assert 70 < thesis.link_rate(link, 100) < 105
        with thesis.testbed(link, tmp_path, root, {"convert": CONVERT}) as bed:
            cgroup = bed.vm.path
            inodes = {r: os.stat(link.path(r)).st_ino for r in thesis.ROLES}
            assert netns_inode(bed.mount.proc.pid) == inodes["vm"]
            assert netns_inode(bed.daemon.proc.pid) == inodes["host"]
            assert bed.mount.proc.pid in bed.vm.pids()
            calibration = thesis.calibrate(bed.vm, thesis.build_probe(tmp_path), [1000])
            assert abs(calibration["settings"]["1000"]["error_pct"]) < 25, calibration

            def remote(line: str) -> subprocess.CompletedProcess:
                """The shell line run in the VM, the shims first on its PATH."""
                return subprocess.run(bed.vm_argv(["/bin/sh", "-c", line]), cwd=work,
                                      env=bed.mount.env(bed.daemon.client_env()),
                                      capture_output=True, text=True, timeout=60)

            convert_both_ways(work, remote, "96x96", "5", "3x3")
            job = bed.mount.last_job()
            assert job["status"] == 0 and job["run"] > 0, job
            (nfs,) = mounts_under(tmp_path / "hostmnt")   # the host's mount of the export
            source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", nfs], capture_output=True,
                                    text=True, check=True).stdout.strip()
            assert source == f"offloadnfs#{thesis.ADDRESSES['vm']}:{port(tmp_path)}:{root}"
    assert thesis.leftovers(link, tmp_path, cgroup) == []
