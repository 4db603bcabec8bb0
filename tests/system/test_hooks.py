"""The hooks/ directory: profile.d snippet, systemd units, mount(8) helper, auto_offload wrapper.

Each hook is exercised the way the system would use it: the snippet sourced by real shells, the
helper called with mount(8)'s arguments (and through mount(8) itself), the wrapper as a link
named after a command, against a real ``offloadd`` and real FUSE mounts.
"""
from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from offloadfs.commandline import USAGE_ERROR

from ..harness import OFFLD, OFFLOADFS, ROOT, fuse_mounts, wait_for

HOOKS = ROOT / "hooks"
PROFILE = HOOKS / "profile.d" / "offloadfs.sh"
HELPER = HOOKS / "mount.offloadfs"
AUTO = HOOKS / "auto_offload"
UNITS = sorted((HOOKS / "systemd").glob("*.service"))
SHELL_HOOKS = [PROFILE, HELPER, AUTO]
SHELLS = ["sh", "dash", "bash"]
NO_HOST = "127.0.0.1:1"   # nothing listens there: connection refused at once
SLOT = 'echo "${OFFLOAD_SLOT-local}"'   # prints a slot number only when offloadd runs it


def run(argv, **kw) -> subprocess.CompletedProcess:
    """Run to completion (bounded), capturing text output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([str(a) for a in argv], text=True, **kw)


def offloadfs_mounts() -> list[str]:
    """Mount points of fuse.offloadfs filesystems (as /proc/self/mounts spells them)."""
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "fuse.offloadfs"]


def processes_naming(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in cmd and state != "Z":
            found.append(int(entry))
    return found


def unmount(mnt: Path) -> None:
    """``offloadfs umount`` if mounted, then wait until no process serves ``mnt`` any more."""
    listed = str(mnt).replace(" ", "\\040")
    if listed in offloadfs_mounts():
        run([OFFLOADFS, "umount", mnt], check=True, timeout=30)
    wait_for(lambda: listed not in offloadfs_mounts(), 20, f"{mnt} to be unmounted")
    wait_for(lambda: not processes_naming(mnt), 20, f"the mount process of {mnt} to exit")


# --- shellcheck ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hook", SHELL_HOOKS, ids=lambda p: p.name)
def test_shell_hook_is_shellcheck_clean(hook):
    """Every shell hook passes shellcheck as POSIX sh."""
    assert shutil.which("shellcheck"), "shellcheck is not installed (make install adds it)"
    done = run(["shellcheck", "--shell=sh", hook])
    assert done.returncode == 0, done.stdout + done.stderr


# --- profile.d -----------------------------------------------------------------------------------

def source_profile(shell: str, path: str, mnt: Path | str | None, *, times: int = 1):
    """Source the snippet in ``shell -eu``; (new PATH, path of cat, leftover variables)."""
    env = {k: v for k, v in os.environ.items() if k != "OFFLOADFS_MOUNT"}
    env["PATH"] = path
    if mnt is not None:
        env["OFFLOADFS_MOUNT"] = str(mnt)
    script = (f'for i in {" ".join("x" * times)}; do . "$1"; done; '
              'printf "%s\\n" "$PATH"; command -v cat; set | grep -c "^_offloadfs_" || :')
    binary = shutil.which(shell)   # by absolute path: PATH may hold the mount's sh shim
    assert binary, f"{shell} is not installed"
    done = run([binary, "-euc", script, shell, PROFILE], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    new_path, cat, leftovers = done.stdout.splitlines()
    return new_path, cat, int(leftovers)


@pytest.mark.parametrize("shell", SHELLS)
def test_profile_puts_a_live_mount_first_on_path_once(shell, start_daemon, start_mount):
    """With the mount up, PATH starts with it exactly once and `cat` is its shim."""
    daemon = start_daemon()
    mount = start_mount(hosts=[daemon.hostport], wait_for_shim="cat")
    mnt = str(mount.path)
    for before in ["/usr/bin:/bin", f"/usr/bin:{mnt}:/bin:{mnt}/", f"{mnt}:/usr/bin:/bin"]:
        new_path, cat, leftovers = source_profile(shell, before, mnt, times=2)
        assert new_path == f"{mnt}:/usr/bin:/bin"
        assert cat == f"{mnt}/cat"
        assert leftovers == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_profile_drops_the_mount_from_path_once_unmounted(shell, start_daemon, start_mount):
    """After the mount goes away, sourcing the snippet takes it off PATH and `cat` is local."""
    daemon = start_daemon()
    mount = start_mount(hosts=[daemon.hostport], wait_for_shim="cat")
    mnt = str(mount.path)
    assert source_profile(shell, "/usr/bin:/bin", mnt)[0] == f"{mnt}:/usr/bin:/bin"
    mount.unmount()
    new_path, cat, leftovers = source_profile(shell, f"{mnt}:/usr/bin::/bin", mnt)
    assert new_path == "/usr/bin::/bin"   # the empty entry (".") is kept
    assert cat == "/usr/bin/cat"
    assert leftovers == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_profile_ignores_a_plain_directory(shell, tmp_path):
    """A directory that exists but is not an offloadfs mount never gets on PATH."""
    fake = tmp_path / "offload"
    fake.mkdir()
    (fake / "cat").write_text("#!/bin/sh\necho fake\n")
    (fake / "cat").chmod(0o755)
    new_path, cat, _ = source_profile(shell, "/usr/bin:/bin", fake)
    assert (new_path, cat) == ("/usr/bin:/bin", "/usr/bin/cat")
    new_path, cat, _ = source_profile(shell, f"{fake}:/usr/bin:/bin", f"{fake}/")
    assert (new_path, cat) == ("/usr/bin:/bin", "/usr/bin/cat")


@pytest.mark.parametrize("shell", SHELLS)
def test_profile_defaults_to_opt_offload(shell):
    """Without OFFLOADFS_MOUNT it manages /opt/offload (dropped here, where it is not mounted)."""
    if "/opt/offload" in offloadfs_mounts():
        pytest.skip("/opt/offload is mounted on this machine")
    new_path, cat, _ = source_profile(shell, "/opt/offload:/usr/bin:/bin", None)
    assert (new_path, cat) == ("/usr/bin:/bin", "/usr/bin/cat")


# --- systemd units -------------------------------------------------------------------------------

def unit_settings(unit: Path) -> dict[str, list[str]]:
    """key -> values of a unit file (all sections together)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_verifies(unit):
    """systemd-analyze verify accepts the unit without a warning about it."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    done = run(["systemd-analyze", "verify", unit])
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_systemd_units_run_the_programs_as_documented():
    """The units run the documented commands, log to the journal under their own names,
    restart on failure but for a bad config (exit 2), and stop offloadd alone first."""
    assert [u.name for u in UNITS] == ["offloadd.service", "offloadfs.service"]
    mount = unit_settings(HOOKS / "systemd" / "offloadfs.service")
    daemon = unit_settings(HOOKS / "systemd" / "offloadd.service")
    assert mount["Type"] == ["notify"]
    assert mount["ExecStart"] == ["/usr/bin/env offloadfs mount /opt/offload -f"]
    assert mount["ExecStop"] == ["-/usr/bin/env offloadfs umount /opt/offload"]
    assert "network-online.target" in mount["After"]
    assert daemon["ExecStart"] == ["/usr/bin/env offloadd serve -c /etc/offloadfs/offloadd.toml"]
    assert daemon["KillMode"] == ["mixed"]
    for unit, name in ((mount, "offloadfs"), (daemon, "offloadd")):
        assert unit["Restart"] == ["on-failure"]
        assert unit["RestartPreventExitStatus"] == [str(USAGE_ERROR)]
        assert unit["SyslogIdentifier"] == [name]
        assert unit["WantedBy"] == ["multi-user.target"]


def unit_command(unit: dict, key: str, replace: dict[str, str]) -> list[str]:
    """The argv of a unit's Exec* line with paths replaced ('-' prefix dropped)."""
    (line,) = unit[key]
    for old, new in replace.items():
        line = line.replace(old, new)
    return shlex.split(line.lstrip("-"))


def venv_path_env() -> dict:
    """The environment systemd would give the units, with the venv's programs on PATH."""
    return dict(os.environ, PATH=f"{Path(OFFLOADFS).parent}:/usr/local/bin:/usr/bin:/bin")


def test_offloadfs_unit_commands_notify_ready_and_unmount(daemon, tmp_path):
    """offloadfs.service (Type=notify): READY=1 comes with the mount up; stop makes it exit 0."""
    mnt = tmp_path / "opt-offload"
    unit = unit_settings(HOOKS / "systemd" / "offloadfs.service")
    assert unit["Type"] == ["notify"]
    swap = {"/opt/offload": str(mnt)}
    env = venv_path_env()
    run(unit_command(unit, "ExecStartPre", swap), env=env, check=True)
    (tmp_path / "vm.toml").write_text(f'[client]\nhosts = ["{daemon.hostport}"]\n')
    main = unit_command(unit, "ExecStart", swap) + ["-c", str(tmp_path / "vm.toml")]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    with open(tmp_path / "unit.log", "wb") as log:
        proc = subprocess.Popen(main, env=dict(env, NOTIFY_SOCKET=str(tmp_path / "notify")),
                                stderr=log, start_new_session=True)
    try:
        assert select.select([notify], [], [], 20)[0], "no READY=1 from the mount"
        assert notify.recv(4096) == b"READY=1" and str(mnt) in offloadfs_mounts()
        wait_for(lambda: (mnt / "sh").exists(), 20, "the sh shim")
        assert run([mnt / "sh", "-c", SLOT], cwd=tmp_path).stdout.strip().isdigit()
        stop = run(unit_command(unit, "ExecStop", swap), env=env, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(20) == 0
        assert str(mnt) not in fuse_mounts()
        assert "unmounted" in (tmp_path / "unit.log").read_text()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)
        unmount(mnt)


class JournalPipe:
    """A pipe standing in for the journal's stream: a unit's command gets the write end as
    stderr and ``$JOURNAL_STREAM`` naming it, as systemd does; the test reads lines."""

    def __init__(self):
        """The pipe, and the environment that names its write end."""
        self.r, self.w = os.pipe()
        st = os.fstat(self.w)
        self.env = dict(venv_path_env(), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        self.text = b""

    def started(self) -> None:
        """The child has the write end: ours goes, so that its exit ends the stream."""
        os.close(self.w)
        self.w = -1

    def lines(self) -> list[str]:
        """Every line so far (reads what is there, without waiting)."""
        while select.select([self.r], [], [], 0)[0]:
            chunk = os.read(self.r, 65536)
            if not chunk:
                break
            self.text += chunk
        return self.text.decode(errors="replace").splitlines()

    def close(self) -> None:
        """Close what is left open."""
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)


def test_units_refuse_a_missing_or_broken_config_once_on_the_journal(tmp_path):
    """A fresh install (no /etc/offloadfs/offloadd.toml) or a broken offloadfs.toml: the
    unit's command exits with the status the unit does not restart on, with one error line
    (priority 3 on the journal), not a loop of restarts."""
    daemon = unit_settings(HOOKS / "systemd" / "offloadd.service")
    mount = unit_settings(HOOKS / "systemd" / "offloadfs.service")
    missing = tmp_path / "etc" / "offloadd.toml"   # /etc/offloadfs/offloadd.toml, not there yet
    broken = tmp_path / "offloadfs.toml"
    broken.write_text("[client\n")
    (tmp_path / "mnt").mkdir()
    cases = [(daemon, unit_command(daemon, "ExecStart", {"/etc/offloadfs/offloadd.toml":
                                                         str(missing)}), {},
              f"<3>offloadd: {missing}: No such file or directory"),
             (mount, unit_command(mount, "ExecStart", {"/opt/offload": str(tmp_path / "mnt")}),
              {"OFFLOADFS_CONFIG": str(broken)}, f"<3>offloadfs: {broken}: ")]
    for unit, argv, extra, line in cases:
        journal = JournalPipe()
        try:
            done = subprocess.run(argv, env=dict(journal.env, **extra), stderr=journal.w,
                                  timeout=30)
            journal.started()
            assert [str(done.returncode)] == unit["RestartPreventExitStatus"], argv
            assert len(journal.lines()) == 1 and journal.lines()[0].startswith(line), \
                journal.lines()
        finally:
            journal.close()


def test_offloadd_unit_logs_with_priorities_on_the_journal(tmp_path, work):
    """Under systemd (stderr is the journal) every line has its priority and no time: the
    start at <6>, a refused job at <4>."""
    unit = unit_settings(HOOKS / "systemd" / "offloadd.service")
    config = tmp_path / "offloadd.toml"
    config.write_text('[serve]\nlisten = "tcp://127.0.0.1:0"\nstate_dir = "' + str(tmp_path) +
                      '/jobs"\n[commands]\nsh = "/bin/sh"\n')
    argv = unit_command(unit, "ExecStart", {"/etc/offloadfs/offloadd.toml": str(config)})
    journal = JournalPipe()
    proc = subprocess.Popen(argv, env=journal.env, stderr=journal.w, cwd=tmp_path,
                            start_new_session=True)
    journal.started()
    try:
        port = wait_for(lambda: next((m.group(1) for m in map(re.compile(
            r"^<6>listening on tcp://127\.0\.0\.1:(\d+) ").match, journal.lines()) if m),
            None), 20, "offloadd to listen")
        root = run([OFFLD, "-H", f"127.0.0.1:{port}", "--", "sh", "-c", "exit 0"], cwd=work)
        assert root.returncode == 255 and "root" in root.stderr
        wait_for(lambda: any(line.startswith("<4>refused job ") and ", uid 0, " in line
                             for line in journal.lines()), 20, "the refusal's warning")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        lines = journal.lines()
        assert lines and all(re.match(r"<[2-7]>[^<0-9]", line) for line in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        journal.close()


def test_offloadd_unit_stops_its_jobs_on_sigterm_to_the_daemon_alone(tmp_path, work):
    """SIGTERM to offloadd alone (KillMode=mixed) kills its job; the client gets 255, offloadd 0."""
    unit = unit_settings(HOOKS / "systemd" / "offloadd.service")
    config = tmp_path / "offloadd.toml"
    config.write_text('[serve]\nlisten = "tcp://127.0.0.1:0"\nallow_root = true\n'
                      '[commands]\nsh = "/bin/sh"\nsleep = "/bin/sleep"\n')
    argv = unit_command(unit, "ExecStart", {"/etc/offloadfs/offloadd.toml": str(config)})
    log_path = tmp_path / "offloadd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=venv_path_env(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    client = None
    try:
        port = wait_for(lambda: re.search(r"tcp://127\.0\.0\.1:(\d+)", log_path.read_text()),
                        20, "offloadd to listen").group(1)
        client = subprocess.Popen([OFFLD, "-H", f"127.0.0.1:{port}", "--", "sh", "-c",
                                   "echo started; exec sleep 60"], cwd=work, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([client.stdout], [], [], 20)
        assert ready and client.stdout.readline() == "started\n", "the job did not start"
        proc.send_signal(signal.SIGTERM)
        assert client.wait(20) == 255
        assert len(client.stderr.read().splitlines()) == 1
        assert proc.wait(20) == 0
    finally:
        for p in (client, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if client is not None:
            client.stdout.close()
            client.stderr.close()


# --- the mount helper ----------------------------------------------------------------------------

@pytest.fixture
def helper_env():
    """The environment mount(8) would give the helper, with the venv's offloadfs."""
    return dict(os.environ, OFFLOADFS_BIN=OFFLOADFS)


def test_mount_helper_returns_with_the_mount_up(daemon, tmp_path, helper_env):
    """Called as mount(8) does, the helper returns with a working mount up, and refuses a second."""
    mnt = tmp_path / "shims here"
    mnt.mkdir()
    argv = [HELPER, "offloadfs", mnt, "-o", f"host={NO_HOST}+{daemon.hostport},_netdev,"
            "defaults,nofail,noauto,rw,nosuid,nodev,x-systemd.automount", "-n"]
    try:
        done = run(argv, env=helper_env)
        assert done.returncode == 0, done.stderr
        assert str(mnt).replace(" ", "\\040") in offloadfs_mounts()
        assert done.stderr == ""
        wait_for(lambda: (mnt / "sh").exists(), 20, "the sh shim")
        job = run([mnt / "sh", "-c", SLOT], cwd=tmp_path)
        assert job.returncode == 0 and job.stdout.strip().isdigit(), job
        assert source_profile("dash", "/usr/bin:/bin", mnt)[0] == f"{mnt}:/usr/bin:/bin"
        again = run(argv, env=helper_env)
        assert again.returncode == 32
        assert again.stderr.splitlines() == [
            f"mount.offloadfs: {mnt}: an offloadfs filesystem is already mounted there"]
    finally:
        unmount(mnt)


def test_mount_helper_fails_with_one_line(tmp_path, helper_env):
    """A mount that cannot happen (or not in time) exits non-zero with one line saying why."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        ([f"config={tmp_path}/missing.toml"], 32, f"{tmp_path}/missing.toml: No such file"),
        (["host=a:1,hsot=b"], 1, "unknown option 'hsot=b'"),
        (["remount"], 1, "'remount' is not supported"),
        (["host="], 1, "host= needs a value"),
    ]
    for opts, status, text in cases:
        done = run([HELPER, "none", mnt, "-o", ",".join(opts)], env=helper_env)
        assert done.returncode == status, (opts, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and text in done.stderr, (opts, done.stderr)
        assert done.stderr.startswith("mount.offloadfs: ")
    missing = run([HELPER, "none", tmp_path / "nowhere" / "mnt", "-o", "host=a"], env=helper_env)
    assert missing.returncode == 32
    assert missing.stderr == f"mount.offloadfs: {tmp_path}/nowhere/mnt: no such directory\n"
    no_binary = run([HELPER, "none", mnt],
                    env=dict(helper_env, OFFLOADFS_BIN="/nonexistent/offloadfs"))
    assert no_binary.returncode == 1 and "OFFLOADFS_BIN" in no_binary.stderr
    hangs = tmp_path / "hanging-offloadfs"
    hangs.write_text("#!/bin/sh\necho 'waiting for nothing' >&2\nexec sleep 60\n")
    hangs.chmod(0o755)
    late = run([HELPER, "none", mnt, "-o", "timeout=1"], env=dict(helper_env, OFFLOADFS_BIN=hangs))
    assert late.returncode == 32
    assert late.stderr == f"mount.offloadfs: {mnt}: not mounted after 1s (waiting for nothing)\n"
    assert str(mnt) not in fuse_mounts()


def test_mount_helper_translates_options(tmp_path, helper_env):
    """-f -v prints the offloadfs command for the options without mounting; -s allows unknowns."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = "host=h1:7788+h2,broker=lb1,config=/etc/o.toml,debug,user=alice,_netdev,mystery=1"
    done = run([HELPER, "offloadfs", f"{mnt}/", "-s", "-f", "-v", "-o", opts,
                "-t", "fuse.offloadfs"], env=helper_env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "mount.offloadfs: ignoring unknown option mystery=1",
        f"mount.offloadfs: {OFFLOADFS} mount {mnt} -H h1:7788 -H h2 -L lb1 -c /etc/o.toml -d"]
    assert str(mnt) not in fuse_mounts()


@pytest.fixture
def sbin_helpers():
    """The helper linked as /sbin/mount.offloadfs and /sbin/mount.fuse.offloadfs for one test."""
    links = [Path("/sbin/mount.offloadfs"), Path("/sbin/mount.fuse.offloadfs")]
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("needs mount(8) and root")
    if any(link.exists() or link.is_symlink() for link in links):
        pytest.skip("a mount.offloadfs helper is already installed in /sbin")
    made = []
    try:
        for link in links:
            link.symlink_to(HELPER)
            made.append(link)
        yield
    finally:
        for link in made:
            link.unlink()


def test_mount_command_and_fstab_line_use_the_helper(daemon, tmp_path, helper_env, sbin_helpers):
    """`mount -t offloadfs` and an fstab line of type fuse.offloadfs mount working shims."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"offloadfs {mnt} fuse.offloadfs host={daemon.hostport},"
                     f"config={tmp_path}/vm.toml,_netdev 0 0\n")
    (tmp_path / "vm.toml").write_text("[client]\nconnect_timeout = 5.0\n")
    for argv in (["mount", "-t", "offloadfs", "none", mnt, "-o", f"host={daemon.hostport}"],
                 ["mount", "-T", fstab, mnt]):
        try:
            done = run(argv, env=helper_env)
            assert done.returncode == 0, (argv, done.stderr)
            assert str(mnt) in offloadfs_mounts()
            wait_for(lambda: (mnt / "sh").exists(), 20, "the sh shim")
            job = run([mnt / "sh", "-c", SLOT], cwd=tmp_path)
            assert job.stdout.strip().isdigit(), job
        finally:
            unmount(mnt)


# --- auto_offload --------------------------------------------------------------------------------

def link(directory: Path, name: str, target: Path = AUTO) -> Path:
    """``directory/name`` -> ``target`` (the directory is made if needed)."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.symlink_to(target)
    return path


def refused(tmp_path: Path, host: str = NO_HOST) -> str:
    """offld's line when nothing listens at ``host``, named by the config wrapper_env writes."""
    config = tmp_path / f"vm-{host.replace(':', '-')}.toml"
    return (f"offld: {host} (from {config}): connection refused (is offloadd running there, on "
            f"that port?); the job never ran")


def wrapper_env(tmp_path: Path, host: str, first: list[Path] = (), **extra) -> dict:
    """An environment for the wrapper: a config naming ``host``, ``first`` dirs before PATH."""
    config = tmp_path / f"vm-{host.replace(':', '-')}.toml"
    config.write_text(f'[client]\nhosts = ["{host}"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD", "AUTO_OFFLOAD"))}
    env.update(OFFLD_BIN=OFFLD, OFFLOADFS_CONFIG=str(config),
               PATH=":".join([*map(str, first), os.environ["PATH"]]), **extra)
    return env


def test_auto_offload_runs_the_command_on_the_host(daemon, tmp_path, work):
    """A link named sh runs sh on the host, with stdin passed in and the exit status back."""
    links = tmp_path / "links"
    sh = link(links, "sh")
    link(links, "cat")
    env = wrapper_env(tmp_path, daemon.hostport, [links])
    done = run([sh, "-c", SLOT], env=env, cwd=work)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.strip().isdigit(), done.stdout
    assert run(["sh", "-c", "exit 3"], env=env, cwd=work).returncode == 3   # found on PATH
    piped = run(["cat"], env=env, cwd=work, input="through the host\n")
    assert piped.stdout == "through the host\n"
    assert "(cat) exited 0" in daemon.log() and "(sh) exited 3" in daemon.log()


def test_auto_offload_falls_back_to_the_next_command_on_path(tmp_path, work):
    """With no host answering, the link quietly runs the next sh on PATH, locally."""
    links = tmp_path / "links"
    link(links, "sh")
    env = wrapper_env(tmp_path, NO_HOST, [links])
    done = run(["sh", "-c", SLOT], env=env, cwd=work)
    assert (done.returncode, done.stdout, done.stderr) == (0, "local\n", "")
    debug = run(["sh", "-c", SLOT], env=dict(env, OFFLOADFS_DEBUG="1"), cwd=work)
    assert debug.stdout == "local\n"
    said = refused(tmp_path).replace("offld: ", "offld: debug: ", 1)
    assert f"{said}; running " in debug.stderr


def test_auto_offload_always_policy_never_runs_locally(tmp_path, work):
    """OFFLOAD_POLICY=always: no host means exit 255 with offld's line, and nothing ran here."""
    links = tmp_path / "links"
    sh = link(links, "sh")
    env = wrapper_env(tmp_path, NO_HOST, [links], OFFLOAD_POLICY="always")
    done = run([sh, "-c", "echo ran > ran-here"], env=env, cwd=work)
    assert done.returncode == 255
    assert done.stderr == refused(tmp_path) + "\n"
    assert not (work / "ran-here").exists()
    bad = run([sh, "-c", "true"], env=dict(env, OFFLOAD_POLICY="sometimes"), cwd=work)
    assert bad.returncode == 255 and "expected auto, always or never" in bad.stderr


def test_auto_offload_never_policy_runs_locally(daemon, tmp_path, work):
    """OFFLOAD_POLICY=never runs the local command even when a host answers."""
    links = tmp_path / "links"
    link(links, "sh")
    env = wrapper_env(tmp_path, daemon.hostport, [links], OFFLOAD_POLICY="never")
    done = run(["sh", "-c", SLOT], env=env, cwd=work)
    assert (done.returncode, done.stdout, done.stderr) == (0, "local\n", "")


def test_auto_offload_thesis_rename_runs_the_orig(tmp_path, work):
    """The thesis's rename (sh -> auto_offload, sh.orig the real one) falls back to sh.orig."""
    bindir = tmp_path / "bin"
    sh = link(bindir, "sh")
    orig = bindir / "sh.orig"
    orig.write_text('#!/bin/sh\necho "orig $*"\n')
    orig.chmod(0o755)
    done = run([sh, "a b", "c"], env=wrapper_env(tmp_path, NO_HOST), cwd=work)
    assert (done.returncode, done.stdout) == (0, "orig a b c\n")


def test_auto_offload_never_loops_into_itself(tmp_path, work):
    """Links or copies of the wrapper all over PATH end in one error line, never a loop."""
    name = "offloadfs-test-no-such-command"
    a, b = tmp_path / "a", tmp_path / "b"
    link(a, name)
    link(b, name)
    env = wrapper_env(tmp_path, NO_HOST, [a, b, a, tmp_path / "a/."])
    done = run([name], env=env, cwd=work, timeout=30)
    assert done.returncode == 255
    assert done.stderr.splitlines() == [refused(tmp_path)]
    c, d = tmp_path / "c", tmp_path / "d"   # copies: the same script under other inodes
    for directory in (c, d):
        directory.mkdir()
        shutil.copy(AUTO, directory / name)
    env = wrapper_env(tmp_path, NO_HOST, [c, d, c, d])
    done = run([name], env=env, cwd=work, timeout=30)
    assert done.returncode == 127
    assert "leads through 8 wrappers" in done.stderr.splitlines()[-1]
    assert len(done.stderr.splitlines()) == 1   # offld tried once, quietly; copies went on


@pytest.mark.parametrize("signum,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["TERM-to-wrapper", "INT-to-group"])
def test_auto_offload_passes_signals_to_the_job(signum, to_group, daemon, tmp_path, work):
    """TERM to the wrapper, or Ctrl-C's INT to its group, stops the remote job: exit 128+N."""
    links = tmp_path / "links"
    sh = link(links, "sh")
    env = wrapper_env(tmp_path, daemon.hostport, [links])
    proc = subprocess.Popen([str(sh), "-c", "echo started; exec sleep 60"], env=env, cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline() == "started\n", "the job did not start"
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        assert proc.wait(20) == 128 + signum
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wait_for(lambda: f"(sh) exited {128 + signum}" in daemon.log(), 10, "the job to end there")


def test_auto_offload_run_directly_explains_itself():
    """Run under its own name it prints how to install it and exits 2."""
    done = run([AUTO, "convert"])
    assert done.returncode == 2 and "ln -s" in done.stderr
