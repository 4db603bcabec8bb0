"""bench.common's own rules (no processes started)."""
import os
import subprocess
import sys

from bench.common import compile_package


def test_bench_compiles_the_package_as_an_install_would(tmp_path):
    """compile_package leaves bytecode that a PYTHONDONTWRITEBYTECODE=1 import then uses."""
    for top in ("offloadfs", "daemon"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("X = 1\n")
    assert compile_package(tmp_path) == 2
    assert compile_package(tmp_path) == 0          # nothing new the second time
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(tmp_path))
    code = "import offloadfs, sys; print(offloadfs.__cached__)"
    cached = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.exists(cached)


def test_steal_is_the_share_of_cpu_time_since_the_runs_start(monkeypatch):
    """machine_info's steal_pct: steal ticks over all ticks (not guest time) since
    mark_run_start; None before any mark."""
    from bench import common
    monkeypatch.setattr(common, "_run_started", [])
    assert common.steal_pct() is None
    ticks = iter([[100, 0, 50, 800, 0, 0, 0, 50, 7, 0],
                  [160, 0, 70, 880, 0, 0, 0, 90, 9, 0]])   # +60 +20 +80 idle +40 steal
    monkeypatch.setattr(common, "cpu_ticks", lambda: next(ticks))
    common.mark_run_start()
    assert common.steal_pct() == 20.0
