"""bench build's own rules (no build, no daemon): the source it trusts, the counters it
accepts, the builds it compares."""
import hashlib
import io
import tarfile

import pytest

from bench import build
from bench.common import BenchError


def write_source(cache, content=b"int x;\n", version="1:1.2.13.dfsg-1", sha=None):
    """A .dsc and an orig tarball (one top directory holding zlib.c) in ``cache``."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:bz2") as tar:
        info = tarfile.TarInfo("zlib-1.2.13/zlib.c")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    tarball = cache / "zlib_1.2.13.dfsg.orig.tar.bz2"
    tarball.write_bytes(data.getvalue())
    digest = sha or hashlib.sha256(data.getvalue()).hexdigest()
    (cache / "zlib_1.2.13.dfsg-1.dsc").write_text(
        f"Format: 3.0 (quilt)\nSource: zlib\nVersion: {version}\nChecksums-Sha256:\n"
        f" {digest} {len(data.getvalue())} {tarball.name}\n"
        f" {'0' * 64} 15700 zlib_1.2.13.dfsg-1.debian.tar.xz\nFiles:\n x 1 y\n")
    return tarball


def test_a_cached_tarball_matching_its_dsc_is_used_and_unpacked(tmp_path):
    """The source comes from the cache with the .dsc's version; it unpacks to its top dir."""
    write_source(tmp_path)
    src = build.source("zlib", tmp_path)
    assert (src.version, src.how) == ("1:1.2.13.dfsg-1", "cache")
    tree = build.unpack(src, tmp_path / "tree")
    assert (tree / "zlib.c").read_bytes() == b"int x;\n"
    (tree / "zlib.o").write_bytes(b"old build")
    assert not (build.unpack(src, tmp_path / "tree") / "zlib.o").exists()   # fresh each time


def test_a_tarball_that_does_not_match_its_dsc_is_not_trusted(tmp_path):
    """A changed tarball is not used from the cache (it would be fetched again)."""
    write_source(tmp_path, sha="1" * 64)
    assert build.cached_source("zlib", tmp_path) is None


def test_a_dsc_without_checksums_is_one_clear_error():
    """A broken .dsc stops the benchmark with one line, not a traceback."""
    with pytest.raises(BenchError, match="Checksums-Sha256"):
        build.dsc_fields("Version: 1\n")


def counts(jobs, failures=0, fallbacks=0):
    """A shim's counters as the mount gives them."""
    return {"jobs": jobs, "failures": failures, "fallbacks": fallbacks, "mean_ms": {}}


def test_jobs_per_build_are_the_counters_difference():
    """The jobs a build offloaded, per shim: after minus before."""
    before = {"gcc": counts(10), "make": counts(2)}
    after = {"gcc": counts(67), "make": counts(4)}
    assert build.offloaded(before, after) == {"gcc": 57, "make": 2}


@pytest.mark.parametrize("bad", [{"failures": 1}, {"fallbacks": 3}])
def test_a_build_with_a_failed_or_local_job_is_refused(bad):
    """A fallback to local would give the same output but measure the wrong thing."""
    with pytest.raises(BenchError, match="gcc shim"):
        build.offloaded({"gcc": counts(0)}, {"gcc": counts(5, **bad)})


def one(built, tests=("*** zlib test OK ***",), wall=1.0):
    """A build record."""
    return build.Build({"configure": 0.1, "make": wall, "check": 0.1}, 2.0, {"gcc": 3},
                       list(tests), dict(built))


def test_builds_that_left_different_objects_fail_naming_them():
    """An object that differs from the local build's is named in the error."""
    builds = {"local": [one({"a.o": "1", "b.o": "2"})],
              "shim_cc": [one({"a.o": "1", "b.o": "X"})],
              "shim_make": [one({"a.o": "1", "b.o": "2"})]}
    src = build.Source("zlib", "1", build.CACHE / "t", "0", "cache")
    with pytest.raises(BenchError, match=r"'shim_cc': \['b.o'\]"):
        build.results(src, builds)


def test_the_ratio_is_of_medians_and_judged_against_the_target(monkeypatch):
    """Median wall time over local's, per configuration, and whether it meets 1.2x."""
    monkeypatch.setattr(build, "machine_info", lambda: {})
    builds = {"local": [one({}, wall=w) for w in (10, 11, 30)],
              "shim_cc": [one({}, wall=w) for w in (11, 12, 12)],
              "shim_make": [one({}, wall=w) for w in (20, 20, 20)]}
    r = build.results(build.Source("zlib", "1", build.CACHE / "t", "0", "cache"), builds)
    assert r["local_p50_s"] == pytest.approx(11.2)
    assert r["shim_cc_ratio_p50"] == pytest.approx(12.2 / 11.2, abs=1e-3)
    assert (r["shim_cc_met"], r["shim_make_met"]) == (True, False)
    assert r["tests_ok"] == 1 and r["shim_cc_jobs_per_build"] == {"gcc": 3}


def test_make_s_own_lines_are_not_test_output():
    """make's Entering/Leaving lines name the tree; they are left out of the comparison."""
    out = "make[1]: Entering directory '/tmp/x'\nhello world\n*** zlib test OK ***\n"
    assert build.test_lines(out) == ["hello world", "*** zlib test OK ***"]


def test_built_hashes_cover_objects_and_libraries_only(tmp_path):
    """Objects, archives and shared libraries are compared; logs and sources are not."""
    for name in ("adler32.o", "adler32.lo", "libz.a", "libz.so.1.2.13", "configure.log",
                 "zlib.c"):
        (tmp_path / name).write_text(name)
    (tmp_path / "libz.so").symlink_to("libz.so.1.2.13")
    assert sorted(build.built_hashes(tmp_path)) == ["adler32.lo", "adler32.o", "libz.a",
                                                   "libz.so.1.2.13"]
