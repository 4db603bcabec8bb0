"""Unit tests for offloadd.streams: one job's output within credit, stdin, credit given back."""
import collections

import zmq
from offloadd import limits
from offloadd.streams import MAX_CREDIT, JobStreams

from offloadfs import protocol


class FakeProcess:
    """Pipes as byte strings: ``out`` is what the job wrote; stdin takes ``room`` bytes."""

    def __init__(self, out: bytes = b"", room: int = 0):
        """Open stdout and stdin."""
        self.fds = {"stdout": 5, "stdin": 6}
        self.out, self.room = out, room
        self.pending: collections.deque = collections.deque()
        self.written = b""

    def is_open(self, name):
        """True while ``name`` is open."""
        return name in self.fds

    def read(self, name, n):
        """Up to ``n`` bytes of what the job wrote."""
        data, self.out = self.out[:n], self.out[n:]
        return data

    def feed(self, data):
        """Queue stdin data."""
        self.pending.append(data)

    def write_pending(self):
        """Write what fits in ``room``."""
        data = b"".join(self.pending)
        self.pending.clear()
        taken, rest = data[:self.room], data[self.room:]
        if rest:
            self.pending.append(rest)
        self.room -= len(taken)
        self.written += taken
        return len(taken)


def streams(window=1 << 20, limit=None):
    """A JobStreams for job ``j`` and the messages it sends, decoded."""
    sent: list = []
    return JobStreams("j", window, lambda frames: sent.append(protocol.decode(frames)),
                      limit), sent


def test_output_goes_within_credit_and_stops_at_none():
    """Output is read and sent up to the credit; no credit, no pipes wanted."""
    s, sent = streams(window=10)
    proc = FakeProcess(out=b"x" * 25)
    assert s.pump(proc, "stdout") and s.credit == 0
    assert [(m.kind, m.payload) for m in sent] == [("stdout", b"x" * 10)]
    wanted: list = []
    s.want(proc, lambda *a: wanted.append(a))
    assert wanted == []
    s.granted(MAX_CREDIT * 2)
    assert s.credit == MAX_CREDIT
    s.want(proc, lambda *a: wanted.append(a))
    assert wanted == [("stdout", 5, zmq.POLLIN)]


def test_output_past_the_limit_is_cut_and_reported():
    """What passes the output limit is not sent, and pump says so."""
    s, sent = streams(limit=4)
    assert not s.pump(FakeProcess(out=b"abcdef"), "stdout")
    assert [m.payload for m in sent] == [b"abcd"]


def test_stdin_credit_comes_back_in_batches_or_when_all_written():
    """Written stdin is owed back; a batch, or an empty queue, sends a credit message."""
    s, sent = streams()
    proc = FakeProcess(room=10)
    assert s.stdin(proc, b"y" * 30)
    assert proc.written == b"y" * 10 and sent == [] and s.owed == 10
    proc.room = 100
    s.written(proc)
    assert [(m.kind, m["n"]) for m in sent] == [("credit", 30)] and s.owed == 0
    s.staged(protocol.CREDIT_BATCH - 1)
    assert len(sent) == 1
    s.staged(1)
    assert sent[-1]["n"] == protocol.CREDIT_BATCH


def test_stdin_past_the_credit_is_refused():
    """A client that sends more stdin than its credit allows gets False, nothing fed."""
    s, _ = streams()
    proc = FakeProcess(room=0)
    chunk = b"z" * protocol.CHUNK
    results = [s.stdin(proc, chunk) for _ in range(2 * protocol.WINDOW // protocol.CHUNK + 1)]
    assert results[-1] is False and s.stdin_held > 2 * protocol.WINDOW - limits.STDIN_SLACK


def test_forgive_drops_what_is_owed():
    """After forgive() nothing is owed."""
    s, sent = streams()
    s.staged(5)
    s.forgive()
    assert s.owed == 0 and sent == []
