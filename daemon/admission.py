"""Whether this host takes a client's submit, and where its job runs: plain functions, no
sockets.

The server's loop thread calls :func:`check` and :func:`admit` for each submit (either raises
``policy.Refused``, whose kind goes into the ``error`` reply), and :func:`shared_cwd` or
:func:`nfs_cwd` when the job is about to be spawned. The rules themselves (the allowlist, the
caller's identity, a VM's claim, paths) are ``policy``'s; this module applies them to one
message with this host's configuration. They look at the host's file system (the command's
path, the working directory, the nonce in a mounted export), nothing else.
"""
from __future__ import annotations

import os
import select

from offloadfs import keys, mountinfo, protocol
from offloadfs.protocol import Message, ProtocolError

from . import limits, policy
from .config import ServeConfig


class OffloadfsMounts:
    """The offloadfs mounts this process sees (``mountinfo.offloadfs_mounts``), read again
    only after its mount table changed: the kernel marks an open /proc/self/mountinfo
    POLLPRI then, so a submit costs one poll, not a read and parse of the table. The
    server's loop thread owns it."""

    def __init__(self, path: str = mountinfo.MOUNTINFO):
        """Watch the mount table ``path`` (read at the first :meth:`get`)."""
        self.path = path
        self.mounts: list[str] | None = None
        self.poller = select.poll()
        self.fd = -1   # not procfs's (only its mount tables say they changed): read each time
        if path == mountinfo.MOUNTINFO:
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
            else:
                self.poller.register(self.fd, select.POLLPRI)

    def get(self) -> list[str]:
        """The mount points, as of now."""
        if self.mounts is None or self.fd < 0 or self.poller.poll(0):
            self.mounts = mountinfo.offloadfs_mounts(self.path)
        return self.mounts

    def loops(self, path: str) -> bool:
        """True if ``path`` (after symlinks) lies in an offloadfs mount: running it would
        offload again (``mountinfo.resolves_into_offloadfs``'s rule, on the mounts kept)."""
        return mountinfo.resolves_into(path, self.get())

    def close(self) -> None:
        """Stop watching."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check(config: ServeConfig, msg: Message, allow: policy.Allowlist, ring: keys.Keyring | None,
          vm_key: str | None, hostname: str, mounts: OffloadfsMounts | None = None) -> str:
    """Apply the host's policy to a submit; the command's path, or Refused. With keys
    (``ring``), ``vm_key`` is the VM's key: its CURVE key, or the one its broker vouches for;
    ``mounts`` keeps the offloadfs mounts between submits (without: the table is read)."""
    path = allow.resolve(msg["argv"][0])
    policy.check_identity(msg["uid"], msg["gid"], config.allow_root, os.getuid(),
                          msg["groups"])
    if ring is not None:
        check_vm(config, msg, ring, vm_key, hostname)
    if mounts.loops(path) if mounts is not None else mountinfo.resolves_into_offloadfs(path):
        raise policy.Refused("loop", f"{path} lies in an offloadfs mount on {hostname}; "
                                     f"running it would offload again")
    return path


def check_vm(config: ServeConfig, msg: Message, ring: keys.Keyring, vm_key: str | None,
             hostname: str) -> None:
    """With keys: the VM behind the submit (``vm_key``) must still be authorized, and may
    claim only what its rule allows."""
    vm = ring.name_of(vm_key)
    if vm is None:
        raise policy.Refused("unauthorized", f"this VM's key is not (or no longer) "
                                             f"authorized on {hostname}")
    data = msg.get("data") or {}
    export = f"{data.get('server')}:{data.get('export')}" if data.get("mode") == protocol.DATA_NFS \
        else None
    policy.check_claim(vm, config.security.vms.get(vm), msg["uid"], msg["gid"],
                       msg["groups"], export)


def admit(budget: limits.Budget, peer: bytes, msg: Message, hostname: str) -> int:
    """Check a submit's data descriptor and take the job's cost from the budget of the peer
    and of the host; its cost, or Refused."""
    check_data(msg.get("data") or {})
    size = limits.cost(msg.fields)
    why = budget.take(peer, size)
    if why is not None:
        raise policy.Refused("busy", f"{hostname}: {why}")
    return size


def check_data(data: dict) -> None:
    """Refuse a submit's data descriptor that breaks the protocol's schema
    (:func:`offloadfs.protocol.check_data`): a refusal before any spawn."""
    try:
        protocol.check_data(data)
    except ProtocolError as exc:
        raise policy.Refused(exc.kind, str(exc)) from None


def shared_cwd(config: ServeConfig, spec: Message, hostname: str) -> str:
    """The job's working directory in shared mode: the same path, or its path_map twin."""
    cwd = policy.map_path(os.fsdecode(spec["cwd"]), config.path_map)
    if not os.path.isdir(cwd):
        raise policy.Refused("cwd", f"{cwd}: no such directory on {hostname}")
    return cwd


def nfs_cwd(mnt: str, data: dict, hostname: str) -> str:
    """The job's working directory in its mounted export, after checking that the mount
    is the caller's tree (the nonce file the VM wrote is there) and the cwd stays in it."""
    nonce = str(data.get("nonce", ""))
    if not nonce or "/" in nonce or not os.path.exists(os.path.join(mnt, ".offloadfs", nonce)):
        raise policy.Refused("attach", f"{data['server']}:{data['export']} mounted on "
                                       f"{hostname} is not the caller's tree (no nonce)")
    cwd = policy.below(mnt, str(data.get("path", "")))
    real = os.path.realpath(cwd)
    if real != mnt and not real.startswith(mnt + "/"):
        raise policy.Refused("cwd", f"{data.get('path')!r} leaves the export (symlink)")
    if not os.path.isdir(cwd):
        raise policy.Refused("cwd", f"{data.get('path')!r}: no such directory in the export")
    return cwd
