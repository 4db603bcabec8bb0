"""offld hands its job to the mount's agent (issue 16): real mounts, real daemons, real fds.

With an offloadfs mount on PATH, ``offld -- CMD`` (no -H, -L, -c) goes over the mount's local
socket: same bytes, exit status and death as offld's own ZeroMQ path; identity from the
kernel, so a user who cannot read the VM's key offloads through the mount, and a peer that
claims another uid in its message gets its own; garbage on the socket is refused and the
agent keeps serving; at a real pty, the window size and Ctrl-C work as ever.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from offloadfs import handoff
from offloadfs import offld as offld_module
from offloadfs.settings import DEFAULT_PORT

from ..harness import (
    BIN,
    OFFLD,
    OFFLOADFS,
    Mount,
    Proc,
    accepts,
    free_port,
    test_user,
    wait_for,
)
from ..harness import mounted as harness_mounted
from . import test_terminal
from .test_security import Keys, keyed_daemon


def handed_jobs(mount) -> list[dict]:
    """The jobs the mount's agent ran lately (its status xattr), offld's hand-offs among them."""
    return json.loads(os.getxattr(str(mount.path), "user.offload.status"))["jobs"]


def offld(mount, *command: str, cwd: Path, opts=(), user: str | None = None, direct=None,
          **kw) -> subprocess.CompletedProcess:
    """``offld`` with ``mount`` first on PATH: through its agent, or with ``direct`` (a
    daemon) straight to that daemon (-H) as before; as ``user`` if given."""
    argv = [OFFLD, *(["-H", direct.hostport] if direct else []), *opts, "--", *command]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    kw.setdefault("capture_output", True)
    return subprocess.run(argv, cwd=cwd, env=mount.env(), timeout=60, **kw)


@pytest.fixture
def mounted(daemon, start_mount):
    """A daemon and a mount whose agent sends jobs to it."""
    return daemon, start_mount(hosts=[daemon.hostport], wait_for_shim="sh")


# --- the same job, the same outcome ------------------------------------------------------------

@pytest.mark.parametrize("script, status", [
    ("printf 'out\\0\\377'; echo err >&2; exit 3", 3),
    ("cat; echo done", 0),
    ("echo before; kill -TERM $$", 128 + 15),
])
def test_through_the_mount_the_same_bytes_and_status_as_direct(mounted, work, script, status):
    """stdout, stderr and the exit status (a death by a signal too) are the same through the
    agent as straight to the host; stdin reaches the job; the agent ran the handed job."""
    d, mount = mounted
    runs = [offld(mount, "sh", "-c", script, cwd=work, direct=via, input=b"in\x00put\n")
            for via in (None, d)]
    handed, direct = runs
    assert (handed.returncode, handed.stdout, handed.stderr) == \
        (direct.returncode, direct.stdout, direct.stderr)
    assert handed.returncode == status
    jobs = handed_jobs(mount)
    assert [j["command"] for j in jobs] == ["sh"] and jobs[0]["status"] == status


def test_options_through_the_mount(mounted, work):
    """-o FILE, -Q (no job log entry) and -q work through the agent; a job log entry is
    written without -Q, as for offld's own path."""
    _, mount = mounted
    r = offld(mount, "sh", "-c", "echo to-file; echo err >&2", cwd=work, opts=["-o", "out.txt"])
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"err\n")
    assert (work / "out.txt").read_bytes() == b"to-file\n"
    log = Path(os.environ["XDG_STATE_HOME"]) / "offloadfs" / "jobs.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["command"], e["status"]) for e in entries] == [(["sh", "-c", "echo to-file; "
                                                               "echo err >&2"], 0)]
    assert entries[0]["cwd"] == str(work) and entries[0]["host"] not in ("", "offloadfs mount")
    r = offld(mount, "true", cwd=work, opts=["-Q", "-q"])
    assert r.returncode == 0 and len(log.read_text().splitlines()) == 1
    assert len(handed_jobs(mount)) == 2


def test_the_job_log_the_mounts_config_names(daemon, start_mount, work, tmp_path):
    """With ``[client] job_log`` in the mount's config, a handed-off job's entry goes to that
    file (the agent made it; offld read no config), and a refused one's too."""
    log = tmp_path / "named" / "jobs.jsonl"
    config = tmp_path / "vm.toml"
    config.write_text(f'[client]\njob_log = "{log}"\n[commands]\ndeny = ["false"]\n')
    mount = start_mount(hosts=[daemon.hostport], config=str(config), wait_for_shim="sh")
    assert offld(mount, "sh", "-c", "exit 4", cwd=work).returncode == 4
    refused = offld(mount, "false", cwd=work)
    assert refused.returncode == 255 and b"false" in refused.stderr, refused.stderr
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["command"], e["status"], e["cwd"]) for e in entries] == \
        [(["sh", "-c", "exit 4"], 4, str(work)), (["false"], 255, str(work))]
    assert entries[1]["error"] and not entries[0]["error"]
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "offloadfs" / "jobs.jsonl").exists()


def test_a_job_frame_that_cannot_be_sent_leaves_offld_to_connect_itself():
    """The agent's end closed before offld sent its job (EPIPE): nothing can have run, so
    offld takes its own path (None), with its signals unblocked as before."""
    import signal
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    opts = types.SimpleNamespace(tty="auto", quiet=True)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        assert offld_module._handed(ours, ["true"], opts, 1, "/m",
                                    offld_module.Reporter("offld", True, False)) is None
    finally:
        ours.close()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_nothing_ran_then_fallback_or_255_as_direct(start_mount, work):
    """A mount whose host never answers: offld through it says the job never ran (255, one
    line), and --fallback runs the command here, as offld's own path does."""
    port = free_port()
    mount = start_mount(hosts=[f"127.0.0.1:{port}"])
    r = offld(mount, "sh", "-c", "echo remote", cwd=work)
    assert r.returncode == 255 and r.stdout == b"" and r.stderr.count(b"\n") == 1, r.stderr
    assert r.stderr.startswith(b"offld: ") and b"never ran" in r.stderr
    r = offld(mount, "sh", "-c", "echo local $0", cwd=work, opts=["--fallback", "/bin/sh"])
    assert (r.returncode, r.stdout) == (0, b"local sh\n"), r.stderr
    assert [j["where"] for j in handed_jobs(mount)] == ["nowhere", "nowhere"]


# --- identity from the kernel ------------------------------------------------------------------

@pytest.fixture
def stranger(traversable) -> tuple[str, int, Path]:
    """A non-root user who cannot read the VM's key, and a directory of theirs."""
    name, uid = test_user("offhand1")
    path = traversable / "strangerwork"
    path.mkdir()
    shutil.chown(path, name)
    return name, uid, path


def test_a_user_who_cannot_read_the_vm_key_offloads_through_the_mount(start_daemon,
                                                                     start_mount, tmp_path,
                                                                     stranger):
    """The VM's secret key is root's (0600): the user's own offld cannot use it (255), yet
    through the mount the job runs on the keyed host, as that user."""
    name, uid, home = stranger
    keys = Keys(tmp_path)
    os.chmod(keys.dir, 0o755)
    d = keyed_daemon(start_daemon, keys)
    vm = keys.vm_toml()
    mount = start_mount("-c", vm, hosts=[d.hostport], wait_for_shim="sh")
    own = offld(mount, "sh", "-c", "touch own", cwd=home, opts=["-c", vm], direct=d, user=name)
    assert own.returncode == 255 and b"vm.key_secret" in own.stderr, own.stderr
    r = offld(mount, "sh", "-c", "id -u; touch mine", cwd=home, user=name)
    assert (r.returncode, r.stdout) == (0, f"{uid}\n".encode()), r.stderr
    assert pwd.getpwuid((home / "mine").stat().st_uid).pw_name == name
    assert not (home / "own").exists()


CLAIMING = """
import os, socket, sys
from offloadfs import handoff
from offloadfs import offld as offld_module
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(handoff.address(sys.argv[1]))
frame = handoff.encode(handoff.JOB, v=handoff.VERSION, argv=["sh", "-c", "id -u; id -g"],
                       tty="never", quiet=True, uid=0, gid=0, pid=1)
handoff.send(s, frame, (0, 1, 2))
reader = handoff.Reader(s)
kind, fields = reader.next()
sys.exit(handoff.End(fields).status)
"""


def test_a_peer_claiming_root_in_its_message_runs_as_itself(mounted, stranger):
    """A hand-off whose message says uid 0, gid 0, pid 1: the job runs as the peer's own
    uid and gid, as the kernel reports them."""
    _, mount = mounted
    name, uid, home = stranger
    gid = pwd.getpwnam(name).pw_gid
    r = subprocess.run(["runuser", "-u", name, "--", sys.executable, "-c", CLAIMING,
                        str(mount.path)], cwd=home, capture_output=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"{uid}\n{gid}\n".encode()), r.stderr
    assert handed_jobs(mount)[0]["uid"] == uid


# --- a bad peer --------------------------------------------------------------------------------

def _exchange(mount, data: bytes, fds: tuple[int, ...] = ()) -> tuple[bytes, dict] | None:
    """Send raw ``data`` (with ``fds``) on the mount's socket; the agent's first frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(handoff.address(str(mount.path)))
        if data:
            handoff.send(s, data, fds)
        s.shutdown(socket.SHUT_WR)
        try:
            return handoff.Reader(s).next()
        except handoff.HandoffError:
            return None


def _job(**fields) -> bytes:
    """A job frame with ``fields`` over the good ones."""
    good = {"v": handoff.VERSION, "argv": ["sh", "-c", "touch ran"], "tty": "never",
            "quiet": True}
    return handoff.encode(handoff.JOB, **{**good, **fields})


def _nulls(pid: int) -> int:
    """How many fds of process ``pid`` are /dev/null."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd) == os.devnull)


GARBAGE = [
    (b"\x00\x00\x00\x00", 0, "a frame of 0 bytes"),
    (b"\xff\xff\xff\xffJ", 0, "a frame of 4294967295 bytes"),
    (b"\x00\x00\x00\x05Jnot", 0, "the stream ended inside a frame"),
    (b"\x00\x00\x00\x04Jnot", 0, "not JSON"),
    (handoff.encode(b"Q"), 0, "unknown frame kind"),
    (handoff.encode(handoff.CONTINUED), 0, "a C frame before the job"),
    (_job(), 0, "0 fds"),
    (_job(), 5, "5 fds"),
    (_job(v=99), 3, "version 99"),
    (_job(argv=["/bin/sh", "-c", "touch ran"]), 3, "argv"),
    (_job(argv=[]), 3, "argv"),
    (_job(tty="sometimes"), 3, "tty 'sometimes'"),
    (_job(quiet="yes"), 3, "'quiet'"),
]


def test_garbage_on_the_socket_is_refused_and_the_agent_keeps_serving(mounted, work):
    """Each malformed hand-off gets an end frame saying what was wrong and that the job never
    ran; nothing ran; the fds sent are not kept; offld through the mount works after all."""
    _, mount = mounted
    held = _nulls(mount.proc.pid)   # its own stdin is /dev/null
    with open(os.devnull, "rb") as null:
        for data, nfds, said in GARBAGE:
            fds = tuple(null.fileno() for _ in range(nfds))
            answer = _exchange(mount, data, fds)
            assert answer is not None and answer[0] == handoff.END, said
            end = handoff.End(answer[1])
            assert end.status == 255 and end.ending == "never ran", said
            assert said in end.error and end.error.count("\n") == 0, (said, end.error)
    assert _exchange(mount, b"") is not None   # closed before a job: answered, then closed
    assert not (work / "ran").exists()
    assert handed_jobs(mount) == []
    wait_for(lambda: _nulls(mount.proc.pid) == held, 10,
             "the mount to close the fds of refused hand-offs")
    r = offld(mount, "sh", "-c", "echo still", cwd=work)
    assert (r.returncode, r.stdout) == (0, b"still\n"), r.stderr


SQUATTER = """
import socket, sys
from offloadfs import handoff
from offloadfs import offld as offld_module
s = socket.socket(socket.AF_UNIX)
s.bind(handoff.address(sys.argv[1]))
s.listen()
print("up", flush=True)
c, _ = s.accept()
data, fds, _, _ = socket.recv_fds(c, 65536, 8)
print(f"got {len(data)} bytes and {len(fds)} fds", flush=True)
"""


def test_a_hand_off_socket_another_user_bound_first_gets_nothing(start_daemon, tmp_path,
                                                                  work, stranger):
    """Another user binds a mount's socket name before the mount does: the mount says so in
    its log, and offld, seeing a listener that is not the mount's owner, sends it nothing
    (no job, no fds) and runs the job over its own connection (to the default host)."""
    name, _, _ = stranger
    if accepts(DEFAULT_PORT):
        pytest.skip(f"port {DEFAULT_PORT} (offld's default host) is taken")
    daemon = start_daemon(port=DEFAULT_PORT)
    path = tmp_path / "squatted"
    path.mkdir()
    squatter = subprocess.Popen(["runuser", "-u", name, "--", sys.executable, "-c", SQUATTER,
                                 str(path)], stdout=subprocess.PIPE)
    mount = Mount.__new__(Mount)   # a mount at a path chosen here (the squatter's)
    mount.path = path
    try:
        assert squatter.stdout.readline() == b"up\n"
        Proc.__init__(mount, [OFFLOADFS, "mount", str(path), "-f", "-H", daemon.hostport],
                      tmp_path / "squatted.log", cwd=tmp_path)
        mount.ready(lambda: harness_mounted(path) and (path / "sh").exists(), "mount")
        r = offld(mount, "sh", "-c", "echo mine", cwd=work)
        assert (r.returncode, r.stdout) == (0, b"mine\n"), r.stderr
        assert squatter.stdout.readline() == b"got 0 bytes and 0 fds\n"
        assert "no hand-off socket" in mount.log()
    finally:
        if hasattr(mount, "proc"):
            mount.unmount()
        squatter.kill()
        squatter.wait()
        squatter.stdout.close()
    assert f"started {daemon.hostport}" not in mount.log()


# --- a person at a terminal --------------------------------------------------------------------

class ThroughMount(test_terminal.Route):
    """test_terminal's route for offld through the mount's agent: the mount first on PATH,
    offld with no -H."""

    def shell(self, cwd: Path, config: str | None = None) -> test_terminal.Shell:
        """An interactive bash whose commands go through ``offld --``."""
        return test_terminal.Shell(cwd, str(self.mount.path), f"{BIN}/offld -- ".encode())


AT_A_TERMINAL = [test_terminal.test_the_job_has_a_terminal_of_the_windows_size,
                 test_terminal.test_a_python_prompt_reads_typed_lines_and_ends_on_ctrl_d,
                 test_terminal.test_cat_reads_the_terminal_and_ctrl_d_leaves_nothing_for_the_shell,
                 test_terminal.test_ctrl_z_stops_the_job_fg_resumes_it_ctrl_c_ends_it,
                 test_terminal.test_a_window_change_reaches_the_job,
                 test_terminal.test_a_background_job_reading_the_terminal_stops_as_locally,
                 test_terminal.test_the_terminal_is_restored_when_a_raw_job_is_killed_on_the_host]


@pytest.mark.parametrize("check", AT_A_TERMINAL, ids=lambda f: f.__name__[5:])
def test_offld_at_a_pty_through_the_mount(check, start_daemon, start_mount, work):
    """What a person at a terminal sees of offld (test_terminal's checks: the window's size,
    typed keys, Ctrl-D, Ctrl-Z and fg, Ctrl-C, SIGWINCH, a background job's SIGTTIN, the
    settings afterwards) holds through the mount's agent, which ran the jobs."""
    d = start_daemon(commands=test_terminal.COMMANDS)
    mount = start_mount(hosts=[d.hostport], wait_for_shim="python3")
    shells: list[test_terminal.Shell] = []

    def shell_of(route):
        """test_terminal's shell factory, here."""
        shells.append(route.shell(work))
        return shells[-1]

    try:
        check(ThroughMount("offld", [d], mount, d.hostport), shell_of)
    finally:
        for sh in shells:
            sh.close()
    assert handed_jobs(mount), "no job went through the mount's agent"


def test_ctrl_c_through_the_mount_exits_130_and_the_terminal_is_as_before(start_daemon,
                                                                         start_mount, work):
    """Ctrl-C of a job in raw mode through the mount: the shell sees status 130, as from
    offld's own path, and the terminal's settings are what they were."""
    d = start_daemon(commands=test_terminal.COMMANDS)
    mount = start_mount(hosts=[d.hostport], wait_for_shim="sh")
    sh = ThroughMount("offld", [d], mount).shell(work)
    try:
        before = sh.settings()
        sh.line(b"sh -c 'echo ready; exec sleep 60'")
        assert sh.expect(rb"ready\r\n", 20), sh.buf
        sh.send(b"\x03")
        assert sh.prompt(), sh.buf
        sh.line(b"echo status=$?", offload=False)
        assert sh.expect(rb"status=130") and sh.prompt(), sh.buf
        assert sh.settings() == before
    finally:
        sh.close()
    assert [j["status"] for j in handed_jobs(mount)] == [130]
