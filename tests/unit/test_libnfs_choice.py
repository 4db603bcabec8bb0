"""Which libnfs the userspace NFS client loads and what it then does (binding.load_libnfs), fed
fake loaders: libnfs 5 (libnfs14) before 4.0 (libnfs13), libnfs 6 refused, one line when none."""

import os

import pytest
from offloadd.nfs import binding

NFS_4 = set(binding.SIGNATURES)                            # libnfs 4.0.0: what we call
NFS_5 = NFS_4 | {"rpc_nfs4_compound_async2", "nfs_set_writemax"}
NFS_6 = NFS_5 - {"nfs_create"}


class FakeFunc:
    """A C function: restype/argtypes can be set."""

    restype = argtypes = None


class FakeLib:
    """A loaded library exporting ``symbols``."""

    def __init__(self, name: str, symbols: set):
        self.name = name
        self._funcs = {s: FakeFunc() for s in symbols}

    def __getattr__(self, symbol):
        try:
            return self._funcs[symbol]
        except KeyError:
            raise AttributeError(symbol) from None


def loader(installed: dict):
    """A dlopen that finds the libraries in ``installed`` (name -> symbols), and records
    what it was asked for."""
    def dlopen(name):
        dlopen.asked.append(name)
        if name not in installed:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return FakeLib(name, installed[name])
    dlopen.asked = []
    return dlopen


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(binding.LIBNFS_ENV, raising=False)


def test_libnfs5_is_preferred_and_writes_through_libnfs():
    dlopen = loader({"libnfs.so.14": NFS_5, "libnfs.so.13": NFS_4})
    lib, abi = binding.load_libnfs(dlopen=dlopen)
    assert (lib.name, abi) == ("libnfs.so.14", binding.Abi("libnfs.so.14", True))
    assert dlopen.asked == ["libnfs.so.14"]
    assert lib.nfs_pwrite.argtypes == binding.SIGNATURES["nfs_pwrite"][1]


def test_libnfs4_alone_keeps_the_small_write_workaround():
    dlopen = loader({"libnfs.so.13": NFS_4})
    lib, abi = binding.load_libnfs(dlopen=dlopen)
    assert (lib.name, abi.large_writes) == ("libnfs.so.13", False)
    assert dlopen.asked == ["libnfs.so.14", "libnfs.so.13"]
    assert str(abi) == "libnfs.so.13 (libnfs 4.0)"


def test_no_libnfs_is_one_line_with_the_loaders_errors():
    with pytest.raises(binding.LibnfsUnavailable) as info:
        binding.load_libnfs(dlopen=loader({"libnfs.so.16": NFS_6}))
    text = str(info.value)
    assert text.startswith("the userspace NFS client needs libnfs (libnfs13 or libnfs14): "
                           "libnfs.so.14: cannot open shared object file")
    assert "libnfs.so.13: cannot open" in text and "\n" not in text


def test_the_override_is_the_only_library_tried(monkeypatch):
    """$OFFLOADFS_LIBNFS: a path tried alone; what it can do comes from its symbols."""
    path = "/opt/libnfs/lib/libnfs.so.14.0.0"
    monkeypatch.setenv(binding.LIBNFS_ENV, path)
    dlopen = loader({path: NFS_5, "libnfs.so.13": NFS_4})
    lib, abi = binding.load_libnfs(dlopen=dlopen)
    assert (dlopen.asked, abi) == ([path], binding.Abi(path, True))
    with pytest.raises(binding.LibnfsUnavailable, match="/nowhere/libnfs.so: cannot open"):
        binding.load_libnfs(dlopen=loader({}), override="/nowhere/libnfs.so")


def test_libnfs6_is_refused_by_its_symbols_not_its_name():
    """libnfs 6 reordered nfs_pwrite's arguments: calling it as 4.0 would corrupt data."""
    with pytest.raises(binding.LibnfsUnavailable, match="libnfs 6 or later"):
        binding.load_libnfs(dlopen=loader({"libnfs.so.14": NFS_6}))


def test_a_library_missing_a_function_we_call_is_refused():
    with pytest.raises(binding.LibnfsUnavailable, match="has no nfs_utimes"):
        binding.load_libnfs(dlopen=loader({"libnfs.so.13": NFS_4 - {"nfs_utimes"}}))


@pytest.mark.skipif(not os.path.exists("/usr/lib/x86_64-linux-gnu/libnfs.so.13"),
                    reason="Debian's libnfs13 is not installed")
def test_debian_12s_libnfs13_loads_as_libnfs4():
    """The real thing: dlopen of the system's libnfs13 (Debian 12 has no libnfs14)."""
    _, abi = binding.load_libnfs("libnfs.so.13")
    assert abi == binding.Abi("libnfs.so.13", False)


@pytest.mark.parametrize(("large_writes", "path", "given"), [
    (False, b"/d/f", b"/d/f"), (True, b"/d/f", b"/d/f/-"), (True, b"/", b"/-"),
    (True, b"/d/", b"/d/-")])
def test_chown_names_what_each_libnfs_changes(large_writes, path, given):
    """libnfs 5.x's nfs_chown changes the owner of the path's parent directory (it looks up
    the path without its last name): it is given one more name, so that parent is the file."""
    assert binding.chown_path(binding.Abi("libnfs", large_writes), path) == given
