"""The client loop: polls channels, the caller's stdin and a wake-up pipe, and drives JobRuns.

One :class:`ClientLoop` lives on one thread (``offld``'s main thread), which is the only one
to touch its channels and jobs; sink threads and signal handlers only write to its wake-up
pipe. ``connect`` finds the first host that answers.
"""
from __future__ import annotations

import os
import signal
import time

import zmq

from .channel import Channel, OffloadError
from .jobrun import FORWARDED, JobRun, Outcome


def connect(ctx: zmq.Context, endpoints: list[str], timeout: float, debug) -> Channel:
    """A channel to the first of ``endpoints`` that answers hello, or OffloadError."""
    errors = []
    for endpoint in endpoints:
        channel = Channel(ctx, endpoint)
        try:
            welcome = channel.hello(timeout)
        except OffloadError as exc:
            debug(str(exc))
            errors.append(exc)
            channel.close()
            continue
        debug(f"connected to {welcome['host']} at {endpoint}")
        return channel
    if len(errors) == 1:
        raise errors[0]
    raise OffloadError("no host answered: " + "; ".join(map(str, errors)), "no-host")


class ClientLoop:
    """Drives jobs to their end; forwards the signals the caller gets."""

    def __init__(self, heartbeat: float = 1.0, liveness: float = 10.0):
        """A loop with its wake-up pipe; jobs are added with :meth:`add`."""
        self.heartbeat, self.liveness = heartbeat, liveness
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.jobs: list[JobRun] = []
        self.pending_signals: list[int] = []

    def add(self, job: JobRun) -> None:
        """Take charge of a submitted job."""
        self.jobs.append(job)

    def run(self) -> list[Outcome]:
        """Run until every job has an outcome, with the caller's signals forwarded."""
        old = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        old_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        try:
            while any(j.outcome is None for j in self.jobs):
                self._step()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
        for job in self.jobs:
            job.join()
        return [job.outcome for job in self.jobs]

    def _on_signal(self, signum, frame) -> None:
        """Remember a signal; the loop forwards it (the wake-up fd interrupts poll)."""
        self.pending_signals.append(signum)

    def _step(self) -> None:
        """One round: poll, dispatch, forward signals, heartbeat."""
        poller = zmq.Poller()
        poller.register(self.wake_r, zmq.POLLIN)
        by_fd: dict[int, JobRun] = {}
        for job in self._live():
            poller.register(job.channel.sock, zmq.POLLIN)
            job.want(poller)
            if job.stdin_fd is not None:
                by_fd[job.stdin_fd] = job
        ready = dict(poller.poll(self.heartbeat * 1000 / 2))
        for job in self._live():
            self._receive(job)
        for fd, job in by_fd.items():
            if fd in ready and job.outcome is None:
                job.stdin_ready()
        if self.wake_r in ready:
            self._woken()
        now = time.monotonic()
        for job in self._live():
            job.tick(now, self.heartbeat, self.liveness)

    def _live(self) -> list[JobRun]:
        """Jobs without an outcome yet."""
        return [j for j in self.jobs if j.outcome is None]

    def _receive(self, job: JobRun) -> None:
        """Hand each waiting message to its job; other messages concern the channel."""
        try:
            while (msg := job.channel.recv()) is not None:
                if msg.job == job.id:
                    job.on_message(msg)
                elif msg.kind == "error" and msg.job is None:
                    job.on_message(msg)
        except OffloadError as exc:
            job._fail(exc)

    def _woken(self) -> None:
        """Drain the wake-up pipe; forward signals; let jobs collect sink progress."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        signals, self.pending_signals = self.pending_signals, []
        for job in self.jobs:
            for signum in signals:
                job.signal(signum)
            job.woken()

    def close(self) -> None:
        """Close the wake-up pipe."""
        os.close(self.wake_r)
        os.close(self.wake_w)
