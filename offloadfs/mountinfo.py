"""Which paths lie inside an offloadfs mount (to refuse loops and skip our own shims).

Reads /proc/self/mountinfo; callers on any thread. The daemon refuses a command whose path
resolves into such a mount, and the shim's local fallback skips such PATH entries.
"""
from __future__ import annotations

import os

FSTYPE = "fuse.offloadfs"
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space, and so on)."""
    if "\\" not in field:
        return field
    raw = field.encode().decode("unicode_escape").encode("latin-1")
    return raw.decode(errors="surrogateescape")


def parse(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every line of a mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and right.split():
            mounts.append((_unescape(fields[4]), right.split()[0]))
    return mounts


def _last_at(mount_point: str, path: str) -> list[str] | None:
    """The fields of the last mountinfo line at ``mount_point`` (the visible mount), its
    filesystem's fields after " - " last; None if nothing is mounted there."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == mount_point:
            return fields
    return None


def device(mount_point: str, path: str = MOUNTINFO) -> int | None:
    """The device number (st_dev) of the filesystem mounted at ``mount_point``, read from
    mountinfo's major:minor field (no stat: that could be a request to a FUSE server)."""
    fields = _last_at(mount_point, path)
    if fields is None:
        return None
    major, _, minor = fields[2].partition(":")
    return os.makedev(int(major), int(minor))


def owner(mount_point: str, path: str = MOUNTINFO) -> int | None:
    """The uid that mounted the FUSE filesystem at ``mount_point`` (its ``user_id=``
    super option), None if unknown."""
    return _owner(_last_at(mount_point, path) or [])


def _owner(fields: list[str]) -> int | None:
    """The ``user_id=`` super option of a mountinfo line's fields, None if it has none."""
    after = fields[fields.index("-") + 1:] if "-" in fields else []
    for option in (after[2] if len(after) > 2 else "").split(","):
        if option.startswith("user_id=") and option[8:].isdigit():
            return int(option[8:])
    return None


def offloadfs_owners(path: str = MOUNTINFO) -> dict[str, int | None]:
    """The offloadfs mount points this process sees, in mountinfo's order, each with the uid
    that mounted it (the last mount at a point is the one seen), in one read."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    owners: dict[str, int | None] = {}
    for line in lines:
        fields = line.split()
        after = fields[fields.index("-") + 1:] if "-" in fields else []
        if len(fields) < 5 or not after:
            continue
        point = _unescape(fields[4])
        owners.pop(point, None)   # mounted over: the last mount at a point is the one seen
        if after[0] == FSTYPE:
            owners[point] = _owner(fields)
    return owners


def offloadfs_mounts(path: str = MOUNTINFO) -> list[str]:
    """Mount points of offloadfs filesystems seen by this process."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return []
    return [mnt for mnt, fstype in parse(text) if fstype == FSTYPE]


def inside(path: str, mounts: list[str]) -> bool:
    """True if ``path`` is one of ``mounts`` or below one."""
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def resolves_into_offloadfs(path: str, mountinfo: str = MOUNTINFO) -> bool:
    """True if ``path`` (after symlinks) or its directory lies in an offloadfs mount."""
    return resolves_into(path, offloadfs_mounts(mountinfo))


def resolves_into(path: str, mounts: list[str]) -> bool:
    """True if ``path`` (after symlinks) or its directory lies in one of ``mounts``."""
    if not mounts:
        return False
    return inside(os.path.abspath(path), mounts) or inside(os.path.realpath(path), mounts)
