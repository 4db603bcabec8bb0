"""Unit tests for offloadd.admission: a submit's checks and its working directory."""
import os
import subprocess
import sys

import pytest
from offloadd import admission, limits, policy
from offloadd.config import ServeConfig

from offloadfs import protocol

NOBODY = 65534


def submit(**changes) -> protocol.Message:
    """A valid submit of ``true`` as nobody in /."""
    fields = dict(argv=[b"true"], cwd=b"/", uid=NOBODY, gid=NOBODY, groups=[], env={},
                  window=1 << 20) | changes
    return protocol.decode(protocol.encode("submit", "j", None, **fields))


def test_check_gives_the_commands_path_or_refuses():
    """An allowlisted command resolves; an unlisted one or root is refused, typed."""
    config = ServeConfig(commands={"true": "/bin/true"})
    allow = policy.Allowlist(config.commands)
    assert admission.check(config, submit(), allow, None, None, "h") == "/bin/true"
    with pytest.raises(policy.Refused):
        admission.check(config, submit(argv=[b"rm"]), allow, None, None, "h")
    with pytest.raises(policy.Refused) as exc:
        admission.check(config, submit(uid=0, gid=0), allow, None, None, "h")
    assert exc.value.kind == "root"


@pytest.mark.parametrize("data,ok", [
    ({}, True), ({"mode": "stage", "bytes": 10}, True),
    ({"mode": "stage", "bytes": limits.MAX_STAGE_BYTES + 1}, False),
    ({"mode": "stage", "bytes": True}, False),
    ({"mode": "nfs", "server": "nas:2049", "export": "/x"}, True),
    ({"mode": "nfs", "server": "-oremount:1", "export": "/x"}, False),
    ({"mode": "nfs", "server": "nas:2049", "export": "x"}, False),
    ({"mode": "nfs", "server": "nas:2049", "export": "/x", "nonce": 3}, False),
    ({"mode": "elsewhere"}, False),
])
def test_check_data(data, ok):
    """Known modes with fields of the right types pass; anything else is a field error."""
    if ok:
        admission.check_data(data)
    else:
        with pytest.raises(policy.Refused) as exc:
            admission.check_data(data)
        assert exc.value.kind == "field"


def test_admit_takes_from_the_budget_until_it_is_spent():
    """Each admitted job costs the peer; past the peer's job limit: busy, naming the host."""
    budget = limits.Budget(peer_jobs=1, peer_bytes=2**20, total_jobs=4, total_bytes=2**22)
    assert admission.admit(budget, b"p", submit(), "h") > 0
    with pytest.raises(policy.Refused) as exc:
        admission.admit(budget, b"p", submit(), "h")
    assert exc.value.kind == "busy" and str(exc.value).startswith("h: ")


def test_shared_cwd_maps_and_needs_a_directory(tmp_path):
    """The cwd through path_map; a missing one is refused."""
    config = ServeConfig(path_map={"/vm": str(tmp_path)})
    assert admission.shared_cwd(config, submit(cwd=b"/vm"), "h") == str(tmp_path)
    with pytest.raises(policy.Refused, match="no such directory on h"):
        admission.shared_cwd(config, submit(cwd=b"/vm/missing"), "h")


def test_nfs_cwd_needs_the_nonce_and_stays_in_the_export(tmp_path):
    """No nonce file: not the caller's tree; a symlink out: refused; else the path in it."""
    mnt = str(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink("/", tmp_path / "out")
    data = {"server": "nas:2049", "export": "/x", "nonce": "n1", "path": "sub"}
    with pytest.raises(policy.Refused, match="not the caller's tree"):
        admission.nfs_cwd(mnt, data, "h")
    (tmp_path / ".offloadfs").mkdir()
    (tmp_path / ".offloadfs" / "n1").write_text("")
    assert admission.nfs_cwd(mnt, data, "h") == os.path.join(mnt, "sub")
    with pytest.raises(policy.Refused, match="leaves the export"):
        admission.nfs_cwd(mnt, data | {"path": "out"}, "h")


WATCH = """
import os, subprocess, sys, tempfile
from offloadd import admission
from offloadfs import mountinfo
reads = []
real = mountinfo.offloadfs_mounts
mountinfo.offloadfs_mounts = lambda path=mountinfo.MOUNTINFO: reads.append(path) or real(path)
watch = admission.OffloadfsMounts()
watch.get(), watch.get(), watch.loops("/bin/true")
before = len(reads)
with tempfile.TemporaryDirectory() as where:
    subprocess.run(["mount", "-t", "tmpfs", "none", where], check=True)
    watch.get(), watch.get()
    subprocess.run(["umount", where], check=True)
watch.close()
print(before, len(reads))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a mount namespace of its own")
def test_the_mount_table_is_read_again_only_after_it_changed():
    """A submit's loop check reads the offloadfs mounts once, then again only when a mount
    came or went (the kernel's POLLPRI on /proc/self/mountinfo): in a mount namespace of
    its own, a tmpfs mounted makes one read more, not one per submit."""
    done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                           WATCH], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2"], done.stdout
