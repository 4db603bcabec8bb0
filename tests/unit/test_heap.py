"""offloadfs.heap (issue 16): a stream's freed chunks are kept for the next ones, so that the
kernel does not fault and zero every page of every chunk anew."""
import subprocess
import sys

# A credit window of 1 MiB chunks read, then freed together, 50 times over, in a fresh
# interpreter; prints the minor page faults the rounds took. With glibc's defaults the heap
# top is trimmed after each round and every page faults again (about 100,000 faults here).
WINDOWS = """
import os, resource, sys
from offloadfs import heap
tuned = heap.keep_stream_buffers() if sys.argv[1] == "tuned" else None
fd = os.open("/dev/zero", os.O_RDONLY)
window = [os.read(fd, 1 << 20) for _ in range(8)]
del window
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    window = [os.read(fd, 1 << 20) for _ in range(8)]
    del window
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    """(what keep_stream_buffers said, the page faults of 50 windows) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", WINDOWS, mode], capture_output=True,
                          text=True, timeout=60, check=True)
    said, n = done.stdout.split()
    return said, int(n)


def test_a_window_of_chunks_reuses_warm_pages():
    """After keep_stream_buffers, 400 MiB of chunks through an 8 MiB window take a few
    hundred page faults at most, not one per 4 KiB page (102,400)."""
    said, n = faults("tuned")
    assert said == "True" and n < 1000


def test_the_tuning_is_only_done_when_asked():
    """Importing offloadfs.heap changes nothing (a job without streams pays no ctypes)."""
    done = subprocess.run([sys.executable, "-c", "import offloadfs.heap, sys; "
                           "print('ctypes' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False"]
