"""Waits a user can see: the queue notice of ``offld`` at a real terminal (and none on a pipe),
a shim run right after the mount started (before its host answered), and the mount's warning
when no host answers. Real daemons, a real FUSE mount, a real pty.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import zmq

from offloadfs.channel import Channel

from ..harness import DATA, OFFLD, free_port, marker_dir, wait_for
from .test_terminal import Shell

HOLD = 3.0   # seconds the slow host's relay holds its first answer
NOTICE = rb"\roffld: waiting for a slot on 127\.0\.0\.1:%d \(position 1\)\x1b\[K"


def welcome(daemon) -> dict:
    """The daemon's welcome now (its busy slots and queue length)."""
    ctx = zmq.Context()
    channel = Channel(ctx, daemon.endpoint)
    try:
        return channel.hello(5.0).fields
    finally:
        channel.close(0)
        ctx.term()


@pytest.fixture
def one_slot(start_daemon, work):
    """A daemon with one slot, kept busy by ``offld -- cat`` reading a pipe we hold: closing
    its stdin (``one_slot.release()``) frees the slot."""
    daemon = start_daemon("--slots", "1")
    blocker = subprocess.Popen([OFFLD, "-Q", "-H", daemon.hostport, "--", "cat"], cwd=work,
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    daemon.release = blocker.stdin.close
    try:
        wait_for(lambda: welcome(daemon)["busy"] == 1, 20, "the blocker to take the slot")
        yield daemon
    finally:
        if not blocker.stdin.closed:
            blocker.stdin.close()
        assert blocker.wait(30) == 0


def test_at_a_terminal_a_queued_job_shows_a_notice_then_its_own_output(one_slot, work):
    """`offld -- sh -c 'echo hello'` at a terminal while the one slot is busy: after a second
    a one-line notice with the queue position, erased when the job starts, so the screen then
    shows the job's output and the status is the job's."""
    shell = Shell(work, "/usr/bin:/bin", prefix=f"offld -Q -H {one_slot.hostport} -- ".encode())
    try:
        shell.line(b"sh -c 'echo hello; exit 3'; echo \"rc=$?\"")
        assert shell.expect(NOTICE % one_slot.port, 15), shell.buf
        one_slot.release()
        assert shell.expect(rb"\x1b\[K\r\x1b\[Khello\r\nrc=3\r\n", 20), shell.buf
        assert shell.buf.count(b"waiting for a slot") == 1   # one line, never repeated
    finally:
        shell.close()


def test_a_shim_at_a_terminal_shows_the_same_notice(one_slot, start_mount, tmp_path, work):
    """A shim's job queued on the host: the caller's terminal shows the notice (the mount's),
    erased before the job's output; the status is the job's."""
    config = tmp_path / "vm.toml"
    config.write_text(f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    mount = start_mount(hosts=[one_slot.hostport], config=str(config), wait_for_shim="sh")
    shell = Shell(work, str(mount.path))
    try:
        shell.line(b"sh -c 'echo hello; exit 3'; echo \"rc=$?\"")
        assert shell.expect(NOTICE.replace(b"offld", b"offloadfs") % one_slot.port, 15), \
            shell.buf
        one_slot.release()
        assert shell.expect(rb"\x1b\[K\r\x1b\[Khello\r\nrc=3\r\n", 20), shell.buf
    finally:
        shell.close()


def test_on_a_pipe_a_queued_job_prints_no_notice(one_slot, work):
    """The same wait with stderr on a pipe: not a byte of ours on stderr."""
    job = subprocess.Popen([OFFLD, "-Q", "-H", one_slot.hostport, "--", "sh", "-c",
                            "echo hello; echo err >&2"], cwd=work, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    wait_for(lambda: welcome(one_slot)["queued"] == 1, 20, "the job to be queued")
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(2.0)   # it waits past the notice's delay
    one_slot.release()
    out, err = job.communicate(timeout=30)
    assert (job.returncode, out, err) == (0, b"hello\n", b"err\n")


@pytest.fixture
def slow_host(start_daemon, tmp_path):
    """A marker daemon behind a relay that holds what it sends on a new connection for HOLD
    seconds: a host slow to answer its first hello. (daemon, relay port, marker dir)"""
    marker = marker_dir(tmp_path / "mark")
    daemon = start_daemon(marker=marker)
    relay = subprocess.Popen([sys.executable, str(DATA / "tcp_tap.py"), str(daemon.port),
                              "/dev/null", str(HOLD)], stdout=subprocess.PIPE, text=True)
    try:
        yield daemon, int(relay.stdout.readline()), marker
    finally:
        relay.kill()
        relay.wait()
        relay.stdout.close()


def test_a_shim_run_before_its_host_answered_waits_and_runs_there(slow_host, start_mount,
                                                                   tmp_path, work):
    """A policy `always` kept by an earlier mount lists the shim before the host answered:
    run at once, it waits for the host's first answer and runs there (not refused, not
    local)."""
    _, port, marker = slow_host
    mount = start_mount(hosts=[f"127.0.0.1:{port}"], config=always_cat(tmp_path),
                        wait_for_shim="cat")
    assert " is up" not in mount.log()   # the race: the shim is there, the host not yet
    got = subprocess.run(["cat", f"{marker}/where"], cwd=work, env=mount.env(),
                         capture_output=True, timeout=60)
    assert (got.returncode, got.stdout, got.stderr) == (0, b"host\n", b"")
    assert " is up" in mount.log()


def test_at_a_terminal_the_wait_for_the_first_answer_shows(slow_host, start_mount, tmp_path,
                                                          work):
    """The same wait at a terminal: a notice naming the host, erased before the job's output."""
    _, port, marker = slow_host
    shell = Shell(work, "/usr/bin:/bin")   # ready before the mount: the wait is all ahead
    try:
        mount = start_mount(hosts=[f"127.0.0.1:{port}"], config=always_cat(tmp_path),
                            wait_for_shim="cat")
        shell.line(f"PATH={mount.path}:$PATH cat {marker}/where".encode())
        assert shell.expect(rb"\roffloadfs: waiting for 127\.0\.0\.1:%d to answer\x1b\[K" % port,
                            15), shell.buf
        assert shell.expect(rb"\x1b\[K\r\x1b\[Khost\r\n", 20), shell.buf
    finally:
        shell.close()


def always_cat(tmp_path) -> str:
    """A VM config whose state file (as an earlier mount left it) sets cat to always."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"policies": {"cat": "always"}}))
    config = tmp_path / "vm.toml"
    config.write_text(f'[client]\nconnect_timeout = 10.0\n[mount]\nstate_file = "{state}"\n')
    return str(config)


def test_a_mount_whose_host_is_down_says_so(start_mount, tmp_path):
    """No host listening: the mount logs one warning naming it and what it said."""
    port = free_port()
    config = tmp_path / "vm.toml"
    config.write_text(f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    mount = start_mount(hosts=[f"127.0.0.1:{port}"], config=str(config))
    line = mount.wait_until(lambda: re.search(r"WARNING (no host reachable yet.*)", mount.log()),
                            "warn that no host answers").group(1)
    assert line == (f"no host reachable yet (tried 127.0.0.1:{port}: connection refused (is "
                    f"offloadd running there, on that port?)); "
                    f"jobs run locally under auto, exit 255 under always")
