"""Keep freed stream buffers in the process's heap, so that the next chunk reuses warm pages.

A stream moves 1 MiB chunks: ``os.read`` makes a bytes object of that size and ZeroMQ a message
buffer for each one it receives. With glibc's defaults a chunk that size is either mmapped and
unmapped each time, or carved from the top of the heap, which is trimmed (given back to the
kernel) as soon as 128 KiB of it are free: either way each new chunk lands on fresh pages, and
the kernel takes a page fault and zeroes a page for every 4 KiB, which cost as much CPU as the
copies themselves (docs/decisions.md, "Streams"). Raising both thresholds keeps the freed
chunks for the next ones; what is kept stays bounded by the credit windows, which bound the
chunks alive at once. Best effort: a libc without ``mallopt`` (musl) keeps its own ways.
"""
from __future__ import annotations

import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's <malloc.h>
MMAP_THRESHOLD = 4 * 1024 * 1024   # above a chunk with its header: chunks come from the heap
TRIM_THRESHOLD = 16 * 1024 * 1024  # free heap top kept before it is given back (two windows)


@functools.cache
def keep_stream_buffers() -> bool:
    """Tune this process's malloc for stream chunks (once; ``ctypes`` only when a stream
    flows, so that a job without one starts no slower); True if the libc took it."""
    import ctypes  # 3 ms to import: not at start-up
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
