"""offloadd.nfs: a FUSE NFSv4 client (libnfs) against a real nfs-ganesha on loopback.

Each test gets its own ganesha export over a temp dir (``server``) and, through ``start_fuse``,
``python -m offloadd.nfs`` mounted on a fresh directory under /tmp (reachable by other users,
unlike pytest's tmp_path). Server side = the exported directory itself.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from offloadd.nfs import binding
from offloadd.nfs.binding import NfsError
from offloadd.nfs.retry import once_more_if_broken

from offloadfs.export import ExportConfig, GaneshaExport

from ..harness import CONVERT, Proc, free_port, wait_for

NOBODY = pwd.getpwnam("nobody")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TIMEOUT = 2  # --timeout of the mounts: seconds before a call to a hung server fails

pytestmark = pytest.mark.skipif(not shutil.which("ganesha.nfsd"), reason="nfs-ganesha missing")


def mounted(path: Path) -> bool:
    """True if ``path`` is a mount point (per /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Server:
    """nfs-ganesha exporting ``root`` on 127.0.0.1:``port``."""

    def __init__(self, root: Path, port: int = 0):
        """Start it (and wait until it listens)."""
        self.root, self.port = root, port or free_port()
        self.export = GaneshaExport(ExportConfig("ganesha", str(root), f"127.0.0.1:{self.port}",
                                                 ["127.0.0.1"]))
        self.export.start()

    def stop(self) -> None:
        """Stop it (idempotent)."""
        if self.export.proc is not None and self.export.proc.poll() is None:
            os.kill(self.export.proc.pid, signal.SIGCONT)  # in case a test froze it
        self.export.stop()


class Fuse(Proc):
    """A ``python -m offloadd.nfs`` process (the harness's :class:`Proc`) and its mount point."""

    what = "nfsfuse"

    def __init__(self, server: Server, logdir: Path, *args: str):
        """Start it and wait (bounded) until the mount point is in mountinfo."""
        self.server = server
        self.mnt = Path(tempfile.mkdtemp(prefix="nfsfuse-mnt-", dir="/tmp"))
        self.mnt.chmod(0o755)
        argv = [sys.executable, "-m", "offloadd.nfs", f"127.0.0.1:{server.port}",
                str(server.root), str(self.mnt), "--foreground", "--timeout", str(TIMEOUT), *args]
        super().__init__(argv, logdir / f"nfsfuse-{time.monotonic_ns()}.log", cwd="/")
        self.ready(lambda: mounted(self.mnt), f"mount {self.mnt}")

    def unmount(self) -> int:
        """fusermount -u (if still mounted), then its exit code once it ends by itself within
        20 s (killed and a failure otherwise); again if called twice."""
        if mounted(self.mnt):
            subprocess.run(["fusermount", "-u", str(self.mnt)], check=True, timeout=30)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL, warn=lambda _: None)
            pytest.fail("nfsfuse did not exit within 20s of being unmounted")
        if self.mnt.exists() and not mounted(self.mnt):
            self.mnt.rmdir()
        return self.proc.returncode


@pytest.fixture
def server(tmp_path):
    """A ganesha export of tmp_path/export (root-owned 0755, with a 1777 ``pub`` inside)."""
    root = tmp_path / "export"
    root.mkdir()
    root.chmod(0o755)
    (root / "pub").mkdir()
    (root / "pub").chmod(0o1777)
    srv = Server(root)
    yield srv
    srv.stop()


@pytest.fixture
def start_fuse(server, tmp_path):
    """Factory: mount ``server`` with nfsfuse; every mount is unmounted and must exit 0."""
    started: list[Fuse] = []

    def start(*args: str) -> Fuse:
        fs = Fuse(server, tmp_path, *args)
        started.append(fs)
        return fs

    yield start
    codes = [fs.unmount() for fs in started]
    assert codes == [0] * len(codes), [fs.log() for fs in started]


@pytest.fixture
def fs(start_fuse) -> Fuse:
    """One mount."""
    return start_fuse()


def as_nobody(script: str, *args: str, groups: tuple[int, ...] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a Python ``script`` as nobody (with exactly ``groups`` as supplementary groups if
    given); stdout captured."""
    ids = ["--reuid", str(NOBODY.pw_uid), "--regid", str(NOBODY.pw_gid)]
    ids += ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", *ids, PY, "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, cwd="/")


# -- data path ----------------------------------------------------------------------------------

def test_read_a_file_written_on_the_server(server, fs):
    data = os.urandom(300_001) + b"\0end"
    (server.root / "made-there.bin").write_bytes(data)
    assert (fs.mnt / "made-there.bin").read_bytes() == data
    assert "made-there.bin" in os.listdir(fs.mnt)
    local, remote = os.stat(fs.mnt / "made-there.bin"), os.stat(server.root / "made-there.bin")
    assert (remote.st_size, remote.st_ino, remote.st_mtime_ns) == \
        (local.st_size, local.st_ino, local.st_mtime_ns)
    assert stat.S_ISDIR(os.stat(fs.mnt / "pub").st_mode)


@pytest.mark.parametrize("write_path", ["raw", "libnfs"])
def test_write_through_the_mount_byte_identical(server, start_fuse, write_path):
    fs = start_fuse("--write-path", write_path)
    data = os.urandom(1_500_003)
    (fs.mnt / "w.bin").write_bytes(data)
    assert (server.root / "w.bin").read_bytes() == data
    model = bytearray(data)
    fd = os.open(fs.mnt / "w.bin", os.O_RDWR)
    try:
        for offset, piece in ((10, b"middle"), (1_500_000, b"over the end"),
                              (2_000_000, b"after a hole")):
            assert os.pwrite(fd, piece, offset) == len(piece)
            model[len(model):offset] = bytes(max(0, offset - len(model)))
            model[offset:offset + len(piece)] = piece
        assert os.pread(fd, 20, 5) == bytes(model[5:25])
    finally:
        os.close(fd)
    assert (server.root / "w.bin").read_bytes() == bytes(model)
    assert (fs.mnt / "w.bin").read_bytes() == bytes(model)


def libnfs5() -> str | None:
    """The libnfs 5 the client would load ($OFFLOADFS_LIBNFS, else libnfs.so.14), or None."""
    try:
        _, abi = binding.load_libnfs()
    except binding.LibnfsUnavailable:
        return None
    return abi.name if abi.large_writes else None


@pytest.mark.skipif(libnfs5() is None, reason="no libnfs 5 here (Debian 13's libnfs14, or "
                    "OFFLOADFS_LIBNFS=/path/to/libnfs.so.14)")
def test_libnfs5_sends_large_writes_itself(server, start_fuse):
    """With libnfs 5 the client writes through libnfs by default, each FUSE write (more than
    libnfs 4.0's ~3.9 KiB) in one nfs_pwrite, and the bytes arrive intact."""
    fs = start_fuse("-v")
    data = os.urandom(8 * 1024 * 1024 + 5)
    (fs.mnt / "big5.bin").write_bytes(data)
    assert (server.root / "big5.bin").read_bytes() == data
    assert f"using {libnfs5()} (libnfs 5), libnfs writes" in fs.log()
    writes = [int(n) for n in re.findall(r" write /big5\.bin <(\d+) bytes>", fs.log())]
    assert sum(writes) == len(data) and max(writes) >= 128 * 1024
    assert "raw WRITE" not in fs.log()


@pytest.mark.parametrize("write_path", ["raw", "libnfs"])
def test_200mb_write_and_read_back_in_large_blocks(server, start_fuse, capsys, write_path):
    fs = start_fuse("-v", "--write-path", write_path)  # -v: check the block sizes FUSE uses
    size, block = 200 * 1024 * 1024, 1024 * 1024
    pattern = os.urandom(block + 7)
    want = hashlib.sha256()
    start = time.monotonic()
    with open(fs.mnt / "big.bin", "wb", buffering=0) as f:
        for i in range(size // block):
            chunk = pattern[i % 7:i % 7 + block]
            want.update(chunk)
            f.write(chunk)
    write_s = time.monotonic() - start
    assert os.path.getsize(server.root / "big.bin") == size
    with open(server.root / "big.bin", "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == want.hexdigest()
    start = time.monotonic()
    got = hashlib.sha256()
    with open(fs.mnt / "big.bin", "rb", buffering=0) as f:
        while chunk := f.read(block):
            got.update(chunk)
    read_s = time.monotonic() - start
    assert got.hexdigest() == want.hexdigest()
    writes = [int(n) for n in re.findall(r" write /big\.bin <(\d+) bytes>", fs.log())]
    reads = [int(n) for n in re.findall(r" read /big\.bin (\d+) \d+ ", fs.log())]
    assert sum(writes) == size and reads
    assert min(writes) >= 128 * 1024, "FUSE writes should come in blocks of 128 KiB or more"
    assert sum(reads) / len(reads) >= 64 * 1024, "FUSE reads should come in large blocks"
    with capsys.disabled():
        print(f"\nnfsfuse 200 MiB, {write_path} writes: write {size / write_s / 1e6:.0f} MB/s "
              f"({len(writes)} requests of {max(writes) // 1024} KiB), read "
              f"{size / read_s / 1e6:.0f} MB/s ({len(reads)} requests of {max(reads) // 1024} KiB)")


def test_many_reads_and_writes_of_one_open_file_at_once(server, fs):
    """Threads sharing one O_DIRECT descriptor (as fio's iodepth does): each 4 KiB block read
    back is the one on the server, each written block lands where it was written."""
    block, blocks = 4096, 512
    data = os.urandom(block * blocks)
    (server.root / "shared.bin").write_bytes(data)
    fd = os.open(fs.mnt / "shared.bin", os.O_RDWR | os.O_DIRECT)
    errors: list[str] = []

    def worker(first: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        for i in range(first, blocks, 8):
            if i % 2:
                buf[:] = bytes([i % 251]) * block
                if os.pwrite(fd, buf, i * block) != block:
                    errors.append(f"short write of block {i}")
            elif os.preadv(fd, [buf], i * block) != block or buf[:] != data[i * block:][:block]:
                errors.append(f"block {i} read back wrong")

    try:
        threads = [threading.Thread(target=worker, args=(k,), name=f"io-{k}") for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        os.close(fd)
    assert errors == []
    on_server = (server.root / "shared.bin").read_bytes()
    for i in range(blocks):
        want = bytes([i % 251]) * block if i % 2 else data[i * block:][:block]
        assert on_server[i * block:][:block] == want, i


# -- namespace and metadata ---------------------------------------------------------------------

def test_namespace_operations(server, fs):
    m, r = fs.mnt, server.root
    # create with mode (exclusive or not), O_EXCL on an existing file
    old_umask = os.umask(0)
    try:
        fd = os.open(m / "new.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.write(fd, b"hello\n")
        os.close(fd)
        with pytest.raises(FileExistsError):
            os.open(m / "new.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fd = os.open(m / "excl.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o604)
        os.close(fd)
        (m / "dir").mkdir(0o751)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(r / "new.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(r / "excl.txt").st_mode) == 0o604
    assert stat.S_IMODE(os.stat(r / "dir").st_mode) == 0o751
    for name in ("new.txt", "excl.txt"):  # not the exclusive-create verifier
        assert abs(os.stat(r / name).st_mtime - time.time()) < 60
        assert abs(os.stat(r / name).st_atime - time.time()) < 60
    # O_CREAT|O_TRUNC on an existing file, append
    (m / "new.txt").write_text("rewritten\n")
    with open(m / "new.txt", "a") as f:
        f.write("appended\n")
    assert (r / "new.txt").read_text() == "rewritten\nappended\n"
    (r / "new.txt").write_text("grown on the server side\n")  # O_APPEND goes to the real end
    time.sleep(1.1)  # attr_timeout
    with open(m / "new.txt", "a") as f:
        f.write("+\n")
    assert (r / "new.txt").read_text() == "grown on the server side\n+\n"
    # truncate by path and by fd
    os.truncate(m / "new.txt", 5)
    assert (r / "new.txt").read_bytes() == b"grown"
    with open(m / "new.txt", "r+b") as f:
        f.truncate(2)
        f.seek(0, os.SEEK_END)
        f.write(b"!")
    assert (r / "new.txt").read_bytes() == b"gr!"
    # rename, also over an existing file, and of a directory
    (m / "new.txt").rename(m / "dir" / "moved.txt")
    (r / "victim").write_text("old")
    (m / "excl.txt").write_text("winner")
    (m / "excl.txt").rename(m / "victim")
    assert (r / "victim").read_text() == "winner" and not (r / "excl.txt").exists()
    (m / "dir").rename(m / "dir2")
    assert (r / "dir2" / "moved.txt").read_bytes() == b"gr!"
    # symlink, readlink, hard link
    os.symlink("dir2/moved.txt", m / "link")
    assert os.readlink(m / "link") == "dir2/moved.txt" == os.readlink(r / "link")
    assert (m / "link").read_bytes() == b"gr!"
    assert stat.S_ISLNK(os.lstat(m / "link").st_mode)
    os.link(m / "victim", m / "hard")
    assert os.stat(m / "hard").st_nlink == 2 == os.stat(r / "victim").st_nlink
    assert os.stat(m / "hard").st_ino == os.stat(m / "victim").st_ino
    # chmod, chown, utime
    os.chmod(m / "victim", 0o600)
    assert stat.S_IMODE(os.stat(r / "victim").st_mode) == 0o600
    os.chown(m / "victim", NOBODY.pw_uid, -1)
    assert (os.stat(r / "victim").st_uid, os.stat(r / "victim").st_gid) == (NOBODY.pw_uid, 0)
    assert os.stat(r).st_uid == 0  # not its directory's (libnfs 5's nfs_chown would do that)
    os.utime(m / "victim", ns=(1_000_000_123_456_000, 1_200_000_654_321_000))
    st = os.stat(r / "victim")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123_456_000, 1_200_000_654_321_000)
    os.utime(m / "victim")  # now
    assert abs(os.stat(r / "victim").st_mtime - time.time()) < 60
    # unlink, rmdir and their errors
    with pytest.raises(NotADirectoryError):
        os.rmdir(m / "victim")
    with pytest.raises(OSError) as exc:
        os.rmdir(m / "dir2")
    assert exc.value.errno == errno.ENOTEMPTY
    for name in ("link", "hard", "victim", "dir2/moved.txt"):
        os.unlink(m / name)
    os.rmdir(m / "dir2")
    assert sorted(os.listdir(r)) == ["pub"] == sorted(os.listdir(m))
    with pytest.raises(FileNotFoundError):
        os.stat(m / "victim")
    assert os.statvfs(m).f_blocks > 0


def test_special_names_round_trip(server, fs):
    for name in (b"caf\xc3\xa9 space", b"latin1-\xe9", b"a" * 200):
        path = bytes(fs.mnt) + b"/" + name
        with open(path, "wb") as f:
            f.write(name)
        with open(bytes(server.root) + b"/" + name, "rb") as f:
            assert f.read() == name
    assert sorted(os.listdir(bytes(fs.mnt))) == sorted(os.listdir(bytes(server.root)))


def test_two_opens_of_one_file_and_metadata_changes_while_open(server, fs):
    (server.root / "shared.txt").write_text("0123456789")
    reader = open(fs.mnt / "shared.txt", "rb", buffering=0)
    writer = open(fs.mnt / "shared.txt", "r+b", buffering=0)
    try:
        os.chmod(fs.mnt / "shared.txt", 0o644)
        os.utime(fs.mnt / "shared.txt")
        os.truncate(fs.mnt / "shared.txt", 8)
        writer.write(b"ab")
        reader.close()  # closing one open must not break the other
        writer.seek(4)
        writer.write(b"cd")
    finally:
        reader.close()
        writer.close()
    assert (server.root / "shared.txt").read_bytes() == b"ab23cd67"


# -- credentials --------------------------------------------------------------------------------

def test_other_users_files_and_permissions(server, fs):
    (server.root / "pub" / "roots.txt").write_text("root's\n")
    (server.root / "pub" / "roots.txt").chmod(0o644)
    owned = server.root / "ownfile"  # the user's file in a directory they cannot write
    owned.write_text("mine\n")
    os.chown(owned, NOBODY.pw_uid, NOBODY.pw_gid)
    script = """
import errno, os, sys
m = sys.argv[1]
with open(m + "/pub/by-nobody.txt", "w") as f:
    f.write("made by nobody\\n")
os.mkdir(m + "/pub/dir-by-nobody")
os.symlink("by-nobody.txt", m + "/pub/link-by-nobody")
try:
    open(m + "/pub/roots.txt", "a").write("no")
    print("wrote")
except PermissionError:
    print("EACCES")
try:
    open(m + "/not-allowed-here", "w")
    print("created")
except PermissionError:
    print("EACCES")
with open(m + "/ownfile", "a") as f:
    f.write("appended by nobody\\n")
os.chmod(m + "/ownfile", 0o600)
print(open(m + "/ownfile").read(), end="")
fd = os.open(m + "/pub/read-only.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
os.write(fd, b"written after a read-only create")  # allowed: the open was for writing
os.close(fd)
"""
    done = as_nobody(script, str(fs.mnt))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["EACCES", "EACCES", "mine", "appended by nobody"]
    for name in ("by-nobody.txt", "dir-by-nobody", "link-by-nobody"):
        st = os.lstat(server.root / "pub" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), name
    assert (server.root / "pub" / "roots.txt").read_text() == "root's\n"
    assert not (server.root / "not-allowed-here").exists()
    assert stat.S_IMODE(os.stat(owned).st_mode) == 0o600
    read_only = server.root / "pub" / "read-only.txt"
    assert read_only.read_bytes() == b"written after a read-only create"
    assert stat.S_IMODE(os.stat(read_only).st_mode) == 0o444
    assert os.stat(read_only).st_uid == NOBODY.pw_uid


def test_supplementary_groups_reach_the_server(server, fs):
    group_dir = server.root / "team"
    group_dir.mkdir()
    os.chown(group_dir, 0, 4242)
    group_dir.chmod(0o770)
    script = "import sys; open(sys.argv[1] + '/team/' + sys.argv[2], 'w').write('x')"
    member = as_nobody(script, str(fs.mnt), "member.txt", groups=(4242,))
    assert member.returncode == 0, member.stderr
    assert os.stat(group_dir / "member.txt").st_uid == NOBODY.pw_uid
    outsider = as_nobody(script, str(fs.mnt), "outsider.txt")
    assert outsider.returncode != 0 and "PermissionError" in outsider.stderr
    assert not (group_dir / "outsider.txt").exists()
    # chmod g+s of one's own file keeps the bit only for a member of the file's group
    for name in ("sgid-member", "sgid-outsider"):
        (server.root / "pub" / name).write_text("x")
        os.chown(server.root / "pub" / name, NOBODY.pw_uid, 4242)
    chmod = "import os, sys; os.chmod(sys.argv[1], 0o2755)"
    assert as_nobody(chmod, f"{fs.mnt}/pub/sgid-member", groups=(4242,)).returncode == 0
    assert as_nobody(chmod, f"{fs.mnt}/pub/sgid-outsider").returncode == 0
    assert stat.S_IMODE(os.stat(server.root / "pub" / "sgid-member").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(server.root / "pub" / "sgid-outsider").st_mode) == 0o755


# -- a real program -----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(CONVERT), reason="ImageMagick missing")
def test_convert_in_the_mount_gives_the_same_pixels(server, fs, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    subprocess.run([CONVERT, "-size", "257x131", "-seed", "7", "plasma:fractal",
                    str(local / "in.png")], check=True, timeout=60)
    shutil.copy(local / "in.png", server.root / "in.png")
    ops = ["-resize", "61%", "-blur", "0x1.5", "-rotate", "17", "-quality", "92"]
    subprocess.run([CONVERT, str(local / "in.png"), *ops, str(local / "out.jpg")],
                   check=True, timeout=60)
    subprocess.run([CONVERT, "in.png", *ops, "out.jpg"], check=True, timeout=60, cwd=fs.mnt)

    def pixels(path: Path) -> bytes:
        return subprocess.run([CONVERT, str(path), "rgba:-"], check=True, timeout=60,
                              capture_output=True).stdout

    assert pixels(server.root / "out.jpg") == pixels(local / "out.jpg")
    assert (server.root / "out.jpg").read_bytes() == (local / "out.jpg").read_bytes()
    assert pixels(fs.mnt / "out.jpg") == pixels(local / "out.jpg")


# -- failures -----------------------------------------------------------------------------------

PROBE = """
import os, sys, time
m = sys.argv[1]
fd = os.open(m + "/kept-open.txt", os.O_RDONLY)
print("ready", flush=True)
sys.stdin.readline()
for name, op in [("stat", lambda: os.stat(m + "/never-seen-before")),
                 ("read", lambda: os.pread(fd, 10, 0)),
                 ("create", lambda: open(m + "/new-file", "w").close()),
                 ("listdir", lambda: os.listdir(m + "/pub"))]:
    start = time.monotonic()
    try:
        op()
        result = "ok"
    except OSError as exc:
        result = exc.strerror
    print(name, result, round(time.monotonic() - start, 1), flush=True)
os.close(fd)
"""


def _probe_after(server: Server, fs: Fuse, breaker) -> dict[str, tuple[str, float]]:
    """Open a file in the mount, ``breaker()`` the server, run operations: {op: (result, s)}."""
    (server.root / "kept-open.txt").write_text("contents\n")
    child = subprocess.Popen([PY, "-c", PROBE, str(fs.mnt)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert child.stdout.readline() == "ready\n"
        breaker()
        out, _ = child.communicate("go\n", timeout=20 * TIMEOUT + 30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    results = {}
    for line in out.splitlines():
        name, *result, seconds = line.split()
        results[name] = (" ".join(result), float(seconds))
    return results


def test_server_gone_operations_fail_fast_and_unmount_works(server, fs):
    results = _probe_after(server, fs, server.stop)
    assert set(results) == {"stat", "read", "create", "listdir"}
    for name, (result, seconds) in results.items():
        assert result == "Input/output error", (name, result, fs.log())
        assert seconds < 3 * TIMEOUT + 5, (name, seconds)
    assert fs.unmount() == 0
    assert not mounted(fs.mnt)


def test_hung_server_operations_time_out(server, fs):
    results = _probe_after(server, fs, lambda: os.kill(server.export.proc.pid, signal.SIGSTOP))
    for name, (result, seconds) in results.items():
        assert result == "Input/output error", (name, result, fs.log())
        assert seconds < 3 * TIMEOUT + 5, (name, seconds)
    assert "timed out" in fs.log()
    os.kill(server.export.proc.pid, signal.SIGCONT)  # back: the mount works again
    assert wait_for(lambda: _readable(fs.mnt / "kept-open.txt"), 10 * TIMEOUT, "recovery")


def _readable(path: Path) -> bool:
    """True if ``path`` can be read now."""
    try:
        return path.read_text() == "contents\n"
    except OSError:
        return False


def test_open_file_survives_a_server_restart(server, fs):
    (server.root / "long-lived.txt").write_text("before\n")
    with open(fs.mnt / "long-lived.txt", "r+b", buffering=0) as f:
        assert f.read() == b"before\n"
        port = server.port
        server.stop()
        server.export = Server(server.root, port).export  # same port, fresh NFSv4 state
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # so FUSE sees the read
        f.seek(0)
        assert f.read() == b"before\n"
        f.write(b"after\n")
    assert (server.root / "long-lived.txt").read_text() == "before\nafter\n"
    assert "reopened" in fs.log()


def test_sigterm_unmounts_and_exits_zero(server, fs):
    wait_for(lambda: "mounted" in fs.log(), 10, "the mounted line")  # libfuse handles signals
    fs.proc.send_signal(signal.SIGTERM)
    assert fs.proc.wait(20) == 0
    wait_for(lambda: not mounted(fs.mnt), 10, "the mount to go")
    assert "unmounted" in fs.log()


def test_unreachable_server_exits_1_with_a_reason(tmp_path):
    mnt = Path(tempfile.mkdtemp(prefix="nfsfuse-mnt-", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "-m", "offloadd.nfs",
                               f"127.0.0.1:{free_port()}", str(tmp_path), str(mnt),
                               "--foreground", "--timeout", "2"],
                              capture_output=True, text=True, timeout=60, cwd="/")
        assert done.returncode == 1
        assert "cannot mount" in done.stderr and len(done.stderr.strip().splitlines()) <= 3
        assert not mounted(mnt)
    finally:
        mnt.rmdir()


@pytest.mark.slow
def test_idle_open_file_keeps_its_lease(tmp_path, monkeypatch):
    """libnfs never sends RENEW: the keepalive must keep an idle open file's state alive."""
    import offloadfs.export as export_module

    plain = export_module.ganesha_config
    monkeypatch.setattr(export_module, "ganesha_config", lambda cfg: plain(cfg).replace(
        "Graceless = true;", "Graceless = true;\n    Lease_Lifetime = 25;"))
    root = tmp_path / "export"
    root.mkdir()
    srv = Server(root)
    try:
        fs = Fuse(srv, tmp_path)
        try:
            (root / "idle.txt").write_bytes(b"0123456789")
            with open(fs.mnt / "idle.txt", "r+b", buffering=0) as f:
                f.write(b"first\n")
                time.sleep(40)  # > lease: only renewals keep the open state
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(f.fileno(), 4, 6) == b"6789"  # a READ with the open's stateid
                f.write(b"second\n")
            assert (root / "idle.txt").read_bytes() == b"first\nsecond\n"
            assert not re.search("reopened|renewal|failed", fs.log()), fs.log()
        finally:
            assert fs.unmount() == 0
    finally:
        srv.stop()


class FakeContext:
    """Stands in for a libnfs Context: only ``broken`` matters to the retry rule."""

    def __init__(self, name: str):
        self.name, self.broken = name, False


def retry_case(outcomes: list):
    """Run once_more_if_broken with a session handing out fresh FakeContexts and a body that
    plays ``outcomes`` in turn ("ok", "broken": NfsError that breaks ctx, "error": one that
    does not); what happened, in order."""
    events, plays, names = [], iter(outcomes), iter("abc")

    @contextmanager
    def session():
        ctx = FakeContext(next(names))
        events.append(f"enter {ctx.name}")
        try:
            yield ctx
        except NfsError:
            events.append(f"failed {ctx.name}")  # e.g. a file context is given back here
            raise

    def body(ctx):
        play = next(plays)
        events.append(f"{play} {ctx.name}")
        if play == "ok":
            return ctx.name
        ctx.broken = play == "broken"
        raise NfsError(errno.EIO, play, "fake")

    try:
        events.append(("returned", once_more_if_broken(session, body,
                                                       lambda ctx: events.append(
                                                           f"recover {ctx.name}"))))
    except NfsError as exc:
        events.append(("raised", exc.message))
    return events


def test_retry_rule_without_a_server():
    assert retry_case(["ok"]) == ["enter a", "ok a", ("returned", "a")]
    assert retry_case(["broken", "ok"]) == [
        "enter a", "broken a", "failed a", "recover a", "enter b", "ok b", ("returned", "b")]
    assert retry_case(["error"]) == ["enter a", "error a", "failed a", ("raised", "error")]
    assert retry_case(["broken", "broken"]) == [
        "enter a", "broken a", "failed a", "recover a", "enter b", "broken b", "failed b",
        ("raised", "broken")]
    assert retry_case(["broken", "error"])[-1] == ("raised", "error")
