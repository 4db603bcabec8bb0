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
import sys

from .config import ClientConfig, ConfigError, host_endpoint

log = logging.getLogger("offloadfs")


def endpoints(args, cfg: ClientConfig) -> list[str]:
    """Hosts from -L and -H (in that order), else the config's brokers and hosts."""
    given = (args.load_balancer or []) + (args.host or [])
    return [host_endpoint(e) for e in given] or (cfg.brokers + cfg.hosts)


def mount(args) -> int:
    """Mount the shims at ``args.mountpoint``; returns when unmounted."""
    from .agent import Agent
    from .fs import ShimFS
    from .fusebinding import FUSE
    from .registry import Registry

    target = {"filename": args.log} if args.log else {"stream": sys.stderr}
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s offloadfs: %(levelname)s %(message)s" if args.log
                        else "offloadfs: %(levelname)s %(message)s", **target)
    cfg = ClientConfig.load(args.config)
    mnt = os.path.abspath(args.mountpoint)
    clear_stale(mnt)
    if not os.path.isdir(mnt):
        raise ConfigError(f"{mnt}: not a directory")
    hosts = endpoints(args, cfg)
    for endpoint in hosts if cfg.keys is not None else ():
        cfg.keys.for_endpoint(endpoint)   # a host without a server key: say so now, not later
    registry = Registry(cfg.allow, cfg.deny, cfg.state_file)
    agent = Agent(cfg, registry, hosts)
    log.info("mounting %s for %s", mnt, " ".join(agent.endpoints) or "(no hosts)")
    FUSE(ShimFS(registry, agent, os.getuid(), mnt, args.debug), mnt, raw_fi=True,
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


def umount(args) -> int:
    """Unmount ``args.mountpoint`` (the mount process then exits)."""
    mnt = os.path.abspath(args.mountpoint)
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
            raise ConfigError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                              else f"{tool} {' '.join(args)} failed")
        return
    raise ConfigError("fusermount is not installed (Debian: apt-get install fuse3)")
