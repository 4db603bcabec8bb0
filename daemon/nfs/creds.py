"""AUTH_SYS credentials: root's, and those of the process making the current FUSE request."""
from __future__ import annotations

from offloadfs import fusebinding as fuse

ROOT = (0, 0, ())          # (uid, gid, supplementary groups)
MAX_GROUPS = 16            # AUTH_SYS carries at most 16 supplementary groups
MACHINE = b"offloadnfs"    # the machine name in our AUTH_SYS credentials


def caller() -> tuple:
    """(uid, gid, groups) of the process making the current FUSE request."""
    uid, gid, pid = fuse.fuse_get_context()
    return uid, gid, groups_of(pid, gid)


def groups_of(pid: int, gid: int) -> tuple:
    """Supplementary groups of thread ``pid`` (at most MAX_GROUPS), from /proc."""
    if pid <= 0:
        return ()
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    groups = [int(g) for g in line.split()[1:]]
                    return tuple(g for g in groups if g != gid)[:MAX_GROUPS]
    except (OSError, ValueError):
        pass
    return ()
