"""Each job confined on the host: it enters its cwd as the caller, stays in its tree, gains no
privileges through setuid files, and runs under the host's [limits]."""
from __future__ import annotations

import os
import pwd
import select
import shutil
import subprocess

import pytest
from offloadd.runner import Process

from ..harness import COMMANDS, OFFLD, OFFLOADD, offld, test_user, wait_for
from .test_e2e import _raw_job


@pytest.fixture(autouse=True, params=["vfork", "fork"])
def spawn_path(request, monkeypatch) -> str:
    """Each test on both of the host's spawn paths: the compiled one (vfork, daemon/_spawn.c)
    and subprocess's fork with a preexec_fn, which offloadd falls back to without it
    (OFFLOADD_SPAWN=fork asks the daemons started here for it)."""
    if request.param == "fork":
        monkeypatch.setenv("OFFLOADD_SPAWN", "fork")
    else:
        monkeypatch.delenv("OFFLOADD_SPAWN", raising=False)
    return request.param


@pytest.fixture
def user(traversable) -> tuple[str, int]:
    """A non-root caller; the test's tmp dirs are traversable for it."""
    return test_user("offconf1")


@pytest.fixture
def open_work(work, traversable):
    """The caller's working directory, writable by the test user."""
    os.chmod(work, 0o777)
    return work


def offld_as(user, daemon, *command: str, cwd) -> subprocess.CompletedProcess:
    """``offld`` run by ``user`` (bounded); runuser resets PATH, so it is passed on."""
    argv = ["runuser", "-u", user[0], "--", "env", f"PATH={os.environ['PATH']}", OFFLD, "-Q",
            "-H", daemon.hostport, "--", *command]
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60)


def test_cpu_limit_stops_a_busy_loop(start_daemon, tmp_path, user, open_work):
    """cpu = 1 (a flag overriding the file's 100): a busy loop dies of SIGXCPU, exit 152."""
    cfg = tmp_path / "d.toml"
    cfg.write_text("[limits]\ncpu = 100\n")
    daemon = start_daemon("-c", str(cfg), "--limit", "cpu=1")
    got = offld_as(user, daemon, "sh", "-c", "while :; do :; done", cwd=open_work)
    assert got.returncode == 152, got.stderr


def test_memory_limit_makes_a_big_allocation_fail(start_daemon, tmp_path, user, open_work):
    """memory = "64M" from the file: a 1 MiB buffer works, a 256 MiB one cannot be had."""
    cfg = tmp_path / "d.toml"
    cfg.write_text('[limits]\nmemory = "64M"\n')
    daemon = start_daemon("-c", str(cfg))
    got = offld_as(user, daemon, "sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=1 "
                   "2>/dev/null && echo small-ok; dd if=/dev/zero of=/dev/null bs=256M count=1",
                   cwd=open_work)
    assert got.stdout == b"small-ok\n" and got.returncode == 1
    assert b"memory exhausted" in got.stderr


def test_open_files_limit_is_set_and_cannot_be_raised(start_daemon, user, open_work):
    """open_files = 64: soft and hard limit 64, the job cannot raise it, and no fd of the
    daemon leaks in despite the low limit."""
    daemon = start_daemon("--limit", "open_files=64")
    got = offld_as(user, daemon, "sh", "-c", "ulimit -n; ulimit -Hn; ls /proc/self/fd; "
                   "ulimit -n 1000 2>/dev/null && echo raised || echo refused", cwd=open_work)
    assert got.stdout.split() == [b"64", b"64", b"0", b"1", b"2", b"3", b"refused"], got


def test_file_size_limit_stops_a_big_write(start_daemon, user, open_work):
    """file_size = 1M: writing 3 MiB ends in SIGXFSZ (exit 153) with 1 MiB written."""
    daemon = start_daemon("--limit", "file_size=1M")
    got = offld_as(user, daemon, "sh", "-c", "head -c 3M /dev/zero > big", cwd=open_work)
    assert got.returncode == 153, got.stderr
    assert os.path.getsize(open_work / "big") == 1 << 20


def test_output_limit_kills_the_job_and_the_daemon_serves_on(start_daemon, work):
    """output = 1M: exactly 1 MiB passes; `yes` is killed past it and offld exits 255 with one
    clear line; the next job runs normally."""
    daemon = start_daemon("--limit", "output=1M", commands=COMMANDS | {"yes": "/usr/bin/yes"})
    exact = offld(daemon, "head", "-c", "1M", "/dev/zero", cwd=work)
    assert exact.returncode == 0 and len(exact.stdout) == 1 << 20
    got = offld(daemon, "yes", cwd=work, timeout=30)
    assert got.returncode == 255 and len(got.stdout) == 1 << 20
    assert got.stderr.count(b"\n") == 1, got.stderr
    assert b"the job's output passed the host's limit of 1.0 MiB; it was killed" in got.stderr
    assert offld(daemon, "sh", "-c", "echo next", cwd=work).stdout == b"next\n"


def test_cwd_is_entered_as_the_caller(start_daemon, tmp_path, user, open_work):
    """The host maps the cwd into a directory root may enter and the caller may not: the job
    fails with one line and exit 126 (entered as root, it would have run)."""
    hidden = tmp_path / "hostside"
    (hidden / "work").mkdir(parents=True)
    os.chmod(hidden, 0o700)
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[mounts]\npath_map = {{ "{open_work}" = "{hidden}/work" }}\n')
    daemon = start_daemon("-c", str(cfg))
    assert offld(daemon, "sh", "-c", "pwd", cwd=open_work).stdout == f"{hidden}/work\n".encode()
    got = offld_as(user, daemon, "sh", "-c", "echo ran", cwd=open_work)
    assert got.returncode == 126 and got.stdout == b""
    assert got.stderr == f"offloadd: cannot enter {hidden}/work as uid {user[1]}: " \
                         f"Permission denied\n".encode()


def test_a_cwd_leading_out_of_its_tree_is_refused_by_the_child(tmp_path):
    """A cwd that is a symlink out of the job's tree (as if swapped in after the server's
    check) is refused after the chdir, in the child: one line, exit 126; inside, it runs."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "sub").mkdir(parents=True)
    outside.mkdir()
    (tree / "link").symlink_to(outside)
    out, err, status = _run(Process("/bin/pwd", [b"pwd"], str(tree / "sub"), {}, None, str(tree)))
    assert (out, err, status) == (f"{tree}/sub\n".encode(), b"", 0)
    out, err, status = _run(Process("/bin/pwd", [b"pwd"], str(tree / "link"), {}, None, str(tree)))
    assert status == 126 and out == b""
    assert err == f"offloadd: cannot run in {tree}/link as uid 0: it is {outside}, outside " \
                  f"{tree}\n".encode()


def test_setuid_binary_gives_a_job_no_privileges(daemon, tmp_path, user, open_work):
    """A setuid-root copy of id run by a user's job reports the user's euid (no_new_privs);
    run directly by that user here, the same file reports euid 0."""
    suid = tmp_path / "suid"
    suid.mkdir()
    os.chmod(suid, 0o755)
    shutil.copy("/usr/bin/id", suid / "id")
    os.chown(suid / "id", 0, 0)
    os.chmod(suid / "id", 0o4755)
    here = subprocess.run(["runuser", "-u", user[0], "--", str(suid / "id"), "-u"],
                          capture_output=True, timeout=20)
    assert here.stdout == b"0\n", "the setuid bit does not work here: the test proves nothing"
    got = offld_as(user, daemon, "sh", "-c", f"{suid}/id -u", cwd=open_work)
    assert got.returncode == 0 and got.stdout == f"{user[1]}\n".encode(), got.stderr


def test_processes_limit_counts_the_callers_processes(start_daemon):
    """processes = 1: the job's shell is the user's one process, so it cannot fork."""
    daemon = start_daemon("--limit", "processes=1")
    uid = test_user("offconf2")[1]
    out, err, status = _job_as(daemon, [b"sh", b"-c", b"/bin/true && echo forked"], uid)
    assert out == b"" and status != 0 and b"fork" in err, (out, err, status)
    daemon = start_daemon("--limit", "processes=5")
    assert _job_as(daemon, [b"sh", b"-c", b"/bin/true && echo forked"], uid)[0] == b"forked\n"


@pytest.mark.parametrize("args", [
    ["--limit", "cpu"], ["--limit", "cpu=abc"], ["--limit", "cpu=0"], ["--limit", "cpu=1M"],
    ["--limit", "memory=12X"], ["--limit", "output=-1"], ["--limit", "nofile=10"],
    ["-c", "{cfg}"]])
def test_bad_limits_give_one_line_and_exit_2(tmp_path, args):
    """A bad --limit or [limits] value is one line and exit 2, no traceback, no daemon."""
    cfg = tmp_path / "d.toml"
    cfg.write_text('[limits]\nmemory = "lots"\n')
    argv = [OFFLOADD, "serve", "--listen", "tcp://127.0.0.1:0",
            *[a.format(cfg=cfg) for a in args]]
    got = subprocess.run(argv, capture_output=True, timeout=20)
    assert got.returncode == 2 and got.stderr.count(b"\n") == 1, got.stderr
    assert got.stderr.startswith(b"offloadd: ") and b"limit" in got.stderr


def _run(proc: Process) -> tuple[bytes, bytes, int]:
    """Drain a :class:`Process` (bounded), reap it, close it: (stdout, stderr, status)."""
    got = {"stdout": b"", "stderr": b""}
    proc.close("stdin")
    while proc.is_open("stdout") or proc.is_open("stderr"):
        fds = [proc.fds[name] for name in got if proc.is_open(name)]
        assert select.select(fds, [], [], 20)[0], "the process wrote nothing for 20 s"
        for name in got:
            if proc.is_open(name):
                got[name] += proc.read(name, 65536) or b""
    wait_for(proc.reap, 20, "the process to exit")
    proc.kill()
    return got["stdout"], got["stderr"], proc.status


def _job_as(daemon, argv: list[bytes], uid: int) -> tuple[bytes, bytes, int]:
    """Run a job as ``uid`` (its own gid, no groups) with a hand-made submit, cwd /:
    (stdout, stderr, exit status)."""
    got = _raw_job(daemon, argv, uid=uid, gid=pwd.getpwuid(uid).pw_gid, groups=[])
    out, err = (b"".join(m.payload for m in got if m.kind == name) for name in ("stdout", "stderr"))
    return out, err, got[-1]["status"]


def test_the_daemon_says_once_that_it_starts_jobs_by_fork(start_daemon, work, spawn_path):
    """On the fork path (OFFLOADD_SPAWN=fork) the daemon's log says so once, however many jobs
    it starts; on the compiled path (built by make install) it says nothing of it."""
    daemon = start_daemon()
    for n in range(3):
        assert offld(daemon, "sh", "-c", f"echo {n}", cwd=work).stdout == f"{n}\n".encode()
    said = [line for line in daemon.log().splitlines() if "jobs start by fork" in line]
    assert len(said) == (spawn_path == "fork"), daemon.log_tail()


def test_without_the_compiled_spawn_jobs_start_by_fork(tmp_path, monkeypatch, caplog):
    """offloadd._spawn missing at run time (an install without a C compiler): jobs still run,
    refusals are the same line, and one warning says why they start by fork."""
    from offloadd import runner
    monkeypatch.setattr(runner, "compiled", None)
    monkeypatch.setattr(runner, "_fallback_said", False)
    (tmp_path / "tree").mkdir()
    for _ in range(2):
        got = _run(Process("/bin/pwd", [b"pwd"], str(tmp_path / "tree"), {}, None, str(tmp_path)))
        assert got == (f"{tmp_path}/tree\n".encode(), b"", 0)
    got = _run(Process("/bin/pwd", [b"pwd"], str(tmp_path), {}, None, str(tmp_path / "tree")))
    assert got[1:] == (f"offloadd: cannot run in {tmp_path} as uid 0: it is {tmp_path}, "
                       f"outside {tmp_path}/tree\n".encode(), 126)
    said = [r.getMessage() for r in caplog.records if "jobs start by fork" in r.getMessage()]
    assert said == ["jobs start by fork and a preexec_fn (slower): offloadd._spawn is not built "
                    "(reinstall with a C compiler and python3-dev)"]


def test_a_read_takes_what_the_pipe_holds_up_to_the_credit(tmp_path):
    """Output is read as the pipe holds it, never more than asked (the client's credit): 25
    bytes read 10 at a time come whole and in order, then end of file closes the pipe."""
    (tmp_path / "tree").mkdir()
    proc = Process("/bin/sh", [b"sh", b"-c", b"printf %025d 7; exec >&-; sleep 0.1"],
                   str(tmp_path / "tree"), {}, None, str(tmp_path))
    proc.close("stdin")
    parts = []
    while proc.is_open("stdout"):
        assert select.select([proc.fds["stdout"]], [], [], 20)[0], "no output for 20 s"
        if (data := proc.read("stdout", 10)) is not None:
            parts.append(data)
    assert b"".join(parts) == b"0" * 24 + b"7" and all(len(p) <= 10 for p in parts), parts
    assert parts[-1] == b"" and not proc.is_open("stdout")
    wait_for(proc.reap, 20, "the process to exit")
    proc.kill()
    assert proc.status == 0
