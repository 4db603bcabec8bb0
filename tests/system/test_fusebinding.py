"""The shim mount under each FUSE binding this machine has (fusebinding): fusepy on libfuse 2
(Debian's python3-fusepy, the fallback), mfusepy on libfuse 2 and on libfuse 3; and the
default choice serving more waiting shims than libfuse 3.14 has threads."""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import select
import signal
import subprocess

import pytest

from ..harness import marker_dir

VARIANTS = {  # name: (environment of the mount, module needed, libfuse needed)
    "fusepy": ({"OFFLOADFS_FUSE": "fusepy"}, "fuse", "libfuse.so.2"),
    "mfusepy-libfuse2": ({"OFFLOADFS_FUSE": "mfusepy", "FUSE_LIBRARY_NAME": "fuse"},
                         "mfusepy", "libfuse.so.2"),
    "mfusepy-libfuse3": ({"OFFLOADFS_FUSE": "mfusepy", "FUSE_LIBRARY_NAME": "fuse3"},
                         "mfusepy", "libfuse3.so"),
}
WAITING = 12   # shims waiting at once: more than libfuse 3.14's 10 worker threads


def missing(module: str, lib: str) -> str | None:
    """Why a variant cannot run here, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    names = [lib] if lib.endswith(".2") else ["libfuse3.so.4", "libfuse3.so.3"]
    for name in names:
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            pass
    return f"{lib} is not installed"


def libfuse_of(pid: int) -> str:
    """Which libfuse process ``pid`` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return "libfuse3.so" if "libfuse3.so" in maps else "libfuse.so.2" if "libfuse.so.2" in maps \
        else "none"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_shim_mount_works_under_each_binding(variant, start_daemon, start_mount, tmp_path):
    """Mounted with that binding and libfuse, a shim runs on the host, the directory refuses
    changes with EROFS as before (mfusepy would answer ENOSYS for what ShimFS does not
    define), and SIGTERM answers a waiting shim and ends the mount with status 0."""
    env, module, lib = VARIANTS[variant]
    if why := missing(module, lib):
        pytest.skip(why)
    marker = marker_dir(tmp_path / "mark")
    host = start_daemon(marker=marker)
    mount = start_mount(hosts=[host.hostport], wait_for_shim="cat", env={**os.environ, **env})
    assert libfuse_of(mount.proc.pid) == lib.rstrip(".")
    got = subprocess.run([str(mount.path / "cat"), str(marker / "where")], capture_output=True,
                         timeout=60)
    assert (got.returncode, got.stdout) == (0, b"host\n"), got.stderr
    for attempt in (lambda: os.mkdir(mount.path / "d"), lambda: open(mount.path / "new", "w"),
                    lambda: os.unlink(mount.path / "cat"),
                    lambda: os.rename(mount.path / "cat", mount.path / "dog")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    waiting = subprocess.Popen([str(mount.path / "cat")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiting.stdin.write(b"up\n")
    waiting.stdin.flush()
    assert waiting.stdout.readline() == b"up\n"   # its job runs; the shim waits in its read
    mount.proc.send_signal(signal.SIGTERM)       # as systemd stops it
    # answered at once (loop_ended_probe): 255 and its line. Its stdin stays open until then
    # (communicate() would close it first: cat's EOF, and a clean exit 0, could win the race)
    assert waiting.wait(timeout=30) == 255
    waiting.stdin.close()
    assert b"offloadfs" in waiting.stderr.read()
    waiting.stdout.close()
    waiting.stderr.close()
    assert mount.proc.wait(20) == 0, mount.log()  # libfuse 3's fuse_main says 8 here


def test_more_waiting_shims_than_libfuse_3_14_has_threads(start_daemon, start_mount, tmp_path):
    """With the binding chosen by default, 12 shims whose jobs are running (each holds a FUSE
    thread in its read) leave the mount serving: a 13th shim runs and the directory lists."""
    host = start_daemon("--slots", str(WAITING + 1), commands={"cat": "/bin/cat"})
    mount = start_mount(hosts=[host.hostport], wait_for_shim="cat")
    shims = [subprocess.Popen([str(mount.path / "cat")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for _ in range(WAITING)]
    try:
        for i, shim in enumerate(shims):   # each job answers: running, its shim in its read
            shim.stdin.write(b"%d\n" % i)
            shim.stdin.flush()
            ready, _, _ = select.select([shim.stdout], [], [], 30)
            assert ready, f"shim {i + 1} of {WAITING} got no answer within 30 s: mount stalled"
            assert shim.stdout.readline() == b"%d\n" % i
        got = subprocess.run([str(mount.path / "cat")], input=b"13th\n", capture_output=True,
                             timeout=30)
        assert (got.returncode, got.stdout) == (0, b"13th\n")
        assert "cat" in os.listdir(mount.path)
    finally:
        for shim in shims:
            shim.stdin.close()
        codes = [shim.wait(60) for shim in shims]
        for shim in shims:
            shim.stdout.close()
    assert codes == [0] * WAITING
