"""``offloadfs``: the VM side's command line (run, status; mount comes with the filesystem)."""
from __future__ import annotations

import argparse
import os
import sys

from . import offld
from .commandline import add_keygen, add_version, keygen, run
from .config import ClientConfig
from .settings import ConfigError


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``offloadfs``."""
    p = argparse.ArgumentParser(prog="offloadfs", description="Offload commands to compute hosts.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run a command on a host (same as offld)", add_help=False)
    m = sub.add_parser("mount", help="mount the shims at MOUNTPOINT")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("-c", "--config", metavar="FILE", help="read settings from FILE")
    m.add_argument("-H", "--host", action="append", metavar="HOST[:PORT]",
                   help="offload to this host (repeatable)")
    m.add_argument("-L", "--load-balancer", action="append", metavar="BROKER[:PORT]",
                   help="offload through this broker (repeatable)")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", "--debug", action="store_true", help="log debug messages, and tell "
                   "every caller on stderr where its job ran and why")
    m.add_argument("--log", metavar="FILE", help="log to FILE (without -f, stderr is lost)")
    u = sub.add_parser("umount", help="unmount MOUNTPOINT")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    st = sub.add_parser("status", help="hosts, slots, queue, and the last jobs run from here")
    st.add_argument("-c", "--config", metavar="FILE", help="read settings from FILE")
    st.add_argument("-H", "--host", action="append", metavar="HOST[:PORT]",
                    help="ask this host (default: the configured ones; repeatable)")
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each host")
    add_keygen(sub, "this VM's")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``offloadfs``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:     # offld's lean start-up: no mount (FUSE) or status imports
        return offld.main(argv[1:], prog="offloadfs run")
    args = parser().parse_args(argv)
    return run("offloadfs", {"status": status, "mount": mount_shims, "umount": umount,
                             "keygen": keygen}, args)


def mount_shims(args) -> int:
    """``offloadfs mount``, libfuse failing to mount as one line of ours (fusepy raises a bare
    RuntimeError with its status; libfuse said why on stderr before)."""
    from . import mount  # the FUSE binding: only for mount and umount
    try:
        return mount.mount(args)
    except RuntimeError as exc:
        raise ConfigError(f"cannot mount at {os.path.abspath(args.mountpoint)}: libfuse "
                          f"failed (status {exc})") from None


def umount(args) -> int:
    """``offloadfs umount``."""
    from . import mount
    return mount.umount(args)


def status(args) -> int:
    """``offloadfs status``: each mount's hosts and jobs, or the hosts asked directly; then
    this machine's last ``offld`` jobs."""
    from . import joblog
    from . import status as st
    cfg = ClientConfig.load(args.config)
    mounts = [] if args.host else st.mounted()
    lines, errors = [], []
    for mnt in mounts:
        lines += st.mount_lines(mnt)
    if not mounts:
        lines, errors = st.report(offld.endpoints(args, cfg), args.timeout, cfg.keys)
    for error in errors:
        print(f"offloadfs status: {error}", file=sys.stderr)
    recent = [dict(e.get("timings", {}), command=" ".join(e.get("command", []))[:40],
                   status=e.get("status"), host=e.get("host")) for e in joblog.read(cfg.job_log)]
    lines += ["last offld jobs from here:"] + (st.job_lines(recent) or ["  (none)"])
    print("\n".join(lines))
    return 1 if errors else 0


def entry() -> None:
    """Console-script entry point of ``offloadfs``."""
    sys.exit(main())
