"""The caller's files on the host through NFS: a real nfs-ganesha export from the VM side, and a
daemon in its own mount namespace where the caller's tree is hidden (only NFS reaches it)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest
import zmq

from offloadfs import protocol
from offloadfs.config import ClientConfig
from offloadfs.export import GaneshaExport

from ..harness import OFFLD, alive, convert_both_ways, free_port, test_user, wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/ganesha.nfsd"),
                                reason="nfs-ganesha is not installed (make install)")



@pytest.fixture
def vm(tmp_path):
    """The VM's exported tree, with a work directory world-writable for the test users."""
    root = tmp_path / "vmhome"
    (root / "work").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(root / "work", 0o777)
    return root


@pytest.fixture
def nfs_port():
    """The port the VM's NFS server listens on."""
    return free_port()


@pytest.fixture
def vm_config(tmp_path, vm, nfs_port):
    """The VM's config: export the tree with nfs-ganesha."""
    path = tmp_path / "vm.toml"
    path.write_text(f'[client]\nconnect_timeout = 5.0\n'
                    f'[export]\nbackend = "ganesha"\nroot = "{vm}"\n'
                    f'listen = "127.0.0.1:{nfs_port}"\n'
                    f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    return str(path)


@pytest.fixture
def host_config(tmp_path):
    """The host's config: userspace NFS mounts, idle ones unmounted after 2 s."""
    path = tmp_path / "host.toml"
    path.write_text(f'[mounts]\nclient = "userspace"\ndir = "{tmp_path}/hostmnt"\n'
                    f'idle_unmount = 2\n')
    return str(path)


@pytest.fixture
def host(start_daemon, host_config, vm):
    """A daemon that cannot see the VM's tree at all: a tmpfs hides it in its namespace."""
    return start_daemon("-c", host_config, marker=vm)


@pytest.fixture
def mount(start_mount, host, vm_config):
    """The VM's shim mount, which also runs the NFS export."""
    return start_mount(hosts=[host.hostport], config=vm_config, wait_for_shim="convert")


def run(mount, script: str, cwd, user: str | None = None, **kw):
    """A shell script with the shims first on PATH, as ``user`` if given (bounded)."""
    argv = ["/bin/sh", "-c", script]
    if user:   # runuser resets PATH: pass the shims' one on
        argv = ["runuser", "-u", user, "--", "env", f"PATH={mount.env()['PATH']}"] + argv
    return subprocess.run(argv, cwd=cwd, env=mount.env(), capture_output=True, timeout=120, **kw)


def test_convert_reads_and_writes_through_nfs(mount, vm):
    """The host sees only the NFS view, yet convert's output is byte-identical to local."""
    work = vm / "work"
    convert_both_ways(work, lambda line: run(mount, line, work), "600x400", "5", "0x2")
    where = run(mount, "sh -c 'cat /proc/self/mountinfo | grep -c offloadnfs'", work)
    assert int(where.stdout) >= 1   # the job's cwd was in the host's NFS mount


def test_files_created_on_the_host_belong_to_the_caller(mount, vm, traversable):
    """A job run by a user writes files owned by that user in the VM's tree."""
    user = test_user("offnfs1")
    got = run(mount, "sh -c 'echo mine > owned.txt; echo $OFFLOAD_SLOT'", vm / "work",
              user=user[0])
    assert got.returncode == 0 and got.stdout.strip().isdigit(), got   # it ran on the host
    st = os.stat(vm / "work" / "owned.txt")
    assert (st.st_uid, (vm / "work" / "owned.txt").read_text()) == (user[1], "mine\n")


def test_mkdir_rename_append_symlink_through_nfs(mount, vm):
    """What real commands do to a tree works through the host's NFS mount."""
    work = vm / "work"
    (work / "log.txt").write_text("one\n")
    script = ("mkdir -p a/b && echo x > a/b/f && mv a/b/f a/g && echo two >> log.txt && "
              "ln -s a/g link && cat link && rm -r a/b && truncate -s 3 log.txt")
    got = run(mount, f"sh -c '{script}'", work)
    assert got.returncode == 0, got.stderr
    assert got.stdout == b"x\n" and (work / "a" / "g").read_text() == "x\n"
    assert not (work / "a" / "b").exists() and os.readlink(work / "link") == "a/g"
    assert (work / "log.txt").read_text() == "one"


def test_a_200_mb_file_through_nfs(mount, vm):
    """200 MB written by the job on the host arrive intact in the VM's tree."""
    work = vm / "work"
    got = run(mount, "sh -c 'head -c 209715200 /dev/zero | tr \"\\0\" x > big; wc -c < big'",
              work)
    assert got.returncode == 0 and got.stdout.strip() == b"209715200", got.stderr
    assert hashlib.sha256((work / "big").read_bytes()).digest() == \
        hashlib.sha256(b"x" * 209715200).digest()


def test_two_jobs_at_once_share_one_mount_which_is_reused_then_unmounted(mount, host, vm):
    """Concurrent first jobs make one mount; a later job reuses it; idle, it goes away."""
    work = vm / "work"
    procs = [subprocess.Popen(["/bin/sh", "-c", f"sh -c 'sleep 0.5; echo {i} > j{i}'"],
                              cwd=work, env=mount.env()) for i in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert host.log().count("mounted ") == 1
    assert run(mount, "sh -c 'cat j0 j1'", work).stdout == b"0\n1\n"
    assert host.log().count("mounted ") == 1
    wait_for(lambda: "unmounting idle" in host.log(), 15, "the idle mount to go")


def test_a_stale_mount_is_remade(mount, host, vm):
    """The host's NFS client dies: the next job notices and mounts again."""
    work = vm / "work"
    assert run(mount, "sh -c 'echo first'", work).returncode == 0
    client = _nfs_client_pid(vm)
    os.kill(client, signal.SIGKILL)
    wait_for(lambda: not alive(client), 10, "the NFS client to die")
    got = run(mount, "sh -c 'echo again > again.txt'", work)
    assert got.returncode == 0, got.stderr
    assert (work / "again.txt").read_text() == "again\n"
    assert "went stale" in host.log()


def test_cwd_outside_the_export_runs_locally_or_fails_closed(mount, tmp_path):
    """Outside the exported tree: auto runs the command here, always refuses with one line."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    got = run(mount, "sh -c 'echo local'", outside)
    assert got.returncode == 0 and got.stdout == b"local\n"
    os.setxattr(mount.path / "sh", "user.offload.policy", b"always")
    got = run(mount, "sh -c 'echo never'", outside)
    assert got.returncode == 255 and b"outside the exported tree" in got.stderr


def _submit_raw(host, data: dict, script: bytes):
    """Submit ``sh -c script`` with the data descriptor ``data`` on a raw socket; the reply
    that ends it (exit or error)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(host.endpoint)
    sock.send_multipart(protocol.encode(
        "submit", "raw", argv=[b"sh", b"-c", script], cwd=b"/", uid=0, gid=0, groups=[],
        env={}, window=1 << 20, data=data))
    try:
        reply = None
        while reply is None or reply.kind not in ("exit", "error"):
            assert sock.poll(30000), "no reply"
            reply = protocol.decode(sock.recv_multipart())
    finally:
        sock.close()
        ctx.term()
    return reply


def test_a_job_without_the_vms_nonce_is_refused(host, vm, nfs_port, mount):
    """A mapping the host cannot prove (no nonce file in the mount) never runs the job."""
    data = {"mode": "nfs", "server": f"127.0.0.1:{nfs_port}", "export": str(vm), "path": "work",
            "nonce": "0" * 24}
    reply = _submit_raw(host, data, b"touch forged")
    assert reply.kind == "error" and "nonce" in reply["text"]
    assert not (vm / "work" / "forged").exists()


@pytest.mark.parametrize("path", ["..", "work/../..", "../elsewhere", "/tmp", "out",
                                  "work/out"])
def test_a_cwd_that_escapes_the_export_is_refused(host, vm, nfs_port, mount, tmp_path, path):
    """With the VM's real nonce in place, a cwd leaving the export by '..', an absolute path
    or a symlink (absolute, to a directory on the host, or relative) is refused, and the job
    never runs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (vm / ".offloadfs").mkdir(mode=0o755, exist_ok=True)
    (vm / ".offloadfs" / ("1" * 24)).touch()
    (vm / "out").symlink_to(outside)
    (vm / "work" / "out").symlink_to("../..")
    data = {"mode": "nfs", "server": f"127.0.0.1:{nfs_port}", "export": str(vm), "path": path,
            "nonce": "1" * 24}
    reply = _submit_raw(host, data, b"touch escaped")
    assert reply.kind == "error" and reply["kind"] == "cwd", reply
    assert not list(tmp_path.rglob("escaped"))
    good = _submit_raw(host, dict(data, path="work"), b"touch inside")
    assert good.kind == "exit" and good["status"] == 0, good
    assert (vm / "work" / "inside").exists()


def test_offld_alone_exports_for_one_job(host, vm, vm_config):
    """Without a mount, offld exports the tree for its job and stops the export after."""
    got = subprocess.run([OFFLD, "-c", vm_config, "-H", host.hostport, "--", "sh", "-c",
                          "echo via-nfs > o.txt"], cwd=vm / "work", capture_output=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    assert (vm / "work" / "o.txt").read_text() == "via-nfs\n"


def test_offld_alone_exports_for_one_job_beside_another_mount(host, vm, vm_config,
                                                               start_mount):
    """Another offloadfs mount (no export of this tree) does not stop offld alone from
    exporting the tree for its job; with the export up (the mount's), offld uses it."""
    start_mount(hosts=[host.hostport], wait_for_shim="sh")   # another user's, say: no export
    test_offld_alone_exports_for_one_job(host, vm, vm_config)
    export = GaneshaExport(ClientConfig.load(vm_config).export)
    export.start()
    try:
        assert export.serving()
        got = subprocess.run([OFFLD, "-d", "-c", vm_config, "-H", host.hostport, "--", "sh",
                              "-c", "echo again > o.txt"], cwd=vm / "work",
                             capture_output=True, timeout=120)
        assert got.returncode == 0 and b"exporting it for this job" not in got.stderr, \
            got.stderr
        assert (vm / "work" / "o.txt").read_text() == "again\n"
    finally:
        export.stop()


def _nfs_client_pid(vm) -> int:
    """The pid of the host's userspace NFS client process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if b"offloadd.nfs" in cmd and str(vm).encode() in cmd:
                return int(entry)
    pytest.fail("no NFS client process")
