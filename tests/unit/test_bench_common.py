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
