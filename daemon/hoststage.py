"""The host's side of staging (``offld -n``): a staged job's scratch directory, its input files
as they arrive, and the files it changed, for the way back.

The file rules (atomic writes, what counts as changed) are ``offloadfs.staging``'s, shared
with the VM's side; this module keeps one job's use of them on the host.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from offloadfs import staging

from . import limits

UNANNOUNCED = "file data the job did not announce"


class HostStage:
    """One staged job's scratch directory, owned by its caller (``uid``, ``gid``), that
    ``announced`` bytes of input files fill. The server's loop thread calls everything: it
    makes one at submit (OSError if the directory cannot be made), calls :meth:`take` for
    each ``file`` chunk and :meth:`complete` after it, :meth:`outbox` once the job ended, and
    :meth:`close` when the job is forgotten."""

    def __init__(self, parent: str, uid: int, gid: int, announced: int):
        """A fresh scratch directory under ``parent``; no input yet."""
        self.dir = scratch(parent, uid, gid)
        self.uid = uid
        self.inbox = staging.Inbox(self.dir, (uid, gid))
        self.left = announced
        self.before: dict | None = None
        self._outbox: staging.Outbox | None = None

    def take(self, name: bytes, mode: int, last: bool, data: bytes) -> str | None:
        """Write one chunk of an input file; None, or why the job fails."""
        if len(data) > self.left:
            return UNANNOUNCED
        if name not in self.inbox.open and len(self.inbox.open) >= limits.STAGE_OPEN:
            return f"more than {limits.STAGE_OPEN} input files at once"
        try:
            self.inbox.write(name, mode, last, data)
        except OSError as exc:
            return f"cannot write {os.fsdecode(name)}: {exc.strerror}"
        self.left -= len(data)
        return None

    def complete(self) -> bool:
        """True once, when every input byte is in: then note what is there."""
        if self.left == 0 and not self.inbox.open and self.before is None:
            self.before = staging.snapshot(self.dir)
            return True
        return False

    def outbox(self) -> staging.Outbox:
        """The files the job created or changed, to send back."""
        if self._outbox is None:
            names = staging.changed(self.dir, self.before or {}, self.uid)
            self._outbox = staging.Outbox(self.dir, names)
        return self._outbox

    def close(self) -> None:
        """Drop what is left: open files, half-written input, the directory."""
        if self._outbox is not None:
            self._outbox.close()
        self.inbox.discard()
        shutil.rmtree(self.dir, ignore_errors=True)


def scratch(parent: str, uid: int, gid: int) -> str:
    """A fresh 0700 directory for a staged job, owned by its caller."""
    os.makedirs(parent, mode=0o711, exist_ok=True)
    path = tempfile.mkdtemp(prefix="job-", dir=parent)
    os.chown(path, uid, gid)
    return path
