"""Staging (offld -n): inputs travel in messages, outputs come back, no shared tree needed."""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from offloadfs import staging

from ..harness import CONVERT, OFFLD, marker_dir


@pytest.fixture
def stage_host(start_daemon, tmp_path, marker_tree):
    """A daemon that cannot see the caller's tree (a tmpfs hides it), with its own scratch."""
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[serve]\nscratch = "{tmp_path}/scratch"\n')
    return start_daemon("-c", str(cfg), marker=marker_tree)


@pytest.fixture
def marker_tree(tmp_path):
    """The caller's tree; the host sees an empty tmpfs in its place."""
    return marker_dir(tmp_path / "vm")


def offld_n(host, *command, cwd, **kw) -> subprocess.CompletedProcess:
    """offld -n against ``host`` (bounded)."""
    return subprocess.run([OFFLD, "-n", "-H", host.hostport, "--", *command], cwd=cwd,
                          capture_output=True, timeout=120, **kw)


def test_convert_staged_without_any_shared_tree(stage_host, marker_tree):
    """The host cannot see the files, yet convert -n reads in.png and writes out.png here."""
    subprocess.run([CONVERT, "-size", "500x400", "plasma:fractal", "-seed", "5", "in.png"],
                   cwd=marker_tree, check=True)
    subprocess.run([CONVERT, "in.png", "-blur", "0x2", "local.ppm"], cwd=marker_tree, check=True)
    got = offld_n(stage_host, "convert", "in.png", "-blur", "0x2", "out.ppm", cwd=marker_tree)
    assert got.returncode == 0, got.stderr
    assert (marker_tree / "out.ppm").read_bytes() == (marker_tree / "local.ppm").read_bytes()
    assert offld_n(stage_host, "cat", "where", cwd=marker_tree).stdout == b"vm\n"


def test_created_and_changed_files_come_back_unchanged_ones_do_not(stage_host, marker_tree):
    """New files (in new directories too) and changed inputs return; untouched inputs stay."""
    (marker_tree / "a.txt").write_text("a\n")
    (marker_tree / "b.txt").write_text("b\n")
    os.utime(marker_tree / "b.txt", (1, 1))
    got = offld_n(stage_host, "sh", "-c", "test -e a.txt || echo no-a; mkdir -p d/e; "
                  "echo n > d/e/n.txt", "sh", "b.txt", cwd=marker_tree)
    assert got.returncode == 0, got.stderr
    assert got.stdout == b"no-a\n"   # not named in argv: not staged
    assert (marker_tree / "a.txt").read_text() == "a\n"
    assert (marker_tree / "d/e/n.txt").read_text() == "n\n"
    assert os.stat(marker_tree / "b.txt").st_mtime == 1


def test_a_named_input_changed_by_the_job_comes_back(stage_host, marker_tree):
    """An input the job appends to is written back with its new contents."""
    (marker_tree / "log.txt").write_text("one\n")
    got = offld_n(stage_host, "sh", "-c", 'echo two >> "$1"', "sh", "log.txt", cwd=marker_tree)
    assert got.returncode == 0 and (marker_tree / "log.txt").read_text() == "one\ntwo\n"


def test_large_file_staged_both_ways(stage_host, marker_tree):
    """50 MB in and out: the same bytes."""
    data = os.urandom(50 * 1024 * 1024)
    (marker_tree / "big.bin").write_bytes(data)
    got = offld_n(stage_host, "sh", "-c", "cat big.bin > copy.bin", "sh", "big.bin",
                  cwd=marker_tree)
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256((marker_tree / "copy.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()


def test_a_failed_job_still_returns_what_it_wrote(stage_host, marker_tree):
    """As locally: a job that writes then fails leaves its output; its status is kept."""
    got = offld_n(stage_host, "sh", "-c", "echo partial > part.txt; exit 3", cwd=marker_tree)
    assert got.returncode == 3 and (marker_tree / "part.txt").read_text() == "partial\n"


def test_scratch_directory_is_removed(stage_host, marker_tree, tmp_path):
    """Nothing of a staged job stays on the host."""
    offld_n(stage_host, "sh", "-c", "echo x > y", cwd=marker_tree)
    assert os.listdir(tmp_path / "scratch") == []


def test_plan_picks_files_under_the_cwd_only(tmp_path):
    """Arguments that are files inside the cwd are staged; absolute ones are made relative."""
    (tmp_path / "in.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.txt").write_bytes(b"y")
    argv = [b"convert", b"in.png", str(tmp_path / "sub" / "s.txt").encode(), b"/etc/passwd",
            b"out.png", b"../x", b"-blur"]
    new, files = staging.plan(argv, str(tmp_path).encode())
    assert files == [b"in.png", b"sub/s.txt"]
    assert new == [b"convert", b"in.png", b"sub/s.txt", b"/etc/passwd", b"out.png", b"../x",
                   b"-blur"]


@pytest.fixture
def stage_mount(start_mount, stage_host, tmp_path):
    """Shims whose convert and sh are staged ([staging] commands)."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'[staging]\ncommands = ["convert", "sh"]\n'
                   f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    return start_mount(hosts=[stage_host.hostport], config=str(cfg), wait_for_shim="sh")


def _as(user: str, mount, script: str, cwd) -> subprocess.CompletedProcess:
    """A shell script run by ``user`` with the shims first on PATH (bounded)."""
    path = mount.env()["PATH"]   # runuser resets PATH: pass the shims' one on
    return subprocess.run(["runuser", "-u", user, "--", "env", f"PATH={path}", "/bin/sh", "-c",
                           script], cwd=cwd, capture_output=True, timeout=120)


def test_staged_command_through_the_shim_as_a_user(stage_mount, marker_tree, tmp_path, traversable):
    """A per-command staging policy: convert through the shim, results owned by the caller."""
    import pwd
    user = "offstage1"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    uid = pwd.getpwnam(user).pw_uid
    os.chmod(tmp_path, 0o755)
    work = marker_tree / "work"
    work.mkdir()
    os.chown(work, uid, uid)
    subprocess.run([CONVERT, "-size", "300x200", "plasma:fractal", "-seed", "2", "in.png"],
                   cwd=work, check=True)
    got = _as(user, stage_mount, "OFFLOADFS_DEBUG=1 convert in.png -negate out.ppm", work)
    assert got.returncode == 0 and b"ran on" in got.stderr, got.stderr
    want = subprocess.run([CONVERT, "in.png", "-negate", "ppm:-"], cwd=work,
                          capture_output=True).stdout
    assert (work / "out.ppm").read_bytes() == want and os.stat(work / "out.ppm").st_uid == uid


def test_staging_reads_only_what_the_caller_may(stage_mount, marker_tree, tmp_path, traversable):
    """A symlink in the caller's tree to a root-only file is not sent (the caller cannot read
    it)."""
    user = "offstage1"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    os.chmod(tmp_path, 0o755)
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o755)
    (secrets / "secret").write_text("root only\n")
    os.chmod(secrets / "secret", 0o600)
    work = marker_tree / "w2"
    work.mkdir()
    os.chmod(work, 0o777)
    (work / "dir").symlink_to(secrets)      # a directory link: O_NOFOLLOW does not stop it
    got = _as(user, stage_mount, "sh -c 'cat dir/secret' sh dir/secret", work)
    assert b"root only" not in got.stdout
