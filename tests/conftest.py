"""The pytest fixtures over tests/harness.py: real daemons, brokers and mounts on ephemeral
loopback ports, and leak checks.

Every test gets ``leak_check`` (autouse): at teardown no process may still run with its cwd or
command line inside the test's tmp_path, and the test process has no extra threads or fds.
"""
from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import pytest

from offloadfs import shim

from .harness import Broker, Daemon, Leftovers, Mount, mounts_under, started


@pytest.fixture
def start_mount(tmp_path):
    """Factory for mounts; each is unmounted at teardown, and none may be left mounted."""
    yield from started(functools.partial(Mount, tmp_path), Mount.unmount)
    left = mounts_under(tmp_path)
    assert not left, f"leftover mounts: {left}"


@pytest.fixture(params=["program", "script"])
def shim_kind(request, monkeypatch):
    """The test twice: mounts serving the compiled shim (what `make install` builds), and
    the sh script (OFFLOADFS_SHIM=script, as where no compiler was); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("shim_kind")``."""
    if request.param == "script":
        monkeypatch.setenv(shim.CHOICE, "script")
    else:
        monkeypatch.delenv(shim.CHOICE, raising=False)
        assert shim.program() is not None, f"{shim.PROGRAM} is not built (make install)"
    return request.param


@pytest.fixture(autouse=True)
def leak_check(tmp_path, monkeypatch):
    """Fail a test that leaves processes, threads or fds behind; isolate the job log."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    before = Leftovers()
    yield
    before.check(tmp_path)


@pytest.fixture
def start_daemon(tmp_path):
    """Factory for daemons; each is stopped at teardown and must exit cleanly."""
    codes = yield from started(functools.partial(Daemon, tmp_path), Daemon.stop)
    assert all(c in (0, -signal.SIGKILL) for c in codes.values()), f"daemon exit codes {codes}"


@pytest.fixture
def start_broker(tmp_path):
    """Factory of brokers, stopped at teardown."""
    yield from started(functools.partial(Broker, tmp_path), Broker.stop)


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    """A daemon that allows the test commands and root."""
    return start_daemon()


@pytest.fixture
def traversable(tmp_path, tmp_path_factory) -> Path:
    """Make the directories down to tmp_path traversable by other users (0711), so tests can
    run shims as test users (pytest makes them 0700)."""
    top = tmp_path_factory.getbasetemp().parent
    path = tmp_path
    while True:
        os.chmod(path, os.stat(path).st_mode | 0o711)
        if path == top or path == path.parent:
            return tmp_path
        path = path.parent


@pytest.fixture
def work(tmp_path) -> Path:
    """The caller's working directory."""
    path = tmp_path / "work"
    path.mkdir()
    return path
