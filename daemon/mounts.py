"""The host's mounts of VMs' exports: one per (server, export), shared, cached, unmounted idle.

The server's loop thread calls :meth:`MountTable.attach`, :meth:`release`, :meth:`tick`,
:meth:`ready` and :meth:`close`. Making a mount takes a while (a process to start, a server to
reach), so it happens on a short-lived worker thread (``offloadd-mount``); its result comes back
through a queue and the loop's wake-up pipe, and :meth:`ready` hands it to the waiting jobs'
callbacks on the loop thread. Concurrent first jobs for one export wait for the same mount.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from offloadfs import mountinfo

log = logging.getLogger("offloadd")

CLIENTS = ("kernel", "userspace")
# The kernel client's options after vers=4,port=N: hard (a job's I/O waits out a slow or
# restarting VM rather than failing), timeo in tenths of a second before a retransmission.
# A slow link wants more (``[mounts] options``, docs/deployment.md).
DEFAULT_MOUNT_OPTIONS = "hard,timeo=50"


class MountError(Exception):
    """An export could not be mounted (or has gone stale and could not be remade)."""


@dataclasses.dataclass
class Mount:
    """One mounted export and who uses it."""

    key: tuple[str, str]
    path: str
    users: int = 0
    idle_since: float = 0.0
    proc: subprocess.Popen | None = None
    waiting: list = dataclasses.field(default_factory=list)
    ready: bool = False


class MountTable:
    """Mounts of (server, export) pairs under ``root``, made with the ``client`` chosen."""

    def __init__(self, root: str, client: str, idle_unmount: float, wake: Callable[[], None],
                 options: str = DEFAULT_MOUNT_OPTIONS):
        """Nothing is mounted yet; ``wake`` pokes the loop when a mount is done; ``options``
        go to the kernel client."""
        if client not in CLIENTS:
            raise ValueError(f"mounts client {client!r}: expected kernel or userspace")
        self.root, self.client, self.idle_unmount, self.wake = root, client, idle_unmount, wake
        self.options = options
        self.mounts: dict[tuple[str, str], Mount] = {}
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def attach(self, server: str, export: str, callback: Callable) -> None:
        """Call ``callback(path or MountError)`` on the loop thread once the export is
        mounted; the caller then owns one use of it (see :meth:`release`)."""
        key = (server, export)
        mount = self.mounts.get(key)
        if mount is not None and mount.ready and not _stale(mount):
            mount.users += 1
            callback(mount.path)
            return
        if mount is None or mount.ready:
            if mount is not None:
                log.warning("mount of %s:%s at %s went stale; remaking it", server, export,
                            mount.path)
                self._unmount(mount)
            mount = self.mounts[key] = Mount(key, self._path(key))
            self._make(mount)
        mount.waiting.append(callback)

    def release(self, server: str, export: str) -> None:
        """A job is done with the export."""
        mount = self.mounts.get((server, export))
        if mount is not None and mount.users > 0:
            mount.users -= 1
            if mount.users == 0:
                mount.idle_since = time.monotonic()

    def ready(self) -> None:
        """Hand finished mounts to their waiting jobs (loop thread, after a wake-up)."""
        while not self.done.empty():
            mount, error = self.done.get()
            waiting, mount.waiting = mount.waiting, []
            if error is not None:
                self.mounts.pop(mount.key, None)
            else:
                mount.ready = True
                mount.users += len(waiting)
                mount.idle_since = time.monotonic()
            for callback in waiting:
                callback(error if error is not None else mount.path)
        self.threads = [t for t in self.threads if t.is_alive()]

    def tick(self, now: float) -> None:
        """Unmount mounts idle for longer than ``idle_unmount``."""
        for mount in list(self.mounts.values()):
            if mount.ready and mount.users == 0 and now - mount.idle_since > self.idle_unmount:
                log.info("unmounting idle %s:%s from %s", *mount.key, mount.path)
                self._unmount(mount)
                del self.mounts[mount.key]

    def close(self) -> None:
        """Unmount everything (daemon stop)."""
        for thread in self.threads:
            thread.join(30)
        self.ready()
        for mount in list(self.mounts.values()):
            self._unmount(mount)
        self.mounts.clear()

    def _path(self, key: tuple[str, str]) -> str:
        """A stable mount point for an export under ``root``."""
        digest = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:16]
        return os.path.join(self.root, digest)

    def _make(self, mount: Mount) -> None:
        """Mount on a worker thread; the result goes to the ``done`` queue."""
        thread = threading.Thread(target=self._mount_worker, args=(mount,),
                                  name="offloadd-mount", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _mount_worker(self, mount: Mount) -> None:
        """Worker thread: make the mount, report the outcome, wake the loop."""
        try:
            os.makedirs(mount.path, exist_ok=True)
            _clear(mount.path)
            mount.proc = self._mount(mount)
            log.info("mounted %s:%s at %s (%s)", *mount.key, mount.path, self.client)
            self.done.put((mount, None))
        except (MountError, OSError) as exc:
            log.warning("cannot mount %s:%s: %s", *mount.key, exc)
            self.done.put((mount, MountError(f"cannot mount {mount.key[0]}:{mount.key[1]}: "
                                             f"{exc}")))
        self.wake()

    def _mount(self, mount: Mount) -> subprocess.Popen | None:
        """Make the mount with the configured client; the userspace client's process."""
        server, export = mount.key
        if self.client == "kernel":
            _run(kernel_mount_command(server, export, mount.path, self.options))
            return None
        logfile = mount.path + ".log"
        with open(logfile, "ab") as log_out:
            proc = subprocess.Popen([sys.executable, "-m", "offloadd.nfs", server, export,
                                     mount.path, "--foreground"], stdin=subprocess.DEVNULL,
                                    stdout=log_out, stderr=log_out, start_new_session=True)
        deadline = time.monotonic() + 20
        while not _is_mounted(mount.path):
            if proc.poll() is not None:
                raise MountError(_last_line(_read(logfile)) or f"exit {proc.returncode}")
            if time.monotonic() > deadline:
                _stop(proc)
                raise MountError("the NFS client did not mount within 20s")
            time.sleep(0.02)
        return proc

    def _unmount(self, mount: Mount) -> None:
        """Unmount (lazily, so a busy or dead mount never blocks) and stop its process."""
        if _is_mounted(mount.path):
            tool = "umount" if self.client == "kernel" else "fusermount"
            args = ["-l"] if self.client == "kernel" else ["-u", "-z"]
            subprocess.run([tool, *args, mount.path], capture_output=True, timeout=30)
        if mount.proc is not None:
            _stop(mount.proc)
            mount.proc = None


def kernel_mount_command(server: str, export: str, path: str, options: str) -> list[str]:
    """mount(8)'s command line for an export ``server`` (HOST:PORT) names."""
    host, _, port = server.rpartition(":")
    return ["mount", "-t", "nfs4", "-o", f"vers=4,port={port},{options}", f"{host}:{export}",
            path]


def _is_mounted(path: str) -> bool:
    """True if ``path`` is a mount point in this process's namespace."""
    with open(mountinfo.MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return any(mnt == path for mnt, _ in mountinfo.parse(f.read()))


def _stale(mount: Mount) -> bool:
    """True if a mount is gone or its userspace client died. (No stat of the mount: on the
    loop thread that could hang on a server that went away.)"""
    if mount.proc is not None and mount.proc.poll() is not None:
        return True
    return not _is_mounted(mount.path)


def _clear(path: str) -> None:
    """Lazily unmount whatever is left at ``path`` (a stale mount from an earlier life)."""
    if _is_mounted(path):
        subprocess.run(["fusermount", "-u", "-z", path], capture_output=True, timeout=30)
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def _stop(proc: subprocess.Popen) -> None:
    """TERM, then KILL, and reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(argv: list[str]) -> None:
    """Run a command; MountError with its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise MountError(_last_line(done.stderr) or f"{argv[0]} exited {done.returncode}")


def _read(path: str) -> str:
    """A small log file's text ("" if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4096:]
    except OSError:
        return ""


def _last_line(text) -> str:
    """The last non-empty line of a command's output."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
