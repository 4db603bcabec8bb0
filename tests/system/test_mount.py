"""The /opt/offload filesystem: a real FUSE mount of shims, a real daemon, real commands."""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from ..harness import (
    DATA,
    OFFLOADFS,
    alive,
    convert_both_ways,
    free_port,
    fuse_mounts,
    marker_dir,
    test_user,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("shim_kind")   # each test with the program and the script


@pytest.fixture
def marker(tmp_path):
    """A directory whose ``where`` file says "vm" here and "host" to the marker daemon."""
    return marker_dir(tmp_path / "mark")


@pytest.fixture
def host(start_daemon, marker):
    """A daemon in its own mount namespace (it sees the marker as "host")."""
    return start_daemon(marker=marker)


@pytest.fixture
def config(tmp_path):
    """A VM config with a short acknowledgement timeout and a private state file."""
    path = tmp_path / "vm.toml"
    path.write_text(f'[client]\nconnect_timeout = 2.0\n'
                    f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    return str(path)


@pytest.fixture
def mount(start_mount, host, config):
    """Shims for the marker daemon's commands."""
    return start_mount(hosts=[host.hostport], config=config, wait_for_shim="cat")


def sh(mount, script: str, cwd, **kw) -> subprocess.CompletedProcess:
    """Run a shell script with the mount first on PATH (bounded)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(["/bin/sh", "-c", script], cwd=cwd, env=kw.pop("env", mount.env()), **kw)


def where(mount, marker, work, **kw) -> str:
    """Where ``cat marker/where`` ran, as the caller's PATH finds cat."""
    return sh(mount, f"cat {marker}/where", work, **kw).stdout.decode().strip()


def xattr_set(path, name: str, value: bytes) -> int:
    """setxattr; 0 or the errno."""
    try:
        os.setxattr(path, name, value)
    except OSError as exc:
        return exc.errno
    return 0


def xattr_get(path, name: str) -> bytes | int:
    """getxattr's value, or the errno."""
    try:
        return os.getxattr(path, name)
    except OSError as exc:
        return exc.errno


# --- what the mount shows ---------------------------------------------------------------------

def test_shims_are_the_hosts_commands_and_run_there(mount, marker, work):
    """command -v finds the shim, and the job runs on the host (its marker says host)."""
    got = sh(mount, "command -v cat", work).stdout.decode().strip()
    assert got == f"{mount.path}/cat"
    assert where(mount, marker, work) == "host"
    assert sorted(os.listdir(mount.path)) == ["cat", "convert", "env", "head", "sh", "sleep",
                                              "true"]


def test_shims_are_executable_read_only_files(mount):
    """Shims are 0555 files owned by root; nothing can be created, changed or removed."""
    st = os.stat(mount.path / "cat")
    assert oct(st.st_mode & 0o7777) == "0o555" and st.st_uid == 0
    for attempt in (lambda: open(mount.path / "new", "w"), lambda: os.mkdir(mount.path / "d"),
                    lambda: os.unlink(mount.path / "cat"),
                    lambda: os.chmod(mount.path / "cat", 0o777),
                    lambda: os.truncate(mount.path / "cat", 0)):
        with pytest.raises(OSError):
            attempt()
    assert os.access(mount.path / "cat", os.X_OK) and not os.access(mount.path / "cat", os.W_OK)


def test_commands_filtered_by_the_vms_config(start_mount, host, tmp_path):
    """[commands] allow and deny decide which offered commands get a shim."""
    cfg = tmp_path / "filtered.toml"
    cfg.write_text(f'[commands]\nallow = ["c*", "s*"]\ndeny = ["sleep"]\n'
                   f'[mount]\nstate_file = "{tmp_path}/s2.json"\n')
    m = start_mount(hosts=[host.hostport], config=str(cfg), wait_for_shim="cat")
    assert sorted(os.listdir(m.path)) == ["cat", "convert", "sh"]


def test_a_host_that_comes_up_adds_its_commands(start_daemon, start_mount, config, tmp_path):
    """Shims follow the hosts: a second host's command appears once it answers."""
    first = start_daemon(commands={"cat": "/bin/cat"})
    port = free_port()
    m = start_mount(hosts=[first.hostport, f"127.0.0.1:{port}"], config=config,
                    wait_for_shim="cat")
    assert not (m.path / "echo").exists()
    start_daemon(commands={"echo": "/bin/echo"}, port=port)
    wait_for(lambda: (m.path / "echo").exists(), 10, "the second host's shim")
    assert subprocess.run(["echo", "hi"], env=m.env(), capture_output=True).stdout == b"hi\n"


# --- same behaviour as local --------------------------------------------------------------------

def test_unchanged_convert_command_line_is_byte_identical(mount, work):
    """convert via PATH through the shim writes the same bytes as /usr/bin/convert."""
    convert_both_ways(work, lambda line: sh(mount, line, work), "400x300", "3", "0x3")


def test_pipes_exit_codes_and_stderr_through_the_shim(mount, work):
    """A pipeline through shims: stdin in, stdout out, stderr apart, exit code kept."""
    got = sh(mount, "printf 'a\\nb\\n' | cat | sh -c 'tr a-z A-Z; echo err >&2; exit 5'", work)
    assert got.stdout == b"A\nB\n" and got.stderr == b"err\n" and got.returncode == 5


def test_binary_data_through_the_shim(mount, work):
    """Two megabytes of random bytes through the cat shim come back unchanged."""
    data = os.urandom(2 * 1024 * 1024)
    got = subprocess.run([str(mount.path / "cat")], input=data, capture_output=True, timeout=60)
    assert got.returncode == 0 and got.stdout == data


def test_no_arguments_is_not_one_empty_argument(mount, work):
    """A shim run without arguments passes none (cat then reads stdin)."""
    got = subprocess.run([str(mount.path / "cat")], input=b"x", capture_output=True, timeout=30)
    assert got.stdout == b"x" and got.returncode == 0


def test_arguments_with_spaces_and_newlines_arrive_intact(mount, work):
    """Arguments are passed byte for byte."""
    args = ["a b", "", "line1\nline2", "*", "$HOME", "-n"]
    got = subprocess.run([str(mount.path / "sh"), "-c", 'printf "[%s]" "$@"', "x", *args],
                         capture_output=True, timeout=30)
    assert got.stdout.decode() == "".join(f"[{a}]" for a in args)


def test_job_killed_by_a_signal_kills_the_shim_the_same_way(mount, work):
    """A job that dies of SIGKILL or SIGTERM makes the shim die of it too."""
    for sig in (signal.SIGKILL, signal.SIGTERM):
        got = subprocess.run([str(mount.path / "sh"), "-c", f"kill -{int(sig)} $$"], timeout=30)
        assert got.returncode == -sig


def test_output_streams_through_the_shim(mount, work):
    """The first line arrives while the job still runs."""
    proc = subprocess.Popen([str(mount.path / "sh"), "-c", "echo first; read x; echo second"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert _line(proc, 20) == b"first\n" and proc.poll() is None
    out, _ = proc.communicate(b"go\n", timeout=30)
    assert out == b"second\n" and proc.returncode == 0


def test_ctrl_c_reaches_the_job_through_the_shim(mount, work):
    """SIGINT to the shim reaches the remote job's trap; the shim exits with its status."""
    script = 'trap "echo got-int; exit 130" INT; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen([str(mount.path / "sh"), "-c", script], stdout=subprocess.PIPE)
    assert _line(proc, 20) == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out == b"got-int\n" and proc.returncode == 130


def test_ctrl_c_kills_an_untrapping_job_and_the_shim(mount, work):
    """A job without a trap dies of SIGINT, and so does the shim; nothing is left running."""
    proc = subprocess.Popen([str(mount.path / "sh"), "-c", "echo $$ > pid; exec sleep 60"],
                            cwd=work)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid"))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == -signal.SIGINT
    wait_for(lambda: not alive(pid), 10, "the remote job to die")


def test_killed_shim_gets_its_remote_job_killed(mount, work):
    """kill -9 of the shim: the agent cancels the job and the host kills it."""
    proc = subprocess.Popen([str(mount.path / "sh"), "-c", "echo $$ > pid; exec sleep 60"],
                            cwd=work)
    pid = int(wait_for(lambda: _read(work / "pid"), 20, "the job's pid"))
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: not alive(pid), 10, "the remote job to be killed")


def test_concurrent_shims_from_several_users(mount, work, traversable):
    """Shims run at once for two users: each job runs as its caller's uid."""
    users = [test_user("offfs1"), test_user("offfs2")]
    path = mount.env()["PATH"]   # runuser resets PATH: pass the shims' one on
    procs = [(uid, subprocess.Popen(["runuser", "-u", name, "--", "env", f"PATH={path}", "sh",
                                     "-c", "sh -c 'sleep 0.3; echo $OFFLOAD_SLOT; id -u'"],
                                    cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for name, uid in users * 2]
    for uid, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert len(out.split()) == 2, err
        slot, got_uid = out.split()
        assert proc.returncode == 0 and slot.isdigit() and got_uid == str(uid).encode()


# --- xattrs and policy ------------------------------------------------------------------------

def test_xattrs_read(mount, host, work):
    """policy is auto by default; hosts names the host; stats count jobs; list shows all three."""
    sh(mount, "cat /dev/null", work)
    path = mount.path / "cat"
    assert xattr_get(path, "user.offload.policy") == b"auto"
    assert xattr_get(path, "user.offload.hosts") == f"tcp://{host.hostport}".encode()
    stats = json.loads(xattr_get(path, "user.offload.stats"))
    assert stats["jobs"] == 1 and stats["failures"] == 0 and stats["mean_ms"]["run"] > 0
    assert sorted(os.listxattr(path)) == ["user.offload.hosts", "user.offload.policy",
                                          "user.offload.stats"]


def test_xattr_errors(mount):
    """Bad values EINVAL; unknown names ENODATA (get) or ENOTSUP (set); read-only ones EPERM."""
    path = mount.path / "cat"
    assert xattr_set(path, "user.offload.policy", b"sometimes") == errno.EINVAL
    assert xattr_get(path, "user.offload.nope") == errno.ENODATA
    assert xattr_set(path, "user.offload.nope", b"x") == errno.ENOTSUP
    assert xattr_set(path, "user.offload.hosts", b"x") == errno.EPERM
    assert xattr_set(path, "user.offload.stats", b"{}") == errno.EPERM
    assert xattr_get(mount.path / "nope", "user.offload.policy") == errno.ENOENT


def test_policy_never_runs_locally_and_auto_offloads_again(mount, marker, work):
    """Setting the policy xattr switches between local and offloaded at once."""
    path = mount.path / "cat"
    assert xattr_set(path, "user.offload.policy", b"never") == 0
    assert where(mount, marker, work) == "vm"
    assert xattr_set(path, "user.offload.policy", b"auto") == 0
    assert where(mount, marker, work) == "host"


def test_policy_set_and_read_by_the_cli_tools(mount, marker, work):
    """setfattr/getfattr and the xattr package's CLI both work on shims."""
    path = str(mount.path / "cat")
    subprocess.run(["setfattr", "-n", "user.offload.policy", "-v", "never", path], check=True)
    got = subprocess.run(["getfattr", "--only-values", "-n", "user.offload.policy", path],
                         capture_output=True, check=True).stdout
    assert got == b"never"
    xattr_cli = os.path.join(os.path.dirname(sys.executable), "xattr")
    subprocess.run([xattr_cli, "-w", "user.offload.policy", "auto", path], check=True)
    assert subprocess.run([xattr_cli, "-p", "user.offload.policy", path],
                          capture_output=True, check=True).stdout.strip() == b"auto"


def test_policy_persists_across_remounts(start_mount, host, config, mount, marker, work):
    """A policy set on one mount holds on the next mount with the same state file."""
    assert xattr_set(mount.path / "cat", "user.offload.policy", b"never") == 0
    assert mount.unmount() == 0
    again = start_mount(hosts=[host.hostport], config=config, wait_for_shim="cat")
    assert xattr_get(again.path / "cat", "user.offload.policy") == b"never"
    assert where(again, marker, work) == "vm"


def test_only_root_or_the_owner_sets_policy(mount, traversable):
    """Another user cannot change a shim's policy."""
    name, _ = test_user("offfs1")
    got = subprocess.run(["runuser", "-u", name, "--", "setfattr", "-n", "user.offload.policy",
                          "-v", "never", str(mount.path / "cat")], capture_output=True)
    assert got.returncode != 0 and xattr_get(mount.path / "cat", "user.offload.policy") == b"auto"


# --- when hosts fail ----------------------------------------------------------------------------

def test_auto_falls_back_locally_within_5s_when_the_daemon_stops(mount, host, marker, work):
    """The daemon is stopped: the next cat runs locally, within 5 s, with the same output."""
    assert where(mount, marker, work) == "host"
    host.stop()
    start = time.monotonic()
    assert where(mount, marker, work) == "vm"
    assert time.monotonic() - start < 5


def test_auto_falls_back_when_the_daemon_hangs(mount, host, marker, work):
    """A daemon that stops answering (SIGSTOP): fallback within 5 s, nothing run twice."""
    os.kill(host.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        got = sh(mount, f"cat {marker}/where; echo ran >> runs", work)
        assert got.stdout == b"vm\n" and time.monotonic() - start < 5
    finally:
        os.kill(host.proc.pid, signal.SIGCONT)
    assert (work / "runs").read_text() == "ran\n"


def test_always_fails_closed_with_one_line(mount, host, marker, work):
    """policy always with no host: exit 255 and one line; the local command never runs."""
    assert xattr_set(mount.path / "cat", "user.offload.policy", b"always") == 0
    host.stop()
    got = sh(mount, f"cat {marker}/where", work)
    assert got.returncode == 255 and got.stdout == b""
    assert got.stderr.count(b"\n") == 1 and b"always" in got.stderr


def test_always_shims_stay_listed_without_hosts(start_mount, tmp_path, config, mount, host):
    """A command with policy always keeps its shim even when no host offers it."""
    assert xattr_set(mount.path / "cat", "user.offload.policy", b"always") == 0
    mount.unmount()
    host.stop()
    again = start_mount(hosts=[host.hostport], config=config)
    assert os.listdir(again.path) == ["cat"]


def test_debug_says_where_a_job_ran_and_why(mount, host, marker, work):
    """OFFLOADFS_DEBUG=1 (or mount -d) tells on stderr where each job ran and why."""
    got = sh(mount, "cat /dev/null", work, env=mount.env(OFFLOADFS_DEBUG="1"))
    assert b"ran on" in got.stderr
    xattr_set(mount.path / "cat", "user.offload.policy", b"never")
    got = sh(mount, "cat /dev/null", work, env=mount.env(OFFLOADFS_DEBUG="1"))
    assert b"running locally (policy never)" in got.stderr


def test_killed_mount_leaves_commands_working_locally(mount, marker, work):
    """kill -9 of the mount process: no dead mount on PATH, cat runs locally."""
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait(10)
    wait_for(lambda: str(mount.path) not in fuse_mounts(), 10, "the kernel to drop the mount")
    got = sh(mount, f"cat {marker}/where", work)
    assert got.returncode == 0 and got.stdout == b"vm\n"


def test_a_shim_whose_mount_died_before_its_control_open_exits_255_with_one_line(mount,
                                                                                tmp_path,
                                                                                shim_kind):
    """The mount dies between a shim's exec and its control open: 255 (an offload error;
    dash alone would end with 2 on the failed ``exec`` redirection) and one line naming
    why; nothing ran. The shim as it was read before the mount died: the script run by
    dash, or the program, which finds its control file beside itself (none there: ENOENT,
    as a dead mount's ENOTCONN)."""
    copy = tmp_path / ("sleep-shim" if shim_kind == "script" else "sleep")
    copy.write_bytes((mount.path / "sleep").read_bytes())
    copy.chmod(0o755)
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait(10)
    wait_for(lambda: str(mount.path) not in fuse_mounts(), 10, "the kernel to drop the mount")
    argv = ["/bin/sh", str(copy), "5"] if shim_kind == "script" else [str(copy), "5"]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    assert done.returncode == 255 and done.stdout == b""
    assert len(done.stderr.splitlines()) == 1 and b".ctl/sleep" in done.stderr, done.stderr


def test_mounting_over_a_stale_mount_works(start_mount, host, config, tmp_path, work):
    """A dead FUSE mount (ENOTCONN) at the mount point is cleared and replaced."""
    stale = tmp_path / "stale"
    stale.mkdir()
    helper = subprocess.Popen([sys.executable, str(DATA / "stale_fuse.py"), str(stale)])
    wait_for(lambda: str(stale) in fuse_mounts(), 20, "the helper's mount")
    helper.kill()
    helper.wait()
    with pytest.raises(OSError) as exc:
        os.listdir(stale)
    assert exc.value.errno == errno.ENOTCONN
    proc = subprocess.Popen([OFFLOADFS, "mount", str(stale), "-f", "-H", host.hostport,
                             "-c", config], stderr=subprocess.DEVNULL)
    try:
        shims = ["cat", "convert", "env", "head", "sh", "sleep", "true"]
        wait_for(lambda: _listdir(stale) == shims, 20, "the new mount's shims")
    finally:
        subprocess.run([OFFLOADFS, "umount", str(stale)], timeout=30)
        proc.wait(20)
    assert str(stale) not in fuse_mounts()


def test_umount_ends_the_mount_process(mount):
    """offloadfs umount unmounts and the mount process exits 0."""
    assert mount.unmount() == 0 and str(mount.path) not in fuse_mounts()


def test_status_shows_hosts_and_last_jobs(mount, host, work, shim_kind):
    """offloadfs status lists the mount's host with its slots, which shims it serves, and the
    last job with timings."""
    sh(mount, "cat /dev/null", work)
    got = subprocess.run([OFFLOADFS, "status"], capture_output=True, timeout=30, text=True)
    assert got.returncode == 0
    assert f"tcp://{host.hostport}" in got.stdout and "slots busy" in got.stdout
    served = "the compiled program" if shim_kind == "program" else "sh scripts"
    assert f"  shims: {served}" in got.stdout.splitlines()
    job = next(line for line in got.stdout.splitlines() if line.strip().startswith("cat"))
    assert "status   0" in job and "run " in job


# --- helpers ------------------------------------------------------------------------------------

def _line(proc, timeout: float) -> bytes:
    """One line of ``proc``'s stdout within ``timeout`` s, or fail."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no output line within {timeout}s")
    return proc.stdout.readline()


def _read(path) -> str | None:
    """The stripped text of ``path``, or None."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _listdir(path) -> list[str] | None:
    """Sorted entries of ``path``, or None if it cannot be listed."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None




def test_signal_caught_before_the_read_reaches_the_job(mount):
    """A signal the shim caught before asking (sent after its arguments) ends the job at once."""
    start = time.monotonic()
    fd = os.open(mount.path / ".ctl" / "sleep", os.O_RDWR)
    try:
        os.write(fd, f"{mount.path}/sleep\0" "1\0" "30\0" "INT\0".encode())
        reply = os.read(fd, 100)
    finally:
        os.close(fd)
    assert reply == b"s INT\n" and time.monotonic() - start < 10


def test_a_malformed_request_gets_255(mount):
    """What is not path, count, arguments and signal names is refused, not run."""
    fd = os.open(mount.path / ".ctl" / "sleep", os.O_RDWR)
    try:
        os.write(fd, b"/x/sleep\0" b"7\0" b"30\0")
        assert os.read(fd, 100) == b"255\n"
    finally:
        os.close(fd)


def test_a_variable_named_s_in_the_callers_environment_is_harmless(mount, work):
    """The shim's own variables do not come from the caller's environment."""
    got = sh(mount, "cat /dev/null; echo ok", work, env=mount.env(s="INT", st="9", arg="x"))
    assert got.returncode == 0 and got.stdout == b"ok\n"


def test_the_same_command_runs_again_while_one_waits(mount, work):
    """A shim can be run while another run of it waits for its job (no ETXTBSY)."""
    first = subprocess.Popen([str(mount.path / "sh"), "-c", "echo x > started; read x"],
                             cwd=work, stdin=subprocess.PIPE)
    try:
        wait_for(lambda: (work / "started").exists(), 20, "the first run to start")
        second = subprocess.run([str(mount.path / "sh"), "-c", "echo $OFFLOAD_SLOT"],
                                capture_output=True, timeout=30)
        assert second.returncode == 0 and second.stdout.strip().isdigit(), second.stderr
    finally:
        first.communicate(b"\n", timeout=30)


def test_stdio_from_the_mount_itself_runs_locally(mount, work, shim_kind):
    """A caller whose stdin is a shim file is not served from ourselves: it runs locally."""
    got = sh(mount, f"cat < {mount.path}/cat", work)
    start = b"#!/bin/sh" if shim_kind == "script" else b"\x7fELF"
    assert got.returncode == 0 and got.stdout.startswith(start)
    stats = json.loads(xattr_get(mount.path / "cat", "user.offload.stats"))
    assert (stats["jobs"], stats["fallbacks"]) == (0, 1)
