"""``offloadfs mount`` and ``offloadfs umount``: the filesystem of shims and its agent.

The mount process's main thread runs libfuse (through fusebinding); libfuse's worker threads serve
:class:`~offloadfs.fs.ShimFS`; the agent thread (started by the filesystem's ``init``) talks to
the hosts. SIGTERM, SIGINT or ``offloadfs umount`` end libfuse's loop, which unmounts and stops
the agent. ``auto_unmount`` makes the kernel drop the mount if this process dies, so a dead
mount never leaves "Transport endpoint is not connected" on PATH.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess

from . import logsetup
from .config import ClientConfig, ConfigError

log = logging.getLogger("offloadfs")
FUSE_DEVICE = "/dev/fuse"


def mount(args) -> int:
    """Mount the shims at ``args.mountpoint``; returns when unmounted."""
    check_device()
    from .agent import Agent
    from .fs import ShimFS
    from .fusebinding import FUSE
    from .listener import Listener
    from .registry import Registry
    from .shim import program

    logsetup.setup("offloadfs", args.debug, args.log)
    cfg = ClientConfig.load(args.config)
    mnt = os.path.abspath(args.mountpoint)
    clear_stale(mnt)
    check_mountable(mnt)
    from .offld import brokers, endpoints
    hosts = list(endpoints(args, cfg))
    for endpoint in hosts if cfg.keys is not None else ():
        cfg.keys.for_endpoint(endpoint)   # a host without a server key: say so now, not later
    registry = Registry(cfg.allow, cfg.deny, cfg.state_file)
    agent = Agent(cfg, registry, hosts, brokers(args, cfg))
    fs = ShimFS(registry, agent, os.getuid(), mnt, args.debug, program())
    agent.listener = Listener(agent, mnt, fs._dev)   # offld's hand-off (listener, handoff)
    log.info("mounting %s for %s (shims: %s)", mnt, " ".join(agent.endpoints) or "(no hosts)",
             fs.shims)
    FUSE(fs, mnt, raw_fi=True,
         foreground=args.foreground, nothreads=False, auto_unmount=True, fsname="offloadfs",
         subtype="offloadfs", attr_timeout=1, entry_timeout=1, **_allow_other())
    log.info("unmounted %s", mnt)
    return 0


def _allow_other() -> dict:
    """allow_other when we may use it (root, or user_allow_other in /etc/fuse.conf)."""
    if os.getuid() == 0:
        return {"allow_other": True}
    try:
        with open("/etc/fuse.conf") as f:
            allowed = any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        allowed = False
    return {"allow_other": True} if allowed else {}


def clear_stale(mnt: str) -> None:
    """Lazily unmount a dead FUSE mount left at ``mnt``; refuse a live offloadfs mount."""
    from . import mountinfo
    try:
        os.stat(mnt)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.info("%s: clearing a stale mount", mnt)
            _fusermount("-u", "-z", mnt)
        return
    if mnt in mountinfo.offloadfs_mounts():
        raise ConfigError(f"{mnt}: an offloadfs filesystem is already mounted there")


def check_mountable(mnt: str) -> None:
    """A mount point libfuse would fail on with no more than "RuntimeError: 1", said first."""
    if not os.path.isdir(mnt):
        raise ConfigError(f"{mnt}: " + ("not a directory" if os.path.exists(mnt) else
                                        "no such directory (create it first)"))


def check_device() -> None:
    """/dev/fuse, which libfuse opens as the caller (root or not), opened first: a one-line
    error with the likely fix instead of libfuse's "RuntimeError: 1"."""
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        fix = "load the fuse module: modprobe fuse; in a container, pass the device in" \
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO) else \
            "mount as root, or let this user open it: chmod 0666 /dev/fuse"
        raise ConfigError(f"cannot open {FUSE_DEVICE}: {exc.strerror} ({fix})") from None


def umount(args) -> int:
    """Unmount ``args.mountpoint`` (the mount process then exits), if it is ours to unmount."""
    from . import mountinfo
    mnt = os.path.abspath(args.mountpoint)
    mounts = mountinfo.offloadfs_mounts()
    if mnt not in mounts:
        mnt = os.path.realpath(mnt)
    if mnt not in mounts:
        raise ConfigError(f"{mnt} is not an offloadfs mount")
    owner = mountinfo.owner(mnt)
    if os.getuid() not in (0, owner) and owner is not None:
        raise ConfigError(f"cannot unmount {mnt}: uid {owner} mounted it; only that user or "
                          f"root may unmount it")
    _fusermount("-u", mnt)
    return 0


def _fusermount(*args: str) -> None:
    """Run fusermount (fuse3's fusermount3 when that is what the machine has)."""
    for tool in ("fusermount3", "fusermount"):
        try:
            done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            continue
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"{tool} failed"])[-1]
            reason = said.removeprefix(f"{tool}: ").removeprefix(f"failed to unmount {args[-1]}: ")
            if "busy" in reason:
                reason += " (a process has its cwd or a file open there)"
            raise ConfigError(f"cannot unmount {args[-1]}: {reason}")
        return
    raise ConfigError("fusermount is not installed (Debian: apt-get install fuse3)")
