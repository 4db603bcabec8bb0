"""The guest's disk image: Debian bookworm from Debian's packages, with offloadfs installed.

Two layers, each cached under ``CACHE`` by a hash of its inputs, so that a change to the
project rebuilds only the second:

1. **base** (``base-HASH.tar``): ``mmdebstrap`` of ``PACKAGES`` from ``MIRRORS`` (about a
   minute, 480 MB), keyed by the suite, the mirrors and the package list;
2. **image** (``image-HASH/``): the base unpacked, the project and its Python dependencies
   installed offline into ``/opt/offloadfs`` from wheels built here (``pip wheel``), the guest's
   init and control agent (``guestside/``) copied in, then ``mke2fs -d`` into a raw ext4
   image; the kernel and initramfs beside it. Keyed by the base and the project's sources.

Boots never write to the image: each one runs on its own qcow2 overlay (:mod:`.machine`).
Concurrent builders take ``CACHE/lock`` in turn.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
GUESTSIDE = Path(__file__).resolve().parent / "guestside"
CACHE = Path(os.environ.get("OFFLOADFS_VM_CACHE", "/var/cache/offloadfs-vm"))
SUITE = "bookworm"
MIRRORS = ("deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
PACKAGES = ("linux-image-cloud-amd64", "python3", "python3-venv", "fuse3", "libfuse2",
            "nfs-common", "nfs-kernel-server", "imagemagick", "iproute2", "kmod", "attr",
            "procps")
IMAGE_SIZE = "2G"
GUEST_USER, GUEST_UID = "alice", 2000   # the guest's caller in the kernel-nfsd scenario
# The project's files that go into the wheel: their contents key the image.
SOURCES = ("setup.cfg", "pyproject.toml", "offloadfs", "daemon")


class BuildError(Exception):
    """The image could not be built; one line for the user."""


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image: the raw disk, the kernel and the initramfs to boot it with."""

    disk: Path
    kernel: Path
    initrd: Path


def digest(*parts: bytes) -> str:
    """A short hash of some inputs."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


def base_key() -> str:
    """The base layer's key: suite, mirrors, packages."""
    return digest(SUITE.encode(), "\n".join(MIRRORS).encode(), " ".join(PACKAGES).encode())


def tree_bytes(paths: list[Path]) -> list[bytes]:
    """Each file's relative path and contents under ``paths`` (caches left out), sorted."""
    out = []
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" not in f.parts:
                out += [str(f.relative_to(top.parent)).encode(), f.read_bytes()]
    return out


def image_key(base: str) -> str:
    """The image's key: the base, the project's sources and the guest-side files."""
    return digest(base.encode(), *tree_bytes([PROJECT / s for s in SOURCES] + [GUESTSIDE]))


def ensure(log=print) -> Image:
    """The image for the current sources, built if the cache lacks it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = base_key()
        out = CACHE / f"image-{image_key(base)}"
        if not (out / "disk.img").exists():
            tarball = ensure_base(base, log)
            build_image(tarball, out, log)
            prune(tarball.name)
        return Image(out / "disk.img", out / "vmlinuz", out / "initrd.img")


def ensure_base(key: str, log) -> Path:
    """The base tarball, made with mmdebstrap if missing."""
    tarball = CACHE / f"base-{key}.tar"
    if tarball.exists():
        return tarball
    if not shutil.which("mmdebstrap"):
        raise BuildError("mmdebstrap is not installed (scripts/vm installs it: run as root)")
    log(f"vm: building the base image ({SUITE}: {len(PACKAGES)} packages) with mmdebstrap ...")
    partial = tarball.with_suffix(".partial.tar")
    run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES), SUITE, str(partial),
         *MIRRORS], "mmdebstrap")
    partial.rename(tarball)
    return tarball


def build_image(tarball: Path, out: Path, log) -> None:
    """Unpack the base, install the project from wheels, make the ext4 image."""
    log("vm: building the guest image (the project from wheels) ...")
    with tempfile.TemporaryDirectory(prefix="offloadfs-vm-build-", dir=CACHE) as tmp:
        root, wheels = Path(tmp) / "root", Path(tmp) / "root" / "tmp" / "wheels"
        root.mkdir()
        run(["tar", "-C", str(root), "-xf", str(tarball)], "tar")
        run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(PROJECT)],
            "pip wheel")
        chroot(root, ["python3", "-m", "venv", "/opt/offloadfs"])
        chroot(root, ["/opt/offloadfs/bin/pip", "install", "-q", "--no-index", "--find-links",
                      "/tmp/wheels", "offloadfs"])
        chroot(root, ["useradd", "-m", "-u", str(GUEST_UID), "-s", "/bin/sh", GUEST_USER])
        shutil.rmtree(wheels)
        install_guestside(root)
        partial = Path(tmp) / "disk.img"
        run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), str(partial), IMAGE_SIZE], "mke2fs")
        staging = Path(tmp) / "out"
        staging.mkdir()
        shutil.copy(only(root / "boot", "vmlinuz-*"), staging / "vmlinuz")
        shutil.copy(only(root / "boot", "initrd.img-*"), staging / "initrd.img")
        partial.rename(staging / "disk.img")
        staging.rename(out)


def install_guestside(root: Path) -> None:
    """The guest's init, its control agent, and the project's programs on PATH."""
    lib = root / "usr/local/lib/offloadfs-guest"
    lib.mkdir(parents=True)
    shutil.copy(GUESTSIDE / "control.py", lib / "control.py")
    shutil.copy(GUESTSIDE / "init", root / "sbin/offloadfs-guest-init")
    (root / "sbin/offloadfs-guest-init").chmod(0o755)
    for prog in ("offloadfs", "offld", "offloadd"):
        (root / "usr/local/bin" / prog).symlink_to(f"/opt/offloadfs/bin/{prog}")


def chroot(root: Path, argv: list[str]) -> None:
    """Run a command inside the unpacked tree (with /proc, for pip and useradd)."""
    (root / "proc").mkdir(exist_ok=True)
    run(["mount", "-t", "proc", "proc", str(root / "proc")], "mount proc")
    try:
        run(["chroot", str(root), *argv], argv[0])
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def only(directory: Path, pattern: str) -> Path:
    """The one file matching ``pattern`` in ``directory``."""
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise BuildError(f"expected one {pattern} in {directory}, found {len(found)}")
    return found[0]


def prune(base: str, images: int = 3) -> None:
    """Remove other bases, and all but the newest few images (other checkouts may be booting
    an older one)."""
    for entry in CACHE.glob("base-*.tar"):
        if entry.name != base:
            entry.unlink(missing_ok=True)
    built = sorted(CACHE.glob("image-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for entry in built[images:]:
        shutil.rmtree(entry, ignore_errors=True)


def run(argv: list[str], what: str) -> None:
    """Run a build step; BuildError with its last line of output if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise BuildError(f"{what}: {lines[-1]}")
