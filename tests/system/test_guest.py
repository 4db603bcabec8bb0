"""A second kernel: the deployment's kernel NFS client and kernel nfsd, in a QEMU guest.

One guest (Debian bookworm's cloud kernel under TCG, ``tests/guest``) boots for the module; the
image is built on the first run and cached by its inputs. Each test is one scenario of
``scripts/vm check`` (tests/guest/scenarios.py says what each asserts): a user's unchanged
``convert`` through the shim gives the bytes of a local run, with the host's kernel NFS mount
(``[mounts] client = "kernel"``) and with the VM's kernel nfsd (``[export] backend =
"exportfs"``). At the end no QEMU is left and the guest's overlay is gone.
"""
from __future__ import annotations

import shutil

import pytest

from tests.guest import image, scenarios
from tests.guest.machine import GATEWAY

from ..harness import processes_in

pytestmark = [
    pytest.mark.skipif(not (shutil.which("qemu-system-x86_64") and shutil.which("mmdebstrap")
                            and shutil.which("socat")),
                       reason="QEMU, mmdebstrap or socat missing (make install adds them)"),
    pytest.mark.timeout(900),   # the first run builds the image (about 2 minutes)
]


@pytest.fixture(scope="module")
def guest():
    """One booted guest with the scenarios' forwards and its nfsd; stopped after the module."""
    with scenarios.booted(image.ensure(log=lambda line: None)) as (g, ports):
        yield g, ports
    assert g.proc.poll() is not None, "QEMU outlived the guest's stop"
    assert not g.dir.exists(), f"the guest's run directory {g.dir} is left"
    assert not processes_in(image.CACHE), "processes left in the guest's cache directory"


def test_host_kernel_nfs_client_runs_the_vm_job_on_its_export(guest, traversable):
    """The guest as compute host: its kernel mounts our ganesha export (advertised at the
    guestfwd address), reuses it, survives a ganesha restart, unmounts it idle, and refuses
    a job on a wrong export by the nonce."""
    g, ports = guest
    evidence = scenarios.kernel_nfs_client(g, ports, traversable)
    assert " type nfs4 " in evidence and "byte-identical" in evidence
    assert "(no nonce)" in evidence


def test_vm_kernel_nfsd_export_serves_the_host_job(guest, traversable):
    """The guest as VM: the shims in its kernel, its nfsd exporting /home to our userspace
    client; the offloaded output is the guest's own run's."""
    g, ports = guest
    evidence = scenarios.kernel_nfsd(g, ports, traversable)
    assert f"/home {GATEWAY}(" in evidence and "byte-identical" in evidence
    assert g.run(["exportfs", "-v"]).text.strip() == "", "the export outlived the mount"
