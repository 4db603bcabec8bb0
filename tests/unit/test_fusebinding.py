"""Which FUSE binding and libfuse the mounts get (fusebinding.choose), and the options each
libfuse is given: fed what is installed, no libfuse loaded for the rule itself."""

import pytest

from offloadfs import fusebinding as fb
from offloadfs.settings import ConfigError


def installed(*names):
    """A first_loading for a machine where the libraries ``names`` load; it records what it was
    asked."""
    def first_loading(candidates):
        first_loading.asked = list(candidates)
        return next((n for n in candidates if n in names), None)
    first_loading.asked = None
    return first_loading


def test_mfusepy_gets_libfuse3_before_libfuse2():
    assert fb.choose("", True, False, installed("libfuse.so.2", "libfuse3.so.3")) == \
        ("mfusepy", "libfuse3.so.3")


def test_the_newest_libfuse3_soname_first():
    """Debian 13's libfuse3-4 is libfuse3.so.4."""
    assert fb.choose("mfusepy", True, False, installed("libfuse3.so.4", "libfuse3.so.3")) == \
        ("mfusepy", "libfuse3.so.4")


def test_mfusepy_on_libfuse2_alone():
    assert fb.choose("", True, False, installed("libfuse.so.2")) == ("mfusepy", "libfuse.so.2")


def test_without_mfusepy_fusepy_is_the_fallback():
    """Debian packages only python3-fusepy; no libfuse is probed for it."""
    probe = installed("libfuse3.so.3", "libfuse.so.2")
    assert fb.choose("", False, False, probe) == ("fusepy", None)
    assert fb.choose("auto", False, False, probe) == ("fusepy", None)
    assert probe.asked is None


def test_fusepy_can_be_forced():
    assert fb.choose("fusepy", True, False, installed("libfuse3.so.3")) == ("fusepy", None)


def test_mfusepy_forced_but_missing_is_one_line():
    with pytest.raises(ConfigError, match="OFFLOADFS_FUSE=mfusepy, but mfusepy is not installed"):
        fb.choose("mfusepy", False, False, installed())


def test_a_bad_choice_is_one_line():
    with pytest.raises(ConfigError, match="must be mfusepy or fusepy, not 'pyfuse3'"):
        fb.choose("pyfuse3", True, False, installed())


def test_mfusepys_own_library_setting_wins():
    """FUSE_LIBRARY_PATH/NAME set by the user: we do not pick (nor probe) the libfuse."""
    probe = installed("libfuse3.so.3")
    assert fb.choose("", True, True, probe) == ("mfusepy", None)
    assert probe.asked is None


def test_no_libfuse_at_all_leaves_it_to_mfusepy_to_say_so():
    assert fb.choose("", True, False, installed()) == ("mfusepy", None)


class FakeLibfuse:
    """A libfuse whose fuse_version() is ``v``."""

    def __init__(self, v: int):
        self.v = v

    def fuse_version(self) -> int:
        return self.v


@pytest.mark.parametrize(("v", "want"), [(29, (2, 9)), (26, (2, 6)), (314, (3, 14)),
                                         (317, (3, 17))])
def test_libfuse_versions(v, want):
    assert fb.libfuse_version(FakeLibfuse(v)) == want


NFS_OPTIONS = {"allow_other": True, "big_writes": True, "max_read": 1 << 20,
               "max_write": 1 << 20, "max_readahead": 1 << 20, "use_ino": True,
               "nothreads": False}


def test_libfuse2_gets_the_options_as_given():
    assert fb.mount_options(NFS_OPTIONS, (2, 9)) == NFS_OPTIONS


def test_libfuse3_gets_no_libfuse2_options_and_no_thread_cap():
    """libfuse 3 refuses big_writes, max_write and max_readahead in fuse_main ("unknown
    option") and max_read unless init() sets it too, and from 3.12 on would serve at most 10
    requests at once."""
    got = fb.mount_options(NFS_OPTIONS, (3, 14))
    assert got == {"allow_other": True, "use_ino": True,
                   "nothreads": False, "max_threads": fb.MAX_THREADS,
                   "max_idle_threads": fb.MAX_THREADS}


def test_libfuse3_before_3_12_has_no_thread_options():
    """3.10 (Ubuntu 22.04) has no thread cap, and would refuse max_threads."""
    assert "max_threads" not in fb.mount_options(NFS_OPTIONS, (3, 10))


def test_single_threaded_libfuse3_gets_no_max_threads():
    assert "max_threads" not in fb.mount_options({"nothreads": True}, (3, 17))


def test_the_binding_in_use_is_one_of_the_two():
    """What this machine got (a real import): mfusepy or fusepy, with a libfuse it says."""
    assert fb.BINDING in ("mfusepy", "fusepy")
    assert fb.LIBFUSE[0] in (2, 3)
    assert fb.BINDING == "mfusepy" or fb.LIBFUSE[0] == 2
