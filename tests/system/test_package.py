"""The packages as an operator gets them: the wheel in a fresh venv outside the tree, the sdist's
own tests, and the Debian package (``make deb``) installed in a clean Debian chroot.

Each runs the installed programs, never the tree's: ``--version``, ``--help``, and a real job
through a real ``offloadd serve`` on an ephemeral loopback port. The wheel's dependencies come
from a wheelhouse cached by their list (built once with pip, then offline); the chroot's base
is Debian bookworm with exactly the package's Depends, cached by that list (mmdebstrap, as the
guest image's base, tests/guest/image.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from offloadfs import __version__
from tests.guest import image

from ..harness import LISTENING, ROOT, STOP_DEADLINE, Proc, free_port, processes_in, wait_for

PROGRAMS = ("offloadfs", "offld", "offloadd")
STEP_TIMEOUT = 300    # seconds for one build or install step
USER, UID = "alice", 2000   # the chroot's caller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # a first run builds the caches


def run(argv, timeout: float = STEP_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion (bounded), its output captured as text."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, **kw)


def ok(argv, **kw) -> subprocess.CompletedProcess:
    """:func:`run`, which must exit 0 (else the failure shows its output)."""
    done = run(argv, **kw)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


@contextlib.contextmanager
def cache_lock():
    """The guest image's cache directory, locked against other builders meanwhile."""
    image.CACHE.mkdir(parents=True, exist_ok=True)
    with open(image.CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield image.CACHE


def cached(name: str, build, keep: int = 3) -> Path:
    """``CACHE/name``, made by ``build(partial_path)`` if missing. Of the other entries of its
    kind (the part of ``name`` before its key), the newest used stay, as the guest image's
    prune keeps some (other checkouts may be using theirs)."""
    with cache_lock() as cache:
        out = cache / name
        if not out.exists():
            partial = cache / f"partial-{name}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
            build(partial)
            partial.rename(out)
        os.utime(out)
        kind = name.split("-")[0]
        used = sorted(cache.glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in used[keep:]:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return out


# --- the wheel and the sdist ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it (``python -m build``, as ``make dist``)."""
    out = tmp_path_factory.mktemp("dist")
    ok([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])
    return {"sdist": only(out, "*.tar.gz"), "wheel": only(out, "*.whl")}


def only(directory: Path, pattern: str) -> Path:
    """The one file of ``directory`` matching ``pattern``."""
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}: {found}"
    return found[0]


def requirements(wheel: Path, extras=("test",)) -> list[str]:
    """The wheel's Requires-Dist, those of ``extras`` included, without their markers."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"offloadfs-{__version__}.dist-info/METADATA").decode()
    out = []
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req, _, marker = line.partition(";")
        extra = re.search(r"extra == \"(\w+)\"", marker)
        if not extra or extra.group(1) in extras:
            out.append(req.strip())
    return sorted(out)


def wheelhouse(reqs: list[str]) -> Path:
    """Wheels of ``reqs`` and their dependencies, cached by the list (pip, once)."""
    def build(partial: Path) -> None:
        ok([sys.executable, "-m", "pip", "wheel", "-q", "-w", partial, *reqs])

    return cached(f"wheels-{image.digest(*(r.encode() for r in reqs))}", build)


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Path:
    """A fresh venv outside the tree (Debian's python3), the wheel and its test extra installed
    offline from the wheelhouse."""
    path = tmp_path_factory.mktemp("venv")
    assert not path.is_relative_to(ROOT)
    house = wheelhouse(requirements(dists["wheel"]))
    ok([shutil.which("python3", path="/usr/bin") or sys.executable, "-m", "venv", path])
    ok([path / "bin/pip", "install", "-q", "--no-index", "--find-links", house,
        f"{dists['wheel']}[test]"])
    return path


def test_the_installed_programs_run_and_say_their_version(venv):
    """``offld --version``, ``offloadd --version``, ``offloadfs --help`` from the venv; the
    modules are the wheel's, not the tree's."""
    for prog in PROGRAMS:
        assert ok([venv / "bin" / prog, "--version"]).stdout == f"{prog} {__version__}\n"
    assert "mount" in ok([venv / "bin/offloadfs", "--help"]).stdout
    where = ok([venv / "bin/python", "-c", "import offloadfs, offloadd; "
                "print(offloadfs.__file__); print(offloadd.__file__)"], cwd="/").stdout
    assert all(Path(p).is_relative_to(venv) for p in where.split()), where
    spawn = ok([venv / "bin/python", "-c", "import offloadd._spawn as s; print(s.__file__)"],
               cwd="/").stdout
    assert Path(spawn.strip()).is_relative_to(venv), "the wheel lacks the compiled spawn"
    program = ok([venv / "bin/python", "-c", "from offloadfs import shim; print(shim.PROGRAM)"],
                 cwd="/").stdout.strip()
    assert Path(program).is_relative_to(venv) and Path(program).read_bytes()[:4] == b"\x7fELF", \
        "the wheel lacks the compiled shim"


def test_the_wheel_brings_man_pages_completions_hooks_and_examples(venv):
    """What an operator needs lands under the venv's share/, the license in its metadata, and
    man finds the pages through PATH."""
    share = venv / "share"
    for prog in PROGRAMS:
        assert (share / "man/man1" / f"{prog}.1").read_text().startswith(f".TH {prog.upper()}")
        assert (share / "bash-completion/completions" / prog).is_file()
        assert (share / "zsh/site-functions" / f"_{prog}").read_text().startswith("#compdef")
    for name in ("offloadfs.toml.example", "offloadd.toml.example"):
        assert (share / "offloadfs/examples" / name).read_text() == \
            (ROOT / "hooks/etc" / name).read_text()
    hooks = share / "offloadfs/hooks"
    for name in ("mount.offloadfs", "auto_offload"):
        assert os.access(hooks / name, os.X_OK), name
    assert {p.name for p in (hooks / "systemd").iterdir()} == {"offloadd.service",
                                                               "offloadfs.service"}
    assert (hooks / "profile.d/offloadfs.sh").is_file()
    license_text = only(venv / "lib", f"python3*/site-packages/offloadfs-{__version__}"
                        ".dist-info/LICENSE").read_text()
    assert "MIT License" in license_text and "The offloadfs developers" in license_text
    if shutil.which("man"):
        env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
        env.pop("MANPATH", None)
        assert ok(["man", "-w", "offld"], env=env).stdout.strip() == \
            str(share / "man/man1/offld.1")


def test_bash_completes_subcommands_and_flags(venv):
    """The installed bash completion completes ``offloadd se`` and ``offld --fal``."""
    script = ('source "$1"; COMP_WORDS=($2 $3); COMP_CWORD=1; COMP_LINE="$2 $3"; '
              'COMP_POINT=${#COMP_LINE}; "_shtab_$2"; printf "%s\\n" "${COMPREPLY[@]}"')
    completions = venv / "share/bash-completion/completions"
    for prog, typed, want in (("offloadd", "se", "serve"), ("offld", "--fal", "--fallback")):
        got = ok(["bash", "-c", script, "bash", completions / prog, prog, typed]).stdout
        assert got.split() == [want], got


def test_a_real_job_runs_from_the_installed_wheel(venv, tmp_path):
    """The venv's offloadd serves, the venv's offld runs ``echo`` there: its output and exit
    status come back."""
    daemon = Proc([venv / "bin/offloadd", "serve", "--listen", "tcp://127.0.0.1:0",
                   "--command=echo=/bin/echo", "--command=sh=/bin/sh", "--allow-root"],
                  tmp_path / "offloadd.log", cwd=tmp_path, what="the venv's offloadd")
    try:
        port = daemon.ready_log(LISTENING).group(3)
        offld = [venv / "bin/offld", "-H", f"127.0.0.1:{port}", "--"]
        assert ok([*offld, "echo", "hi", "from", "the", "wheel"], cwd=tmp_path).stdout == \
            "hi from the wheel\n"
        assert run([*offld, "sh", "-c", "exit 3"], cwd=tmp_path).returncode == 3
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_the_sdist_holds_a_test_tree_whose_unit_tests_pass(dists, venv, tmp_path):
    """Unpacked, the sdist has the whole test tree, and its unit tests pass against the
    installed wheel."""
    ok(["tar", "-C", tmp_path, "-xzf", dists["sdist"]])
    top = tmp_path / f"offloadfs-{__version__}"
    for name in ("LICENSE", "Makefile", "MANIFEST.in", "tests/__init__.py", "tests/conftest.py",
                 "tests/harness.py", "tests/fakes.py", "tests/data/fakehost.py",
                 "tests/guest/image.py", "tests/unit/test_protocol.py",
                 "tests/system/test_e2e.py", "bench/common.py", "docs/decisions.md",
                 "hooks/debian/control", "hooks/etc/offloadd.toml.example",
                 "hooks/man/offld.1", "scripts/build-deb", "offloadfs/_shim.c"):
        assert (top / name).is_file(), f"the sdist lacks {name}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = run([venv / "bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "--basetemp", tmp_path / "t", "tests/unit"], cwd=top, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout)


# --- the Debian package -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The package ``make deb`` builds (scripts/build-deb, from the sdist)."""
    if not (shutil.which("dpkg-buildpackage") and shutil.which("dh")):
        pytest.skip("debhelper is not installed (make test and make deb install it)")
    out = tmp_path_factory.mktemp("deb")
    ok([ROOT / "scripts/build-deb", out], env={**os.environ, "PYTHON": sys.executable})
    arch = ok(["dpkg", "--print-architecture"]).stdout.strip()
    return only(out, f"offloadfs_{__version__}_{arch}.deb")


def field(deb: Path, name: str) -> str:
    """A field of the package's control file."""
    return ok(["dpkg-deb", "-f", deb, name]).stdout.strip()


def test_the_deb_has_the_programs_units_hooks_examples_and_pages(deb, tmp_path):
    """``dpkg-deb -c``: each thing where the system looks for it; ``-I``: Debian's Python
    packages as Depends; the units are neither enabled nor started on install."""
    listing = ok(["dpkg-deb", "-c", deb]).stdout
    entries = {line.split()[5].removeprefix("."): line.split()[0] for line in
               listing.splitlines()}
    doc = "/usr/share/doc/offloadfs"
    for path in ("/usr/bin/offloadfs", "/usr/bin/offld", "/usr/bin/offloadd",
                 "/sbin/mount.offloadfs", "/usr/lib/offloadfs/auto_offload"):
        assert entries.get(path, "").startswith("-rwxr-xr-x"), path
    assert entries["/sbin/mount.fuse.offloadfs"].startswith("l")
    for path in ("/lib/systemd/system/offloadd.service", "/lib/systemd/system/offloadfs.service",
                 "/etc/profile.d/offloadfs.sh", f"{doc}/examples/offloadfs.toml.example",
                 f"{doc}/examples/offloadd.toml.example", f"{doc}/README.hooks.md.gz",
                 "/usr/share/man/man1/offld.1.gz", "/usr/share/man/man1/offloadd.1.gz",
                 "/usr/share/man/man1/offloadfs.1.gz",
                 "/usr/share/bash-completion/completions/offld",
                 "/usr/share/zsh/vendor-completions/_offloadd",
                 "/usr/lib/python3/dist-packages/offloadfs/offld.py",
                 "/usr/lib/python3/dist-packages/offloadd/server.py"):
        assert entries.get(path, "").startswith("-rw-r--r--"), path
    assert any(re.fullmatch(r"/usr/lib/python3/dist-packages/offloadd/_spawn\.cpython-.+\.so", p)
               for p in entries), "the .deb lacks the compiled spawn"
    assert entries.get("/usr/lib/python3/dist-packages/offloadfs/_shim", "").startswith("-"), \
        "the .deb lacks the compiled shim"
    assert "/etc/offloadfs/" in entries and not any(p.startswith("/usr/share/offloadfs")
                                                    for p in entries)
    depends = field(deb, "Depends")
    for pkg in ("python3-zmq", "python3-msgpack", "python3-prometheus-client", "python3-fusepy",
                "fuse3", "libfuse2"):
        assert pkg in depends
    ok(["dpkg-deb", "-e", deb, tmp_path / "control"])
    assert (tmp_path / "control/conffiles").read_text().split() == ["/etc/profile.d/offloadfs.sh"]
    postinst = (tmp_path / "control/postinst").read_text()
    assert "deb-systemd-invoke start" not in postinst
    assert postinst.count("helper enable") == postinst.count("was-enabled")   # kept, not made


def depends(deb: Path) -> list[str]:
    """The package's Depends as package names (the first of each alternative)."""
    return sorted({re.split(r"[\s:(]", alt.split("|")[0].strip())[0]
                   for alt in field(deb, "Depends").split(",")})


def chroot_base(packages: list[str]) -> Path:
    """A tarball of Debian bookworm with ``packages`` (and what useradd and mount need),
    cached by that list."""
    wanted = sorted({*packages, "passwd", "mount"})

    def build(partial: Path) -> None:
        ok(["mmdebstrap", "--variant=apt", "--include=" + ",".join(wanted), image.SUITE,
            partial, *image.MIRRORS], timeout=900)

    key = image.digest(image.SUITE.encode(), "\n".join(image.MIRRORS).encode(),
                       " ".join(wanted).encode())
    return cached(f"chroot-{key}.tar", build)


def in_chroot(root: Path, *argv, user: str | None = None) -> list[str]:
    """The argv that runs ``argv`` in ``root`` (its own mount namespace with /proc and /dev;
    as ``user`` from their home with a clean environment, if given)."""
    script = ('mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
              'exec chroot "$@"')
    inside = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(root)]
    if user is None:
        return [*inside, str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", *map(str, argv)]
    return [*inside, f"--userspec={user}:{user}", str(root), "env", "-i", f"HOME=/home/{user}",
            f"USER={user}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", "sh", "-c", 'cd && exec "$@"',
            "sh", *map(str, argv)]


@pytest.fixture
def chroot(deb, tmp_path):
    """A clean bookworm tree with exactly the package's Depends, the package installed with
    dpkg (which checks them), and a user; removed afterwards."""
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (make test installs it)")
    base = chroot_base(depends(deb))
    root = tmp_path / "root"
    root.mkdir()
    try:
        ok(["tar", "-C", root, "-xf", base])
        shutil.copy(deb, root / "tmp/offloadfs.deb")
        ok(in_chroot(root, "dpkg", "-i", "/tmp/offloadfs.deb"))
        ok(in_chroot(root, "useradd", "-m", "-u", UID, "-s", "/bin/sh", USER))
        yield root
    finally:
        shutil.rmtree(root)


# The demo's shim run, in the chroot as root: mount with mount(8) (the package's mount helper),
# wait for the host's echo to appear as a shim, run it as the user, see the profile.d snippet
# put the mount first on a login shell's PATH, and unmount (the test waits for the mount
# process to go).
SHIM_SCRIPT = f"""set -eu
mkdir -p /opt/offload
mount -t offloadfs none /opt/offload -o host=$1
n=0
until [ -e /opt/offload/echo ]; do n=$((n+1)); [ $n -lt 200 ] || exit 9; sleep 0.05; done
su {USER} -s /bin/sh -c 'cd && /opt/offload/echo via the shim'
offloadfs status | grep '^  shims: '
su - {USER} -s /bin/sh -c 'echo "PATH starts with ${{PATH%%:*}}"'
umount /opt/offload
"""


def unit_command(root: Path, unit: str) -> list[str]:
    """The ExecStart command line of an installed unit."""
    text = (root / "lib/systemd/system" / unit).read_text()
    line = re.search(r"^ExecStart=[-@+!:]*(.+)$", text, re.M).group(1)
    return shlex.split(line)


@contextlib.contextmanager
def chroot_daemon(root: Path, tmp_path: Path, *flags: str):
    """offloadd.service's command line in the chroot (and ``flags``), with the example config
    copied to /etc/offloadfs as an operator would, on an ephemeral port allowing echo and id;
    yields HOST:PORT. Afterwards it must exit cleanly, and nothing may be left in the chroot."""
    ok(in_chroot(root, "cp", "/usr/share/doc/offloadfs/examples/offloadd.toml.example",
                 "/etc/offloadfs/offloadd.toml"))
    serve = [*unit_command(root, "offloadd.service"), "--listen", "tcp://127.0.0.1:0",
             "--command=echo=/bin/echo", "--command=id=/usr/bin/id", *flags]
    daemon = Proc(in_chroot(root, *serve), tmp_path / "offloadd.log", cwd=tmp_path,
                  what="offloadd in the chroot")
    try:
        yield f"127.0.0.1:{daemon.ready_log(LISTENING).group(3)}"
    finally:
        assert daemon.stop() == 0, daemon.log()
        wait_for(lambda: not processes_in(root), STOP_DEADLINE, "the chroot's processes to end")


def test_the_deb_installs_in_a_clean_chroot_and_runs_a_job_as_the_caller(chroot, tmp_path):
    """In the chroot: the programs say their version, the mount helper checks an fstab line's
    options, and offloadd.service's command line serves a job that runs as its caller; root
    is refused."""
    for prog in PROGRAMS:
        assert ok(in_chroot(chroot, prog, "--version")).stdout == f"{prog} {__version__}\n"
    assert "mount" in ok(in_chroot(chroot, "offloadfs", "--help")).stdout
    ok(in_chroot(chroot, "/sbin/mount.offloadfs", "none", "/opt/offload", "-f",
                 "-o", "host=127.0.0.1:7788,_netdev"))
    with chroot_daemon(chroot, tmp_path) as host:
        job = ok(in_chroot(chroot, "offld", "-H", host, "--", "echo", "hi", user=USER))
        assert job.stdout == "hi\n"
        assert ok(in_chroot(chroot, "offld", "-H", host, "--", "id", "-u", user=USER)).stdout \
            == f"{UID}\n"
        as_root = run(in_chroot(chroot, "offld", "-H", host, "--", "echo", "hi"))
        assert as_root.returncode == 255 and as_root.stdout == ""
        assert len(as_root.stderr.splitlines()) == 1 and "root" in as_root.stderr, \
            as_root.stderr
    assert "jobs start by fork" not in (tmp_path / "offloadd.log").read_text(), \
        "the .deb's offloadd lacks its compiled spawn"


def test_the_demos_shim_runs_from_the_deb_in_the_chroot(chroot, tmp_path):
    """The demo's unchanged command line through the shim mount in the chroot (FUSE, /dev bound
    in), mounted by mount(8) through the package's helper; the profile.d snippet puts the
    mount first on a login shell's PATH."""
    with chroot_daemon(chroot, tmp_path) as host:
        shim = run(in_chroot(chroot, "sh", "-c", SHIM_SCRIPT, "sh", host), timeout=120)
        assert shim.returncode == 0, shim.stdout + shim.stderr
        assert shim.stdout.splitlines() == ["via the shim", "  shims: the compiled program",
                                            "PATH starts with /opt/offload"]


def test_the_debs_daemon_serves_metrics_with_debians_prometheus_client(chroot, tmp_path):
    """offloadd --metrics from the .deb, on Debian's prometheus_client 0.16: the job's count
    shows, and no _created series (0.16 has no switch for them, only a module flag)."""
    port = free_port()
    with chroot_daemon(chroot, tmp_path, f"--metrics=127.0.0.1:{port}") as host:
        ok(in_chroot(chroot, "offld", "-H", host, "--", "echo", "hi", user=USER))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
    assert re.search(r'^offload_daemon_jobs_total\{.*command="echo".*\} 1\.0$', text, re.M), text
    assert "_created" not in text
