"""End to end: ``offld`` against a real ``offloadd`` process, compared with running locally."""
from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys

import pytest
import zmq

from offloadfs import protocol

from ..harness import CONVERT, DATA, OFFLD, alive, free_port, offld, offld_argv, wait_for


def local(*command: str, cwd, **kw) -> subprocess.CompletedProcess:
    """Run ``command`` here, the reference for the offloaded run."""
    return subprocess.run(command, cwd=cwd, capture_output=True, timeout=60, **kw)


def read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    """One line of ``proc``'s stdout within ``timeout`` s, or fail."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no output line within {timeout}s")
    return proc.stdout.readline()


@pytest.fixture
def image(work):
    """A generated 600x400 test image in the work directory."""
    subprocess.run([CONVERT, "-size", "600x400", "plasma:fractal", "-seed", "7", "in.png"],
                   cwd=work, check=True)
    return work / "in.png"


def test_convert_output_is_byte_identical(daemon, work, image):
    """Real ImageMagick offloaded writes the same bytes as a local run."""
    args = ["in.png", "-blur", "0x4", "-resize", "50%"]
    local(CONVERT, *args, "local.ppm", cwd=work).check_returncode()
    result = offld(daemon, "convert", *args, "remote.ppm", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "remote.ppm").read_bytes() == (work / "local.ppm").read_bytes()


def test_convert_through_pipes_both_ways(daemon, work, image):
    """An image piped in and the result piped out equal the local pipeline."""
    data = image.read_bytes()
    want = local(CONVERT, "png:-", "-negate", "ppm:-", cwd=work, input=data).stdout
    got = offld(daemon, "convert", "png:-", "-negate", "ppm:-", cwd=work, input=data)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want


def test_binary_stdin_round_trips(daemon, work):
    """Five megabytes of random bytes come back from cat unchanged."""
    data = os.urandom(5 * 1024 * 1024)
    got = offld(daemon, "cat", cwd=work, input=data)
    assert got.returncode == 0 and got.stdout == data


def test_text_filter_in_a_pipeline(daemon, work):
    """stdin is a pipe, stdout is a pipe: a filter works as locally."""
    got = offld(daemon, "sh", "-c", "tr a-z A-Z", cwd=work, input=b"a\nb\n")
    assert got.stdout == b"A\nB\n"


@pytest.mark.parametrize("code", [0, 1, 7, 254])
def test_exit_codes(daemon, work, code):
    """The job's exit code is offld's."""
    assert offld(daemon, "sh", "-c", f"exit {code}", cwd=work).returncode == code


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_killed_by_signal_exits_128_plus_n(daemon, work, sig):
    """A job killed by signal N exits 128+N, like a shell reports it."""
    result = offld(daemon, "sh", "-c", f"kill -{int(sig)} $$", cwd=work)
    assert result.returncode == 128 + sig


def test_stderr_kept_apart_from_stdout(daemon, work):
    """stdout and stderr arrive on their own fds, each in order."""
    got = offld(daemon, "sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2", cwd=work)
    assert got.stdout == b"out1\nout2\n" and got.stderr == b"err1\nerr2\n"


def test_output_streams_while_the_job_runs(daemon, work):
    """The first line arrives while the job still runs."""
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo first; read x; echo second"),
                            cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert read_line(proc, 20) == b"first\n"
    assert proc.poll() is None
    out, _ = proc.communicate(b"go\n", timeout=30)
    assert out == b"second\n" and proc.returncode == 0


def test_ctrl_c_reaches_the_remote_job(daemon, work):
    """SIGINT to offld reaches the job's process group: its trap runs, then it exits 130."""
    script = 'trap "echo got-int; exit 130" INT; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", script), cwd=work,
                            stdout=subprocess.PIPE)
    assert read_line(proc, 20) == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out == b"got-int\n" and proc.returncode == 130


def test_ctrl_c_kills_a_job_without_a_trap(daemon, work):
    """A job that does not catch SIGINT dies of it: exit 130, nothing left running."""
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo $$ > pid; exec sleep 60"),
                            cwd=work)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid file"))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    wait_for(lambda: not alive(pid), 10, "the remote job to die")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM])
def test_other_signals_are_forwarded(daemon, work, sig):
    """USR1, HUP and TERM reach the job's trap."""
    name = signal.Signals(sig).name[3:]
    script = f'trap "echo got-{name}; exit 3" {name}; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", script), cwd=work,
                            stdout=subprocess.PIPE)
    assert read_line(proc, 20) == b"ready\n"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert out == f"got-{name}\n".encode() and proc.returncode == 3


def test_killed_client_gets_its_job_killed(daemon, work):
    """kill -9 of offld mid-job: the daemon kills the remote job."""
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo $$ > pid; exec sleep 60"),
                            cwd=work)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid file"))
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(pid), 15, "the orphaned job to be killed")
    assert "killed" in daemon.log()


def test_not_allowlisted_command_is_refused(daemon, work):
    """A command the host does not allow fails with one clear line and exit 255."""
    got = offld(daemon, "ls", "/", cwd=work)
    assert got.returncode == 255 and got.stdout == b""
    assert got.stderr.count(b"\n") == 1 and b"not an allowlisted command" in got.stderr


def test_path_is_refused_unless_it_is_the_allowlisted_path(daemon, work):
    """argv[0] as a path runs only if it is exactly the allowlisted path."""
    assert offld(daemon, "/bin/ls", cwd=work).returncode == 255
    assert offld(daemon, "/tmp/../bin/cat", cwd=work, input=b"x").returncode == 255
    assert offld(daemon, "/bin/cat", cwd=work, input=b"x").stdout == b"x"


def test_root_is_refused_without_allow_root(start_daemon, work):
    """A job claiming uid 0 is refused unless the daemon runs with --allow-root."""
    daemon = start_daemon(allow_root=False)
    got = offld(daemon, "sh", "-c", "touch ran", cwd=work)
    assert got.returncode == 255 and b"root" in got.stderr
    assert not (work / "ran").exists()


def test_job_runs_as_the_callers_uid_gid_and_groups(daemon):
    """The daemon (root) switches to the uid, gid and groups in the request."""
    frames = _raw_job(daemon, [b"sh", b"-c", b"id -u; id -g; id -G"], uid=65534, gid=65534,
                      groups=[65534, 100])
    out = b"".join(m.payload for m in frames if m.kind == "stdout")
    assert out.split() == [b"65534", b"65534", b"65534", b"100"]


def test_refused_connection_fails_at_once_with_one_line(work):
    """No daemon at the address: exit 255 and one line, without waiting out the timeout."""
    port = free_port()
    got = subprocess.run([OFFLD, "-H", f"127.0.0.1:{port}", "--", "true"],
                         cwd=work, capture_output=True, timeout=4)
    assert got.returncode == 255 and got.stderr.count(b"\n") == 1
    assert b"connection refused" in got.stderr


def test_silent_host_fails_after_the_connect_timeout(tmp_path, work):
    """A host that accepts but never answers: exit 255 with one line after connect_timeout."""
    import socket
    cfg = tmp_path / "c.toml"
    cfg.write_text("[client]\nconnect_timeout = 1.0\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        got = subprocess.run([OFFLD, "-c", str(cfg), "-H", f"127.0.0.1:{port}", "--", "true"],
                             cwd=work, capture_output=True, timeout=20)
    assert got.returncode == 255 and got.stderr.count(b"\n") == 1
    assert b"no answer" in got.stderr


def test_second_host_is_tried_when_the_first_refuses(daemon, work):
    """-H twice: a refusing first host is skipped, the job runs on the second."""
    got = subprocess.run([OFFLD, "-H", f"127.0.0.1:{free_port()}", "-H", daemon.hostport,
                          "--", "sh", "-c", "echo second"], cwd=work, capture_output=True,
                         timeout=20)
    assert got.returncode == 0 and got.stdout == b"second\n"


def test_daemon_survives_2000_malformed_messages(daemon, work):
    """Garbage on the wire is answered and logged sparingly; a good job then works."""
    subprocess.run([sys.executable, str(DATA / "bad_peer.py"), daemon.endpoint, "2000", "1"],
                   check=True, timeout=60)
    assert offld(daemon, "sh", "-c", "echo alive", cwd=work).stdout == b"alive\n"
    assert daemon.proc.poll() is None
    assert daemon.log().count("bad message") < 20


def test_queue_reports_position_and_runs_in_order(start_daemon, work):
    """With one slot, a second job is told it is queued and runs when the first ends."""
    daemon = start_daemon("--slots", "1")
    script = "echo go > started; while [ ! -e release ]; do sleep 0.02; done"
    first = subprocess.Popen(offld_argv(daemon, "sh", "-c", script), cwd=work)
    wait_for(lambda: (work / "started").exists(), 20, "the first job to start")
    second = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo second", opts=["-d"]),
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = b""
    while b"queued at position 1" not in log:
        ready, _, _ = select.select([second.stderr], [], [], 20)
        assert ready, "the second job was not reported queued"
        log += os.read(second.stderr.fileno(), 4096)
    (work / "release").touch()
    assert first.wait(30) == 0
    out, _ = second.communicate(timeout=30)
    assert out == b"second\n" and second.returncode == 0


def test_daemon_stop_ends_running_jobs_and_tells_clients(daemon, work):
    """SIGTERM to the daemon: the running job is killed, the client exits 255 with a line."""
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo $$ > pid; exec sleep 60"),
                            cwd=work, stderr=subprocess.PIPE)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid file"))
    assert daemon.stop() == 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255 and b"stopped" in err
    assert not alive(pid)


def test_dead_daemon_is_noticed_by_the_client(start_daemon, tmp_path, work):
    """kill -9 of the daemon mid-job: the client exits 255 within its liveness limit, and the
    job died with the daemon (tests/system/test_host_faults.py has the rest)."""
    daemon = start_daemon()
    cfg = tmp_path / "c.toml"
    cfg.write_text("[client]\nliveness = 2.0\n")
    proc = subprocess.Popen(offld_argv(daemon, "sh", "-c", "echo $$ > pid; exec sleep 60",
                                       opts=["-c", str(cfg)]), cwd=work, stderr=subprocess.PIPE)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid file"))
    daemon.proc.kill()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255 and b"lost contact" in err
    assert not alive(pid)


def test_output_option_writes_stdout_to_a_file(daemon, work):
    """-o FILE puts the job's stdout in FILE."""
    got = offld(daemon, "sh", "-c", "echo to-file; echo to-err >&2", cwd=work,
                opts=["-o", "out.txt"])
    assert got.returncode == 0 and got.stdout == b"" and got.stderr == b"to-err\n"
    assert (work / "out.txt").read_bytes() == b"to-file\n"


def test_profile_prints_every_stage(daemon, work):
    """-p prints the stage timings on stderr after the job."""
    got = offld(daemon, "true", cwd=work, opts=["-p"])
    line = got.stderr.decode()
    for stage in protocol.STAGES:
        assert f"{stage} " in line
    assert got.returncode == 0 and line.count("\n") == 1


def test_job_log_records_each_job_unless_q(daemon, work, tmp_path):
    """Each job leaves one JSON line with host, command, status and timings; -Q leaves none."""
    offld(daemon, "sh", "-c", "exit 3", cwd=work)
    offld(daemon, "true", cwd=work, opts=["-Q"])
    lines = (tmp_path / "state" / "offloadfs" / "jobs.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["command"] == ["sh", "-c", "exit 3"] and entry["status"] == 3
    assert set(entry["timings"]) >= {"connect", "queue", "run", "total"} and entry["host"]


def test_quiet_prints_nothing_of_its_own(daemon, work):
    """-q with -p and -d: only the job's own output."""
    got = offld(daemon, "sh", "-c", "echo hi", cwd=work, opts=["-q", "-p", "-d"])
    assert got.stdout == b"hi\n" and got.stderr == b""


def test_environment_passes_locale_never_path_or_ld(daemon, work):
    """LANG passes; the host's PATH is used; LD_PRELOAD and PYTHONPATH never pass."""
    env = dict(os.environ, LANG="C.UTF-8", LD_PRELOAD="/nonexistent.so", PYTHONPATH="/x",
               PATH=os.environ["PATH"] + ":/caller/only")
    got = offld(daemon, "env", cwd=work, env=env)
    seen = dict(line.split("=", 1) for line in got.stdout.decode().splitlines())
    assert seen["LANG"] == "C.UTF-8" and "/caller/only" not in seen["PATH"]
    assert "LD_PRELOAD" not in seen and "PYTHONPATH" not in seen and seen["HOME"] == "/root"


def test_config_file_sets_commands_and_slots(start_daemon, tmp_path, work):
    """offloadd reads [serve] and [commands] from its TOML file."""
    cfg = tmp_path / "d.toml"
    cfg.write_text('[serve]\nslots = 3\n[commands]\necho = "/bin/echo"\n')
    daemon = start_daemon("-c", str(cfg), commands={})
    assert offld(daemon, "echo", "hi", cwd=work).stdout == b"hi\n"
    assert "3 slots" in daemon.log()


def test_bad_daemon_flags_give_one_line(tmp_path):
    """A broken --command or config is one line and exit 2, no traceback."""
    for args in (["--command", "x"], ["--command", "x=relative"], ["--slots", "0"],
                 ["-c", str(tmp_path / "missing.toml")]):
        got = subprocess.run([OFFLD.replace("offld", "offloadd"), "serve", *args],
                             capture_output=True, timeout=20)
        assert got.returncode == 2 and got.stderr.count(b"\n") == 1, got.stderr


@pytest.mark.slow
def test_one_gigabyte_through_cat_in_bounded_memory(daemon, work, tmp_path):
    """1 GB through cat: the right bytes, and neither process grows past 150 MB."""
    rss = tmp_path / "rss"
    feed = subprocess.Popen(["head", "-c", str(10**9), "/dev/zero"], stdout=subprocess.PIPE)
    client = subprocess.Popen([sys.executable, str(DATA / "maxrss.py"), str(rss),
                               *offld_argv(daemon, "cat")], cwd=work, stdin=feed.stdout,
                              stdout=subprocess.PIPE)
    feed.stdout.close()
    digest, total = hashlib.sha256(), 0
    while chunk := client.stdout.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    assert client.wait(60) == 0 and feed.wait(10) == 0
    want = hashlib.sha256(b"\0" * 10**9).hexdigest()
    assert total == 10**9 and digest.hexdigest() == want
    assert int(rss.read_text()) / 1024 < 150
    assert daemon.vmhwm_mb() < 150


def _read(path) -> str | None:
    """The stripped text of ``path``, or None if it does not exist or is empty."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None



def _raw_job(daemon, argv: list[bytes], uid: int, gid: int, groups: list[int]) -> list:
    """Run a job with a hand-made submit; the messages until its exit."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    sock.send_multipart(protocol.encode("submit", "raw1", argv=argv, cwd=b"/", uid=uid,
                                        gid=gid, groups=groups, env={}, window=1 << 20))
    got = []
    try:
        while not got or got[-1].kind not in ("exit", "error"):
            assert sock.poll(20000), "no reply from the daemon"
            got.append(protocol.decode(sock.recv_multipart()))
    finally:
        sock.close()
        ctx.term()
    assert got[-1].kind == "exit", got[-1]
    return got


def test_oversize_frame_is_refused_without_buffering_it(daemon, work):
    """A 64 MiB frame is cut off at the size limit: the daemon neither dies nor buffers it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 2000
    sock.connect(daemon.endpoint)
    sock.send_multipart([b"\x81" + b"x" * (64 << 20)])
    sock.close()
    ctx.term()
    assert offld(daemon, "sh", "-c", "echo alive", cwd=work).stdout == b"alive\n"
    assert daemon.vmhwm_mb() < 64


def test_fallback_runs_locally_only_when_nothing_ran(daemon, work):
    """--fallback execs the local command when no host took the job, never after it ran."""
    port = free_port()
    got = subprocess.run([OFFLD, "-H", f"127.0.0.1:{port}", "--fallback", "/bin/sh", "--",
                          "sh", "-c", "echo local"], cwd=work, capture_output=True, timeout=20)
    assert got.returncode == 0 and got.stdout == b"local\n" and got.stderr == b""
    got = subprocess.run([OFFLD, "-H", daemon.hostport, "--fallback", "/bin/echo", "--",
                          "sh", "-c", "echo ran >> runs; exit 255"], cwd=work,
                         capture_output=True, timeout=20)
    assert got.returncode == 255 and (work / "runs").read_text() == "ran\n"


def test_config_file_from_the_environment(daemon, work, tmp_path):
    """OFFLOADFS_CONFIG names the config file when -c is not given."""
    cfg = tmp_path / "env.toml"
    cfg.write_text(f'[client]\nhosts = ["{daemon.hostport}"]\n')
    got = subprocess.run([OFFLD, "--", "sh", "-c", "echo via-env"], cwd=work,
                         capture_output=True, timeout=20,
                         env=dict(os.environ, OFFLOADFS_CONFIG=str(cfg)))
    assert got.stdout == b"via-env\n"
