"""The two deployment scenarios that need a second kernel, run against one booted guest.

- **kernel-nfs-client**: the guest is the compute host (``offloadd serve``, ``[mounts] client =
  "kernel"``); this machine is the VM (``offloadfs mount``, ``[export] backend = "ganesha"``).
  The guest's kernel mounts our export with ``mount -t nfs4`` through a guestfwd rule, so the
  export is *advertised* at an address (10.0.2.100:2049) other than the one ganesha binds
  (127.0.0.1:PORT): ``[export] advertise``.
- **kernel-nfsd**: the guest is the VM (the FUSE mount of shims in the guest's kernel,
  ``[export] backend = "exportfs"``, the guest's nfsd); ``offloadd`` here mounts the guest's
  export with the userspace client through a hostfwd rule and runs the job.

Each scenario returns its evidence as one line, or raises :class:`ScenarioFailed`. Every
process, mount and export it starts, here or in the guest, is ended before it returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests import harness
from tests.harness import free_port

from .image import GUEST_UID, GUEST_USER
from .machine import GATEWAY, GUEST_ADDR, Guest, GuestError, GuestForward, HostForward

FORWARDED = "10.0.2.100"   # where the guest reaches this machine's services (guestfwd)
GUEST_OFFLOADD_PORT = 7788
NFS_PORT = 2049
IDLE_UNMOUNT_S = 10        # the guest host's idle unmount, short so that the check sees it
CALLER = "offloadvm"       # this machine's caller in kernel-nfs-client
BLUR = "0x3"
SIZE = "160x160"
GUEST_MOUNT = "/opt/offload"


class ScenarioFailed(Exception):
    """A scenario's promise did not hold; one line saying which."""


@dataclasses.dataclass(frozen=True)
class Ports:
    """The loopback ports of one boot, chosen before it (QEMU's rules are fixed at boot)."""

    guest_offloadd: HostForward   # 127.0.0.1:N -> the guest's offloadd
    guest_nfsd: HostForward       # 127.0.0.1:N -> the guest's nfsd
    ganesha: GuestForward         # the guest's 10.0.2.100:2049 -> our ganesha
    offloadd: GuestForward        # the guest's 10.0.2.100:7788 -> our offloadd

    @classmethod
    def pick(cls) -> Ports:
        """Free ports for each rule."""
        return cls(HostForward(free_port(), GUEST_OFFLOADD_PORT),
                   HostForward(free_port(), NFS_PORT),
                   GuestForward(FORWARDED, NFS_PORT, free_port()),
                   GuestForward(FORWARDED, GUEST_OFFLOADD_PORT, free_port()))

    def guest(self, image) -> Guest:
        """A guest with these rules."""
        return Guest(image, hostfwd=[self.guest_offloadd, self.guest_nfsd],
                     guestfwd=[self.ganesha, self.offloadd])


def wait(check, timeout: float, what: str):
    """``check()``'s first truthy value within ``timeout`` s, else ScenarioFailed."""
    try:
        return harness.wait_for(check, timeout, what, interval=0.5)
    except harness.HarnessError:
        raise ScenarioFailed(f"{what}: not within {timeout:g} s") from None


def sha(data: bytes) -> str:
    """A short digest for evidence lines."""
    return hashlib.sha256(data).hexdigest()[:12]


def make_input(work: Path) -> bytes:
    """The job's input image (PNG from a seeded plasma) in ``work``; its bytes."""
    subprocess.run([harness.CONVERT, "-size", SIZE, "plasma:fractal", "-seed", "7", "in.png"],
                   cwd=work, check=True)
    return (work / "in.png").read_bytes()


def blur_argv(out: str, convert: str = "convert") -> list[str]:
    """The unchanged command line of both scenarios."""
    return [convert, "in.png", "-blur", BLUR, out]


def local_blur(work: Path) -> bytes:
    """The reference: /usr/bin/convert here."""
    subprocess.run(blur_argv("local.ppm", harness.CONVERT), cwd=work, check=True)
    return (work / "local.ppm").read_bytes()


NFSD_GRACE_S = 10   # the kernel's default is 90 s, during which new OPENs are refused


def start_nfsd(g: Guest) -> None:
    """The guest's kernel nfsd, NFSv4 only over TCP (mountd for the export cache; no
    rpcbind), with a short grace period (set before it starts; docs/deployment.md)."""
    g.run(["mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"])
    for knob in ("nfsv4gracetime", "nfsv4leasetime"):
        g.write(f"/proc/fs/nfsd/{knob}", f"{NFSD_GRACE_S}\n".encode())
    for argv in (["mkdir", "-p", "/var/lib/nfs/v4recovery"],
                 ["rpc.mountd", "--no-nfs-version", "3", "--no-udp"],
                 ["rpc.nfsd", "--no-nfs-version", "3", "--no-udp", "4"]):
        g.run(argv)


def nfs4_lines(g: Guest, export: str) -> list[str]:
    """The guest's /proc/mounts lines of NFSv4 mounts of ``export``."""
    return [line for line in g.read("/proc/mounts").decode().splitlines()
            if line.split()[2:3] == ["nfs4"] and line.split()[0].endswith(":" + export)]


def guest_log(g: Guest, path: str) -> str:
    """A log file in the guest ("" before it exists)."""
    done = g.run(["cat", path], check=False)
    return done.text if done.rc == 0 else ""


# --- kernel-nfs-client ---------------------------------------------------------------------------

GUEST_HOST_CONFIG = """[serve]
listen = "tcp://0.0.0.0:{port}"

[mounts]
client = "kernel"
dir = "/var/lib/offloadd/mnt"
idle_unmount = {idle}
options = "hard,timeo=100,retrans=3"

[commands]
convert = "/usr/bin/convert"
cat = "/bin/cat"
"""


def vm_config(path: Path, root: Path, port: int, advertise: str) -> Path:
    """This machine's VM config: ganesha on 127.0.0.1:``port``, advertised as ``advertise``."""
    path.write_text(f'[export]\nbackend = "ganesha"\nroot = "{root}"\n'
                    f'listen = "127.0.0.1:{port}"\nadvertise = "{advertise}"\n'
                    'clients = ["127.0.0.1"]\n')
    return path


@contextlib.contextmanager
def guest_daemon(g: Guest):
    """``offloadd serve`` in the guest (kernel NFS client), stopped at the end; its log path."""
    log = "/tmp/offloadd.log"
    g.write("/etc/offloadd-guest.toml",
            GUEST_HOST_CONFIG.format(port=GUEST_OFFLOADD_PORT, idle=IDLE_UNMOUNT_S).encode())
    pid = g.spawn(["offloadd", "serve", "-c", "/etc/offloadd-guest.toml"], log)
    try:
        wait(lambda: "listening on" in guest_log(g, log), 90, "the guest's offloadd to listen")
        yield log
    finally:
        g.run(["kill", str(pid)], check=False)
        wait(lambda: g.run(["kill", "-0", str(pid)], check=False).rc != 0, 30,
             "the guest's offloadd to exit")


@contextlib.contextmanager
def shim_mount(tmp: Path, config: Path, host: str):
    """``offloadfs mount`` here with ``convert`` and ``cat`` set to ``always`` (never local)."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}   # its policies stay its own
    m = harness.Mount(tmp, hosts=[host], config=str(config), wait_for_shim=["convert", "cat"],
                      env=env)
    try:   # shims whose policy was set earlier are listed before the host answers
        m.wait_until(lambda: " is up: " in m.log(), "see the guest's offloadd up", 60)
        for name in ("convert", "cat"):
            subprocess.run(["setfattr", "-n", "user.offload.policy", "-v", "always",
                            str(m.path / name)], check=True)
        yield m
    finally:
        m.unmount(warn=lambda text: None)


def caller(uid: int) -> dict:
    """subprocess's arguments that run a child as ``uid`` alone (none of root's groups)."""
    return {"user": uid, "group": uid, "extra_groups": []}


def as_caller(uid: int, argv: list[str], m: harness.Mount, work: Path,
              **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` through the shims as the caller, in ``work``."""
    return subprocess.run(argv, cwd=work, env=m.env(), capture_output=True, timeout=180,
                          **caller(uid), **kw)


def blur_through(m: harness.Mount, uid: int, work: Path, out: str, reference: bytes) -> None:
    """``convert`` through the shim; its output must be the reference's bytes."""
    done = as_caller(uid, blur_argv(out), m, work)
    if done.returncode != 0:
        raise ScenarioFailed(f"convert through the shim: exit {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()[-200:]}")
    if (work / out).read_bytes() != reference:
        raise ScenarioFailed(f"{out} differs from the local run's output")


def cat_while_mounted(m: harness.Mount, uid: int, work: Path, g: Guest, root: Path) -> str:
    """A ``cat`` job held open until the guest's /proc/mounts shows the export; that line."""
    proc = subprocess.Popen([str(m.path / "cat")], cwd=work, env=m.env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **caller(uid))
    try:
        line = wait(lambda: nfs4_lines(g, str(root)), 120,
                    "the guest's kernel NFS mount while the job runs")[0]
        out, err = proc.communicate(b"through the guest\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or out != b"through the guest\n":
        raise ScenarioFailed(f"cat through the shim: exit {proc.returncode}: {err[-200:]!r}")
    return line


def kernel_nfs_client(g: Guest, ports: Ports, tmp: Path) -> str:
    """The guest's kernel mounts our ganesha export and runs the job there (see the module)."""
    _, uid = harness.test_user(CALLER)
    root = Path(tempfile.mkdtemp(prefix="offloadfs-vm-export-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        work = root / "work"
        work.mkdir()
        make_input(work)
        reference = local_blur(work)
        for path in (work, *work.iterdir()):
            os.chown(path, uid, uid)
        config = vm_config(tmp / "vm.toml", root, ports.ganesha.port,
                           f"{FORWARDED}:{NFS_PORT}")
        host = f"127.0.0.1:{ports.guest_offloadd.port}"
        with guest_daemon(g) as log, said_by(g, log):
            with shim_mount(tmp, config, host) as m:
                line = cat_while_mounted(m, uid, work, g, root)
                for n in (1, 2):
                    blur_through(m, uid, work, f"remote{n}.ppm", reference)
                made = guest_log(g, log).count(" mounted ")
                if made != 1:
                    raise ScenarioFailed(f"three jobs made {made} kernel mounts, not one")
            # The export's server restarts: a new ganesha on the same port. It stays up while
            # the host unmounts the idle export (a VM that went away is another story: the
            # kernel's hard mount would retry it).
            with shim_mount(tmp, config, host) as m:
                blur_through(m, uid, work, "remote3.ppm", reference)
                after = "reused" if guest_log(g, log).count(" mounted ") == 1 else "remade"
                wait(lambda: not nfs4_lines(g, str(root)), IDLE_UNMOUNT_S + 60,
                     "the guest to unmount the idle export")
            if "unmounting idle" not in guest_log(g, log):
                raise ScenarioFailed("the guest's offloadd did not log its idle unmount")
            refusal = wrong_export(g, tmp, root, uid, host)
        return (f"{line.split()[0]} on {line.split()[1]} type nfs4 "
                f"({_options(line)}) in the guest while the job ran; 4 jobs byte-identical "
                f"to the local run (sha256 {sha(reference)}), one mount for 3 jobs, {after} "
                f"after a ganesha restart, unmounted after {IDLE_UNMOUNT_S} s idle; "
                f"a wrong export refused: {refusal}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def said_by(g: Guest, log: str):
    """A ScenarioFailed inside gets the last line of the guest's ``log`` appended."""
    try:
        yield
    except ScenarioFailed as exc:
        lines = guest_log(g, log).strip().splitlines()
        raise ScenarioFailed(f"{exc} (guest's {log}: {lines[-1] if lines else 'empty'})") \
            from None


def _options(line: str) -> str:
    """A mount line's options that matter: version, hard, timeo, retrans."""
    opts = line.split()[3].split(",")
    return ",".join(o for o in opts if o.startswith(("vers=", "hard", "timeo=", "retrans=")))


def wrong_export(g: Guest, tmp: Path, root: Path, uid: int, host: str) -> str:
    """A VM whose export is advertised at the wrong server (the guest's own nfsd exports a
    tree at the same path, without our nonce): the host must refuse the job; its one line."""
    g.run(["mkdir", "-p", str(root / "work")])
    g.run(["exportfs", "-i", "-o", "rw,sync,no_subtree_check,insecure",
           f"{GUEST_ADDR}:{root}"])
    try:
        config = vm_config(tmp / "wrong.toml", root, free_port(), f"{GUEST_ADDR}:{NFS_PORT}")
        with shim_mount(tmp, config, host) as m:
            done = as_caller(uid, blur_argv("wrong.ppm"), m, root / "work")
        why = done.stderr.decode(errors="replace").strip()
        if done.returncode != 255 or "nonce" not in why:
            raise ScenarioFailed(f"a job on the wrong export: exit {done.returncode}: {why}")
        if (root / "work" / "wrong.ppm").exists() or \
                g.run(["test", "-e", str(root / "work" / "wrong.ppm")], check=False).rc == 0:
            raise ScenarioFailed("a job on the wrong export wrote its output")
        return why.splitlines()[-1]
    finally:
        g.run(["exportfs", "-u", f"{GUEST_ADDR}:{root}"], check=False)


# --- kernel-nfsd ---------------------------------------------------------------------------------

GUEST_VM_CONFIG = """[export]
backend = "exportfs"
root = "/home"
advertise = "127.0.0.1:{port}"
clients = ["{gateway}"]
"""


def kernel_nfsd(g: Guest, ports: Ports, tmp: Path) -> str:
    """The guest is the VM: its shims send the job here, where offloadd mounts the guest's
    kernel nfsd export (see the module)."""
    work, guest_work = tmp / "nfsd-work", f"/home/{GUEST_USER}/work"
    work.mkdir()
    data = make_input(work)
    reference = local_blur(work)
    g.run(["mkdir", "-p", guest_work])
    g.write(f"{guest_work}/in.png", data)
    g.run(["chown", "-R", f"{GUEST_UID}:{GUEST_UID}", guest_work])
    g.write("/etc/offloadfs-guest.toml",
            GUEST_VM_CONFIG.format(port=ports.guest_nfsd.port, gateway=GATEWAY).encode())
    host_toml = tmp / "host.toml"
    host_toml.write_text(f'[mounts]\nclient = "userspace"\ndir = "{tmp}/hostmnt"\n'
                         'idle_unmount = 3600\n')
    d = harness.Daemon(tmp, "-c", str(host_toml), commands={"convert": harness.CONVERT},
                       port=ports.offloadd.port)
    try:
        with guest_shims(g, f"{FORWARDED}:{GUEST_OFFLOADD_PORT}"):
            env = {"PATH": f"{GUEST_MOUNT}:/usr/bin:/bin", "OFFLOADFS_DEBUG": "1"}
            remote = g.run(blur_argv("remote.ppm"), cwd=guest_work, env=env, uid=GUEST_UID,
                           check=False, timeout=300)
            exports = g.run(["exportfs", "-v"]).text
            if remote.rc != 0:
                raise ScenarioFailed(f"convert through the guest's shim: exit {remote.rc}: "
                                     f"{remote.err.decode(errors='replace').strip()[-300:]}")
            g.run(blur_argv("local.ppm", "/usr/bin/convert"), cwd=guest_work, uid=GUEST_UID,
                  timeout=300)
            ours, theirs = (g.read(f"{guest_work}/{n}.ppm") for n in ("remote", "local"))
        if ours != theirs:
            raise ScenarioFailed("the offloaded output differs from the guest's own run")
        if ours != reference:
            raise ScenarioFailed("the guest's output differs from this machine's own run")
        mounted = re.search(r"mounted (\S+) at \S+ \(userspace\)", d.log())
        if mounted is None:
            raise ScenarioFailed("offloadd here did not mount the guest's export")
        export_line = next((line.strip() for line in exports.splitlines() if "/home" in line),
                           "")
        if GATEWAY not in export_line:
            raise ScenarioFailed(f"exportfs -v in the guest: no /home export to {GATEWAY}")
        if "/home" in g.run(["exportfs", "-v"]).text:
            raise ScenarioFailed("the guest's export outlived its mount")
        return (f"exportfs -v in the guest: '{' '.join(export_line.split())}'; offloadd here "
                f"mounted {mounted.group(1)} (userspace) and ran it: "
                f"{_ran_on(remote.err)}; output byte-identical to the guest's own run "
                f"(sha256 {sha(ours)}); export removed at unmount")
    finally:
        d.stop(warn=lambda text: None)


def _ran_on(stderr: bytes) -> str:
    """The shim's debug line saying where the job ran."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if "offloadfs" in line]
    return lines[-1].strip() if lines else "(no debug line)"


@contextlib.contextmanager
def guest_shims(g: Guest, host: str):
    """``offloadfs mount`` in the guest (exportfs backend), ``convert`` set to always."""
    log = "/tmp/mount.log"
    g.run(["mkdir", "-p", GUEST_MOUNT])
    pid = g.spawn(["offloadfs", "mount", GUEST_MOUNT, "-f", "-c", "/etc/offloadfs-guest.toml",
                   "-H", host], log)
    try:
        wait(lambda: g.run(["test", "-e", f"{GUEST_MOUNT}/convert"], check=False).rc == 0,
             120, "the guest's shims")
        g.run(["setfattr", "-n", "user.offload.policy", "-v", "always",
               f"{GUEST_MOUNT}/convert"])
        yield log
    finally:
        g.run(["offloadfs", "umount", GUEST_MOUNT], check=False, timeout=60)
        with contextlib.suppress(ScenarioFailed):
            wait(lambda: g.run(["kill", "-0", str(pid)], check=False).rc != 0, 30,
                 "the guest's mount to exit")


# --- both, on one boot ----------------------------------------------------------------------------

SCENARIOS = {"kernel-nfs-client": kernel_nfs_client, "kernel-nfsd": kernel_nfsd}


@contextlib.contextmanager
def booted(image):
    """A guest with the scenarios' forwards and its nfsd running: (guest, ports); stopped at
    the end (``scripts/vm check`` and tests/system/test_guest.py share it)."""
    ports = Ports.pick()
    with ports.guest(image) as g:
        start_nfsd(g)
        yield g, ports


def check(image, names=tuple(SCENARIOS), out=print) -> bool:
    """Boot one guest, run the scenarios, print ``ok NAME: evidence`` or ``FAIL NAME: why``
    for each; True if all held."""
    held = True
    with tempfile.TemporaryDirectory(prefix="offloadfs-vm-check-") as name, \
            booted(image) as (g, ports):
        tmp = Path(name)
        tmp.chmod(0o755)
        kernel = g.run(["uname", "-r"]).text.strip()
        out(f"vm: guest up in {g.boot_s:.1f} s ({kernel}, {g.accel})")
        for scenario in names:
            started = time.monotonic()
            scratch = tmp / scenario
            scratch.mkdir()
            try:
                evidence = SCENARIOS[scenario](g, ports, scratch)
                out(f"ok {scenario}: {evidence} [{time.monotonic() - started:.0f} s]")
            except (ScenarioFailed, GuestError, harness.HarnessError, TimeoutError,
                    subprocess.SubprocessError, OSError) as exc:
                held = False
                out(f"FAIL {scenario}: {str(exc).splitlines()[0]}")
    return held
