"""Benchmarks of offloadfs: ``python -m bench NAME [--quick]``, results in bench/results/.

Each benchmark is one module with a docstring (its help line), an optional
``add_arguments(parser)`` and ``run(opts) -> dict``; register it in :data:`BENCHMARKS`.
"""
from . import (
    build,
    chaos,
    cluster,
    imagemagick,
    io,
    overhead,
    shim_designs,
    stream,
    terminal,
    thesis,
)

BENCHMARKS = {
    "overhead": overhead,
    "build": build,
    "imagemagick": imagemagick,
    "shim_designs": shim_designs,
    "cluster": cluster,
    "stream": stream,
    "io": io,
    "terminal": terminal,
    "chaos": chaos,
    "thesis": thesis,
}
