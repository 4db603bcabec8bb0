"""A FUSE filesystem mounted without auto_unmount: killed, it leaves a stale mount
("Transport endpoint is not connected") for tests of mounting over one.

    python stale_fuse.py MOUNTPOINT
"""
import errno
import stat
import sys

from offloadfs.fusebinding import FUSE, FuseOSError, Operations


class Empty(Operations):
    """An empty directory."""

    def getattr(self, path, fh=None):
        """Only the root exists."""
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}

    def readdir(self, path, fh):
        """Nothing in it."""
        return [".", ".."]


FUSE(Empty(), sys.argv[1], foreground=True)
