"""One booted guest: QEMU (TCG unless KVM is proven to work), a qcow2 overlay over the cached
image, user-mode networking with ``restrict=on``, and the control channel.

Networking never leaves loopback here: the guest (10.0.2.15) reaches this machine only where a
``guestfwd`` rule says so (``GuestForward``: a guest address and port, relayed by ``socat`` to
a port on 127.0.0.1), and this machine reaches the guest only through ``hostfwd`` rules bound
to 127.0.0.1 (``HostForward``). Everything else the guest sends goes nowhere (``restrict``).

The control channel is a virtio-serial port whose host end is a Unix socket in the run
directory; ``guestside/control.py`` answers it. The caller's thread owns a :class:`Guest`:
:meth:`boot`, then :meth:`run`/:meth:`spawn`, then :meth:`stop` (also on errors: use it as a
context manager), which powers the guest off, kills QEMU if it lingers, and removes the
overlay.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from offloadfs.export import die_with_parent

from .image import CACHE, Image

GUEST_ADDR = "10.0.2.15"
GATEWAY = "10.0.2.2"   # the source address of every hostfwd connection, as the guest sees it
CONTROL_PORT = "org.offloadfs.control"
INIT = "/sbin/offloadfs-guest-init"
MEMORY_MB = 1024   # the thesis's VMs had 1 GB


class GuestError(Exception):
    """The guest did not boot, or a command in it failed; one line for the user."""


@dataclasses.dataclass(frozen=True)
class HostForward:
    """127.0.0.1:``port`` here reaches ``guest_port`` on the guest."""

    port: int
    guest_port: int

    def rule(self) -> str:
        """QEMU's hostfwd rule."""
        return f"hostfwd=tcp:127.0.0.1:{self.port}-{GUEST_ADDR}:{self.guest_port}"


@dataclasses.dataclass(frozen=True)
class GuestForward:
    """The guest's ``address``:``guest_port`` reaches 127.0.0.1:``port`` here."""

    address: str
    guest_port: int
    port: int

    def rule(self) -> str:
        """QEMU's guestfwd rule: one socat per connection the guest opens."""
        return (f"guestfwd=tcp:{self.address}:{self.guest_port}-cmd:"
                f"socat - TCP:127.0.0.1:{self.port}")


@dataclasses.dataclass
class Done:
    """A finished command in the guest."""

    rc: int
    out: bytes
    err: bytes

    @property
    def text(self) -> str:
        """stdout as text."""
        return self.out.decode(errors="replace")


KVM_PROBE_S = 20   # a KVM guest answers in a few seconds; one that spins never does


def accel(image: Image) -> str:
    """``kvm`` if a probe boot under KVM answered on this machine, else ``tcg``;
    OFFLOADFS_VM_ACCEL=tcg|kvm decides instead. (QEMU's KVM aborts or spins without output on
    some hosts: docs/deployment.md.) The probe's answer is cached per QEMU, kernel and CPU."""
    choice = os.environ.get("OFFLOADFS_VM_ACCEL", "auto")
    if choice not in ("tcg", "kvm", "auto"):
        raise GuestError(f"OFFLOADFS_VM_ACCEL={choice!r}: expected tcg, kvm or auto")
    if choice != "auto":
        return choice
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    key = "\0".join([qemu.stdout.splitlines()[0] if qemu.stdout else "", os.uname().release,
                     _cpu_model(), str(image.kernel)])
    cached = CACHE / f"accel-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not cached.exists():
        probe = Guest(image, accel="kvm")
        try:
            probe.boot(timeout=KVM_PROBE_S)
            found = "kvm"
        except GuestError:
            found = "tcg"
        finally:
            probe.stop(graceful=False)
        cached.write_text(found + "\n")
    return cached.read_text().strip()


def _cpu_model() -> str:
    """This machine's CPU model name."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "")


class Guest:
    """A guest booted from ``image`` with the given forwards (see the module docstring)."""

    def __init__(self, image: Image, hostfwd: list[HostForward] = (),
                 guestfwd: list[GuestForward] = (), memory_mb: int = MEMORY_MB,
                 accel: str | None = None):
        """Nothing runs until :meth:`boot` (which picks the accelerator unless given)."""
        self.image, self.hostfwd, self.guestfwd = image, list(hostfwd), list(guestfwd)
        self.accel = accel
        self.memory_mb = memory_mb
        self.dir: Path | None = None   # the run directory, made by boot
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.ids = itertools.count(1)
        self.boot_s = 0.0

    def __enter__(self) -> Guest:
        """Boot."""
        self.boot()
        return self

    def __exit__(self, *exc) -> None:
        """Stop, whatever happened."""
        self.stop()

    @property
    def console(self) -> Path:
        """The guest's serial console (kernel messages, init's lines)."""
        return self.dir / "console.log"

    def argv(self) -> list[str]:
        """QEMU's command line."""
        net = ",".join(["user", "id=net0", "restrict=on", "net=10.0.2.0/24",
                        *(f.rule() for f in self.hostfwd + self.guestfwd)])
        return ["qemu-system-x86_64", "-name", "offloadfs-guest", "-accel", self.accel,
                *(["-cpu", "host"] if self.accel == "kvm" else []),
                "-nodefaults", "-m", str(self.memory_mb), "-smp", "1", "-display", "none",
                "-no-reboot",
                "-monitor", "none", "-serial", f"file:{self.console}",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                "-append", f"root=/dev/vda rw console=ttyS0 init={INIT} quiet net.ifnames=0",
                "-drive", f"file={self.dir / 'overlay.qcow2'},if=virtio,format=qcow2",
                "-netdev", net, "-device", "virtio-net-pci,netdev=net0",
                "-device", "virtio-rng-pci", "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=control,path={self.dir / 'control.sock'},server=on,"
                            "wait=off",
                "-device", f"virtserialport,chardev=control,name={CONTROL_PORT}"]

    def boot(self, timeout: float = 120) -> None:
        """Start QEMU and wait until the control agent answers."""
        self.accel = self.accel or accel(self.image)
        CACHE.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="offloadfs-vm-", dir=CACHE))
        started = time.monotonic()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image.disk), str(self.dir / "overlay.qcow2")], check=True)
        with open(self.dir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         preexec_fn=die_with_parent)   # never outlives us
        deadline = started + timeout
        while self.sock is None:
            self._check_alive()
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(self.dir / "control.sock"))
                self.sock = sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError("QEMU made no control socket") from None
                time.sleep(0.05)
        while not self._ping(min(2.0, max(0.1, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise GuestError(f"the guest did not answer within {timeout:g}s: "
                                 f"{self.last_console_line()}")
        self.boot_s = time.monotonic() - started

    def _ping(self, timeout: float) -> bool:
        """True if the control agent answered a ping within ``timeout``."""
        try:
            self.request({"op": "ping"}, timeout)
            return True
        except TimeoutError:
            return False

    def _check_alive(self) -> None:
        """GuestError if QEMU has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = (self.dir / "qemu.log").read_text(errors="replace").strip().splitlines()
            raise GuestError(f"QEMU exited {self.proc.returncode}: "
                             f"{tail[-1] if tail else self.last_console_line()}")

    def last_console_line(self) -> str:
        """The console's last line, for errors."""
        try:
            lines = self.console.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no console output)"
        return lines[-1] if lines else "(no console output)"

    def request(self, req: dict, timeout: float) -> dict:
        """Send one request and wait for its answer (TimeoutError past ``timeout``)."""
        req_id = next(self.ids)
        self.sock.sendall(json.dumps({"id": req_id, **req}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                answer = json.loads(line)
                if answer.get("id") == req_id:
                    if "error" in answer:
                        raise GuestError(f"guest: {req.get('argv', req['op'])}: "
                                         f"{answer['error']}")
                    return answer
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest: no answer to {req['op']} within {timeout:g}s")
            self._check_alive()
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionError:   # QEMU died with the channel open (a KVM probe that fails)
                chunk = b""
            if not chunk:
                raise GuestError("guest: the control channel closed")
            self.buf += chunk

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict | None = None,
            uid: int | None = None, input: bytes = b"", timeout: float = 120,
            check: bool = True) -> Done:
        """Run a command in the guest to its end; GuestError if ``check`` and it failed."""
        answer = self.request({"op": "run", "argv": argv, "cwd": cwd, "env": env, "uid": uid,
                               "input": base64.b64encode(input).decode(), "timeout": timeout},
                              timeout + 10)
        done = Done(answer["rc"], base64.b64decode(answer["out"]),
                    base64.b64decode(answer["err"]))
        if check and done.rc != 0:
            why = (done.err or done.out).decode(errors="replace").strip().splitlines()
            raise GuestError(f"guest: {' '.join(argv)}: exit {done.rc}: "
                             f"{why[-1] if why else ''}")
        return done

    def spawn(self, argv: list[str], log: str, *, env: dict | None = None,
              uid: int | None = None) -> int:
        """Start a command in the background in the guest; its pid there."""
        return self.request({"op": "spawn", "argv": argv, "log": log, "env": env, "uid": uid},
                            30)["pid"]

    def read(self, path: str) -> bytes:
        """A file's bytes in the guest."""
        return self.run(["cat", path]).out

    def write(self, path: str, data: bytes, uid: int | None = None) -> None:
        """Write a file in the guest (as ``uid``)."""
        self.run(["dd", f"of={path}", "status=none"], input=data, uid=uid)

    def stop(self, graceful: bool = True) -> None:
        """Power off (or kill QEMU: at once unless ``graceful``), close the channel, remove
        the run directory."""
        if self.proc is not None and self.proc.poll() is None and not graceful:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.sock is not None:
                    self.request({"op": "poweroff"}, 5)
            except (OSError, TimeoutError, GuestError):
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
