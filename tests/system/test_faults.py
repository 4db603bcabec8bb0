"""A misbehaving host and a host that dies after taking a job, against the VM side.

tests/data/fakehost.py speaks the wire protocol and misbehaves by command name (its docstring
lists how); tests/data/fakeworker.py joins a broker, takes one job, records that it ran it and
dies without a word. Whatever they do: nothing runs twice, nothing hangs, `always` never runs
locally, the mount's agent goes on serving the other host, and a client that gives up exits
255 with one line saying whether the job may have run.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..harness import DATA, OFFLD, Broker, Proc, accepts, free_port, started, wait_for

FAKE_COMMANDS = ("q_after_s", "exit_nostart", "overcredit", "unknown_kind", "double_exit",
                 "garbage", "silent", "oversize")
JOB = '#!/bin/sh\necho "$1 {where}" >> "$2"; sleep "${{3:-0}}"; echo "out $1"; exit 7\n'


class FakeHost(Proc):
    """tests/data/fakehost.py on an ephemeral loopback port (or another script of tests/data
    with its ``args``); start_fake makes them."""

    what = "the fake host"

    def __init__(self, workdir: Path, script: str = "fakehost.py", *args: str):
        """Start it and wait until it listens."""
        self.port = free_port()
        argv = [sys.executable, str(DATA / script), *(args or (str(self.port),))]
        super().__init__(argv, workdir / f"{script}-{time.monotonic_ns()}.log", cwd=workdir)
        if script == "fakehost.py":
            self.ready(lambda: accepts(self.port), "listen")
        self.hostport = f"127.0.0.1:{self.port}"


@pytest.fixture
def start_fake(tmp_path):
    """Factory of fake hosts and workers, killed at teardown (they never end by themselves)."""
    yield from started(functools.partial(FakeHost, tmp_path), lambda f: f.stop(signal.SIGKILL, 10))


@pytest.fixture
def setup(tmp_path, start_daemon, start_mount, start_fake, work):
    """A fake host and a real one (offering `job`), a mount of both, a local `job` and local
    stand-ins for the fake's commands, and the log where every run of `job` is recorded."""
    local = tmp_path / "local"
    local.mkdir()
    (tmp_path / "job-host").write_text(JOB.format(where="host"))
    (local / "job").write_text(JOB.format(where="local"))
    for name in FAKE_COMMANDS:
        (local / name).write_text(f'#!/bin/sh\necho "{name} local" >> "{tmp_path}/ran.log"\n')
    for path in [tmp_path / "job-host", local / "job", *(local / n for n in FAKE_COMMANDS)]:
        path.chmod(0o755)
    ran = tmp_path / "ran.log"
    ran.touch()
    fake = start_fake()
    real = start_daemon(commands={"job": str(tmp_path / "job-host")}, port=0)
    mount = start_mount("-H", fake.hostport, "-H", real.hostport, wait_for_shim="job")
    wait_for(lambda: (mount.path / "silent").exists(), 20, "the fake host's shims")
    env = dict(os.environ, PATH=f"{mount.path}:{local}:/usr/bin:/bin")
    return {"fake": fake, "real": real, "mount": mount, "env": env, "ran": ran, "work": work,
            "local": local}


def run(setup, *argv, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """A command through the mount (bounded: a hang fails the test, it does not stall it)."""
    return subprocess.run(list(argv), env=setup["env"], cwd=setup["work"], capture_output=True,
                          timeout=timeout, **kw)


def one_line(stderr: bytes) -> bool:
    """True if ``stderr`` is exactly one line."""
    return stderr.count(b"\n") == 1 and stderr.endswith(b"\n")


def ran_lines(setup) -> list[str]:
    """What the ran log holds, a line each."""
    return setup["ran"].read_text().splitlines()


@pytest.mark.parametrize("command", ["q_after_s", "exit_nostart"])
def test_an_illegal_step_fails_that_shim_alone_and_the_agent_goes_on(setup, command):
    """queued after started, or exit without started (defect 2): that shim gets 255 and one
    line; a job running meanwhile on the healthy host ends normally, and later ones run
    there, under `always` too."""
    mount = setup["mount"]
    subprocess.run(["setfattr", "-n", "user.offload.policy", "-v", "always",
                    str(mount.path / "job")], check=True)
    running = subprocess.Popen(["job", "1", str(setup["ran"]), "2"], env=setup["env"],
                               cwd=setup["work"], stdout=subprocess.PIPE)
    wait_for(lambda: "1 host" in setup["ran"].read_text(), 20, "job 1 to start")
    bad = run(setup, command, "x")
    assert bad.returncode == 255 and one_line(bad.stderr), bad
    assert b"never ran" not in bad.stderr and f"{command} local" not in ran_lines(setup)
    out, _ = running.communicate(timeout=30)
    assert (running.returncode, out) == (7, b"out 1\n")
    later = run(setup, "job", "2", str(setup["ran"]))
    assert later.returncode == 7 and "2 host" in ran_lines(setup)


@pytest.mark.parametrize("command", ["q_after_s", "exit_nostart", "unknown_kind", "garbage"])
def test_offld_ends_with_one_line_on_a_host_that_breaks_the_protocol(setup, command):
    """offld against the misbehaving host (defect 3): 255 and one line, never a hang."""
    got = subprocess.run([OFFLD, "-H", setup["fake"].hostport, "--", command], cwd=setup["work"],
                         capture_output=True, timeout=30)
    assert got.returncode == 255 and one_line(got.stderr), got


@pytest.mark.parametrize("command", ["unknown_kind", "garbage"])
def test_a_bad_message_after_started_is_never_taken_for_never_started(setup, command):
    """An unknown kind or junk frames after `started` (defect 5): 255, and no local re-run."""
    got = run(setup, command)
    assert got.returncode == 255 and one_line(got.stderr), got
    assert b"may have run" in got.stderr
    assert f"{command} local" not in ran_lines(setup)


def test_a_frame_over_the_size_limit_does_not_wedge_the_mount(setup):
    """oversize (defect 4): that job ends; the next job on the other host runs, and the
    fake host is used again (a new connection) once it behaves."""
    bad = run(setup, "oversize")
    assert bad.returncode == 255, bad
    got = run(setup, "job", "4", str(setup["ran"]))
    assert got.returncode == 7 and "4 host" in ran_lines(setup)
    wait_for(lambda: b"a new connection" in setup["mount"].log_path.read_bytes(), 20,
             "the mount to reconnect to the fake host")
    again = run(setup, "double_exit")
    assert again.stdout == b"once\n" and again.returncode == 0, again


def test_a_host_ignoring_its_credit_cannot_grow_the_mounts_memory(setup):
    """overcredit (defect 6): 300 MiB sent at once into a reader that waits: every byte
    arrives, and the mount stays under 100 MB."""
    got = subprocess.run("overcredit 300 | { sleep 2; wc -c; }", shell=True, env=setup["env"],
                         cwd=setup["work"], capture_output=True, timeout=60)
    assert got.stdout.strip() == str(300 << 20).encode(), got
    status = Path(f"/proc/{setup['mount'].proc.pid}/status").read_text()
    hwm_kb = int(status.split("VmHWM:")[1].split()[0])
    assert hwm_kb < 100 * 1024


@pytest.mark.parametrize("client", ["shim", "offld"])
def test_a_host_that_stops_naming_a_job_ends_it_as_unknown(setup, client, tmp_path):
    """silent (defect 7): the host answers pings but never names the job again; the job
    ends within the liveness bound (2 s here) with 255 and "unknown", not never."""
    cfg = tmp_path / "quick.toml"
    cfg.write_text("[client]\nliveness = 2.0\n")
    if client == "offld":
        argv = [OFFLD, "-c", str(cfg), "-H", setup["fake"].hostport, "--", "silent"]
        got = subprocess.run(argv, cwd=setup["work"], capture_output=True, timeout=30)
    else:
        got = run(setup, "silent", timeout=30)   # the mount's own liveness: 10 s
    assert got.returncode == 255 and one_line(got.stderr) and b"unknown" in got.stderr, got
    assert "silent local" not in ran_lines(setup)


def test_a_second_sigterm_ends_offld_at_once(setup):
    """offld always ends (defect 3): a host that says nothing after the signal is given a
    few seconds, then 255 and one line; a second SIGTERM ends offld at once."""
    for signals, bound in ((2, 3), (1, 15)):
        proc = subprocess.Popen([OFFLD, "-d", "-H", setup["fake"].hostport, "--", "silent"],
                                cwd=setup["work"], stderr=subprocess.PIPE)
        while b"started on" not in proc.stderr.readline():   # ends at EOF: then it fails
            assert proc.poll() is None, "offld ended before the job started"
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if signals == 2:   # a second one once the first went out (signals do not queue)
            while b"forwarding signal" not in proc.stderr.readline():
                assert proc.poll() is None, "offld ended before it forwarded the signal"
            proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=bound + 5)[1]
        errors = [line for line in err.splitlines() if b"debug:" not in line]
        assert proc.returncode == 255 and len(errors) == 1, err
        assert time.monotonic() - t < bound and b"unknown" in errors[0], err


def test_a_job_whose_host_died_after_taking_it_never_runs_again(start_fake, tmp_path, work,
                                                                start_mount):
    """Through a broker, a host takes the job and dies before `started` (defect 1): the
    shim (policy auto) and offld --fallback exit 255; the job ran once, never locally."""
    broker = Broker(tmp_path)
    try:
        ran = tmp_path / "ran.log"
        local = tmp_path / "local"
        local.mkdir()
        (local / "chaosjob").write_text('#!/bin/sh\necho "$1 local" >> "$3"\n')
        (local / "chaosjob").chmod(0o755)
        start_fake("fakeworker.py", broker.workers)
        mount = start_mount("-L", f"127.0.0.1:{broker.client_port}", wait_for_shim="chaosjob")
        env = dict(os.environ, PATH=f"{mount.path}:{local}:/usr/bin:/bin")
        got = subprocess.run(["chaosjob", "70", "0", str(ran)], env=env, cwd=work,
                             capture_output=True, timeout=30)
        assert got.returncode == 255 and one_line(got.stderr), got
        start_fake("fakeworker.py", broker.workers)
        wait_for(lambda: broker.log().count(" ready: ") >= 2, 20, "the second worker")
        got = subprocess.run([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--fallback",
                              str(local / "chaosjob"), "--", "chaosjob", "71", "0", str(ran)],
                             cwd=work, capture_output=True, timeout=30)
        assert got.returncode == 255 and one_line(got.stderr), got
        assert sorted(ran.read_text().splitlines()) == ["70 hx-ran", "71 hx-ran"]
    finally:
        broker.stop()


def test_a_shim_whose_mount_is_killed_exits_255_with_one_line(setup):
    """kill -9 of the mount while a shim waits (defect 8): 255 and one line."""
    proc = subprocess.Popen(["job", "8", str(setup["ran"]), "5"], env=setup["env"],
                            cwd=setup["work"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: "8 host" in setup["ran"].read_text(), 20, "job 8 to start")
    mount = setup["mount"]
    mount.proc.kill()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 255 and one_line(err), err
    mount.proc.wait(10)
    subprocess.run(["fusermount", "-u", "-z", str(mount.path)], check=False)
