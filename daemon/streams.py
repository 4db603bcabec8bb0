"""One job's streams on the host: its output pipes pumped to the client within the client's
credit, its stdin held within ours, and the credit we owe the client back.

Flow control is by credit both ways (docs/decisions.md, "Wire and liveness"): the client
grants us ``credit`` bytes of output (``credit`` messages add to it), and we grant it stdin
(and staged input) bytes, which we give back in batches (``owed``) as they are written.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from offloadfs import heap, protocol, staging

from . import limits

if TYPE_CHECKING:
    from .runner import Process

MAX_CREDIT = 16 * 1024 * 1024   # a client may not make us buffer more than this per job


class JobStreams:
    """The streams of the job ``job_id``, whose messages to its client go through
    ``send(frames)``; ``output_limit`` (or None) bounds what its pipes may write in all. The
    server's loop thread calls everything, passing the job's process."""

    def __init__(self, job_id: str, window: int, send: Callable[[list], Any],
                 output_limit: int | None):
        """The client's first grant of output credit is ``window`` (capped at MAX_CREDIT)."""
        self.job_id = job_id
        self.send = send
        self.output_limit = output_limit
        self.credit = min(window, MAX_CREDIT)
        self.owed = 0
        self.output = 0
        self.stdin_held = 0         # stdin bytes received, not yet written to the process
        heap.keep_stream_buffers()

    def want(self, proc: Process, register: Callable[[str, int, int], Any]) -> None:
        """``register(role, fd, flags)`` each pipe that can make progress now."""
        if self.credit > 0:
            for name in protocol.STREAMS:
                if proc.is_open(name):
                    register(name, proc.fds[name], zmq.POLLIN)
        if proc.pending and proc.is_open("stdin"):
            register("stdin", proc.fds["stdin"], zmq.POLLOUT)

    def pump(self, proc: Process, name: str) -> bool:
        """Send what the job wrote on ``name``, within the client's credit; False when its
        output passed the output limit (the caller kills it)."""
        data = proc.read(name, min(protocol.CHUNK, self.credit))
        if not data:
            return True
        allowed = self.output_allowed(len(data))
        if allowed:
            self.credit -= allowed
            self.send(protocol.encode(name, self.job_id, data[:allowed]))
        return allowed == len(data)

    def output_allowed(self, n: int) -> int:
        """How many of ``n`` more output bytes the host's output limit lets through."""
        self.output += n
        limit = self.output_limit
        return n if limit is None else max(0, min(n, limit - (self.output - n)))

    def granted(self, n: int) -> None:
        """The client consumed output: it may receive ``n`` more bytes."""
        self.credit = min(self.credit + n, MAX_CREDIT)

    def stdin(self, proc: Process, data: bytes) -> bool:
        """Feed stdin data to the job; False (nothing fed) when the client sent more than its
        credit."""
        if proc.is_open("stdin"):
            self.stdin_held += len(data)
            held = self.stdin_held + limits.STDIN_SLACK * (len(proc.pending) + 1)
            if held > 2 * protocol.WINDOW:   # a client keeping to its credit stays under
                return False
        proc.feed(data)
        self.written(proc)
        return True

    def written(self, proc: Process) -> None:
        """Write what stdin the job takes; give the client back credit for it, in batches."""
        n = proc.write_pending()
        self.stdin_held -= n
        self._owe(n, not proc.pending)

    def staged(self, n: int) -> None:
        """``n`` bytes of staged input were written: the client gets them back in batches."""
        self._owe(n, False)

    def forgive(self) -> None:
        """Owe the client nothing (the server's rule once a staged job's input is all in)."""
        self.owed = 0

    def _owe(self, n: int, now: bool) -> None:
        """Owe the client ``n`` more bytes of credit; send it once a batch is due (or,
        ``now``, whatever is owed)."""
        self.owed += n
        if self.owed >= protocol.CREDIT_BATCH or (self.owed and now):
            self.send(protocol.encode("credit", self.job_id, n=self.owed))
            self.owed = 0

    def send_files(self, outbox: staging.Outbox) -> bool:
        """-n: send the files the job created or changed, within credit; True when done."""
        while self.credit > 0:
            chunk = outbox.next_chunk(self.credit)
            if chunk is None:
                return True
            name, mode, last, data = chunk
            self.send(protocol.encode("file", self.job_id, data, name=name, mode=mode,
                                      last=last))
            self.credit -= len(data)
        return False
