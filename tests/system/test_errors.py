"""Errors an operator or user can cause end in one line of ours and a non-zero exit: hosts that
cannot be resolved or reached, no host configured, status of a dead daemon, umount and mount
refusals, typos in config files (issue 15).

Unreachable addresses and name lookups are made in a network namespace each test creates (only
its own loopback; /etc/netns/NAME gives it its own resolver files) and deletes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from ..harness import OFFLD, OFFLOADD, OFFLOADFS, free_port, mounted, test_user

REFUSED = "connection refused (is offloadd running there, on that port?)"
NEVER = "; the job never ran"
DEFAULT_CONFIG = "/etc/offloadfs/offloadfs.toml"


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a program of ours, its output as text (bounded: nothing here waits long)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)


def one_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a run that exited with ``status``."""
    assert done.returncode == status, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.rstrip("\n")


@contextlib.contextmanager
def netns(routes: list[list[str]] = (), resolver: dict[str, str] | None = None):
    """A network namespace of our own: loopback up, ``routes`` added, ``resolver`` files
    (name: text) in /etc/netns/NAME; deleted at the end. Yields the argv prefix to run in it."""
    name = f"offerr-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    etc = Path("/etc/netns") / name
    made_parent = not etc.parent.exists()
    try:
        inside = ["ip", "netns", "exec", name]
        subprocess.run(inside + ["ip", "link", "set", "lo", "up"], check=True)
        for route in routes:
            subprocess.run(inside + ["ip", "route", "add", *route], check=True)
        for file, text in (resolver or {}).items():
            etc.mkdir(parents=True, exist_ok=True)
            (etc / file).write_text(text)
        yield inside
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                etc.parent.rmdir()
        subprocess.run(["ip", "netns", "del", name], check=True)


# --- hosts that cannot be resolved or reached ----------------------------------------------------

@pytest.mark.parametrize("nsswitch, resolv, said", [
    ("hosts: files\n", "", "Name or service not known (check the name, or give an address)"),
    ("hosts: files dns\n", "nameserver 127.0.0.1\n", "Temporary failure in name resolution (no "
     "name server answered: check /etc/resolv.conf and the network, or give an address)"),
], ids=["no-such-name", "no-name-server"])
def test_an_unresolvable_host_is_named_as_such(nsswitch, resolv, said, work):
    """Not "connection refused": the name, that it does not resolve, and what to check."""
    files = {"nsswitch.conf": nsswitch, "resolv.conf": resolv}
    with netns(resolver=files) as inside:
        done = run(inside + [OFFLD, "-H", "nosuchhost.invalid:7788", "--", "true"], cwd=work)
    assert one_line(done, 255) == (f"offld: nosuchhost.invalid:7788 (from -H): cannot resolve "
                                   f"host 'nosuchhost.invalid': {said}{NEVER}")


@pytest.mark.parametrize("route, said", [
    ([], "network is unreachable (check the address, and this machine's routes)"),
    (["unreachable", "10.97.0.0/16"], "no route to host (is it up, and is the address right?)"),
    (["blackhole", "10.97.0.0/16"], "no way to that address from here (a blackhole route? "
     "check the address)"),
], ids=["no-route", "unreachable-route", "blackhole"])
def test_an_unreachable_address_says_why(route, said, work):
    """No route, an unreachable or a blackhole route: the kernel's reason, quickly, never
    "requires CURVE keys"."""
    with netns([route] if route else []) as inside:
        done = run(inside + [OFFLD, "-H", "10.97.0.1:7788", "--", "true"], cwd=work)
    assert one_line(done, 255) == f"offld: 10.97.0.1:7788 (from -H): {said}{NEVER}"


def test_a_peer_that_drops_the_connection_is_not_called_a_keyed_host(work):
    """Something that accepts and closes (a proxy, a firewall, another service): said so, not
    "the host requires CURVE keys"."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        proc = subprocess.Popen([OFFLD, "-H", f"127.0.0.1:{port}", "--", "true"], cwd=work,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                listener.accept()[0].close()
        stderr = proc.stderr.read()
        proc.stderr.close()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert one_line(done, 255) == (
        f"offld: 127.0.0.1:{port} (from -H): the connection closed during the ZeroMQ "
        f"handshake, and the peer sends no ZeroMQ greeting (is that offloadd's port? a proxy "
        f"or firewall in the way?){NEVER}")


def test_no_host_configured_points_at_h_and_the_config_file(work):
    """No -H and no config: the default host, and how to name another."""
    if os.path.exists(DEFAULT_CONFIG):
        pytest.skip(f"{DEFAULT_CONFIG} exists here")
    env = {k: v for k, v in os.environ.items() if k != "OFFLOADFS_CONFIG"}
    with netns() as inside:    # nothing listens on its 127.0.0.1:7788
        done = run(inside + [OFFLD, "--", "true"], cwd=work, env=env)
    assert one_line(done, 255) == (
        f"offld: 127.0.0.1:7788 (the default; name a host with -H or [client] hosts in "
        f"{DEFAULT_CONFIG}): {REFUSED}{NEVER}")


def test_a_configured_host_names_its_file(tmp_path, work):
    """A host from the config file: the file is named, so the user knows what to edit."""
    port = free_port()
    config = tmp_path / "vm.toml"
    config.write_text(f'[client]\nhosts = ["127.0.0.1:{port}"]\n')
    done = run([OFFLD, "-c", str(config), "--", "true"], cwd=work)
    assert one_line(done, 255) == f"offld: 127.0.0.1:{port} (from {config}): {REFUSED}{NEVER}"


def test_status_of_a_dead_daemon_names_it_once(work):
    """offloadd status: the endpoint once, on stderr, exit 1; no "the job never ran"."""
    port = free_port()
    done = run([OFFLOADD, "status", "-H", f"127.0.0.1:{port}"], cwd=work)
    assert one_line(done, 1) == f"offloadd status: 127.0.0.1:{port}: {REFUSED}"
    assert done.stdout == ""


# --- umount and mount ------------------------------------------------------------------------

def test_umount_of_a_directory_that_is_not_mounted(tmp_path):
    """Our words, not fusermount's."""
    done = run([OFFLOADFS, "umount", str(tmp_path)])
    assert one_line(done, 2) == f"offloadfs: {tmp_path} is not an offloadfs mount"


def test_umount_by_another_user_is_refused_in_our_words(start_mount, traversable):
    """A user who did not mount it is told who did; the mount stays."""
    mnt = start_mount()
    user, uid = test_user("offerr1")
    done = run([OFFLOADFS, "umount", str(mnt.path)], user=uid, group=uid, extra_groups=[],
               cwd="/")
    assert one_line(done, 2) == (f"offloadfs: cannot unmount {mnt.path}: uid 0 mounted it; "
                                 f"only that user or root may unmount it")
    assert mounted(mnt.path)


def in_mount_ns(script: str, *argv: str, user: int | None = None) -> subprocess.CompletedProcess:
    """``argv`` after the shell ``script`` ran in a private mount namespace (as ``user``)."""
    become = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] \
        if user is not None else []
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'{script} && exec "$@"', "sh", *become, *argv])


def test_mount_without_dev_fuse_is_one_line(tmp_path):
    """No /dev/fuse (no module, a container without the device): the fix, not a traceback."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bare_dev = "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && " \
        "mknod -m 666 /dev/urandom c 1 9"     # what the programs need, but no fuse
    done = in_mount_ns(bare_dev, OFFLOADFS, "mount", str(mnt), "-f")
    assert one_line(done, 2) == ("offloadfs: cannot open /dev/fuse: No such file or directory "
                                 "(load the fuse module: modprobe fuse; in a container, pass "
                                 "the device in)")


def test_mount_by_a_user_who_cannot_open_dev_fuse(tmp_path, traversable):
    """/dev/fuse closed to the user (0600 root): one line saying so and what to do."""
    mnt, closed = tmp_path / "mnt", tmp_path / "fuse-0600"
    mnt.mkdir()
    mnt.chmod(0o777)
    closed.write_text("")
    closed.chmod(0o600)
    uid = test_user("offerr1")[1]
    done = in_mount_ns(f"mount --bind {closed} /dev/fuse", OFFLOADFS, "mount", str(mnt), "-f",
                       user=uid)
    assert one_line(done, 2) == ("offloadfs: cannot open /dev/fuse: Permission denied (mount "
                                 "as root, or let this user open it: chmod 0666 /dev/fuse)")
    assert not mounted(mnt)


def test_mount_on_a_missing_directory(tmp_path):
    """A mount point that does not exist: said before libfuse is asked."""
    done = run([OFFLOADFS, "mount", str(tmp_path / "absent"), "-f"])
    assert one_line(done, 2) == f"offloadfs: {tmp_path / 'absent'}: no such directory (create " \
                                "it first)"


# --- config typos ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ('[client]\nhost = ["10.0.0.1"]\n', "2: unknown key 'host' in [client] (did you mean "
     "'hosts'?)"),
    ('[client]\nhosts = ["10.0.0.1"]\n[bogus]\nx = 1\n', "3: unknown section [bogus] (valid: "
     "client, commands, env, export, mount, security, staging, tags)"),
])
def test_vm_config_typos_stop_offld_and_the_mount(text, line, tmp_path, work):
    """offld and offloadfs mount refuse an unknown key or section, naming file and line, and
    send no job anywhere."""
    config = tmp_path / "vm.toml"
    config.write_text(text)
    done = run([OFFLD, "-c", str(config), "--", "true"], cwd=work)
    assert one_line(done, 255) == f"offld: {config}:{line}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run([OFFLOADFS, "mount", str(mnt), "-f", "-c", str(config)])
    assert one_line(done, 2) == f"offloadfs: {config}:{line}"


@pytest.mark.parametrize("cmd", ["serve", "broker"])
def test_host_config_typos_stop_offloadd(cmd, tmp_path):
    """offloadd serve and broker refuse a misspelt key, naming the nearest one."""
    config = tmp_path / "offloadd.toml"
    config.write_text('[serve]\nslots = 2\n\n[limits]\nmemroy = "1G"\n')
    done = run([OFFLOADD, cmd, "-c", str(config)])
    assert one_line(done, 2) == (f"offloadd: {config}:5: unknown key 'memroy' in [limits] "
                                 f"(did you mean 'memory'?)")
