"""The client loop: polls channels, the callers' stdin and a wake-up pipe, and drives JobRuns.

A :class:`ClientLoop` lives on one thread, the only one to touch its channels and jobs: ``offld``
runs one on its main thread (:meth:`ClientLoop.run`, which also forwards the signals ``offld``
gets), the mount's agent subclasses it on its own thread. Sink threads, signal handlers and
other threads only write to the wake-up pipe. ``connect`` finds the first host that answers.
"""
from __future__ import annotations

import os
import signal
import time

import zmq

from .channel import Channel, OffloadError
from .jobrun import FORWARDED, JobRun, Outcome, Timing
from .protocol import Message


def connect(ctx: zmq.Context, endpoints: list[str], timeout: float, debug,
            keys=None, origins: dict[str, str] | None = None) -> Channel:
    """A channel (with CURVE ``keys`` if given) to the first of ``endpoints`` that answers
    hello, or OffloadError; ``origins`` says where each came from (for the error)."""
    errors = []
    for endpoint in endpoints:
        channel = Channel(ctx, endpoint, keys, (origins or {}).get(endpoint, ""))
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
    raise OffloadError("no host answered: " + "; ".join(e.args[0] for e in errors), "no-host")


class ClientLoop:
    """Drives jobs to their end. Subclasses add poll items and react to what jobs leave.

    Everything but :meth:`poke` runs on the loop's thread. Each :meth:`step` polls, then calls
    back, in this order: :meth:`channels` (which channels to read), :meth:`register` (extra poll
    items), :meth:`unrouted` and :meth:`channel_failed` (while it reads the channels),
    :meth:`ready` (extra items that are ready), :meth:`tick` (after the jobs' own ticks) and
    :meth:`finished` (each job that got its outcome, once). ``offld`` uses them as they are;
    the mount's :class:`~offloadfs.agent.Agent` overrides all but :meth:`channel_failed`."""

    def __init__(self, timing: Timing):
        """A loop with its wake-up pipe; jobs are added with :meth:`add`."""
        self.timing = timing
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.jobs: dict[str, JobRun] = {}
        self.pending_signals: list[int] = []

    def add(self, job: JobRun) -> None:
        """Take charge of a submitted job."""
        self.jobs[job.id] = job

    def poke(self) -> None:
        """Wake the loop from another thread."""
        try:
            os.write(self.wake_w, b"p")
        except (BlockingIOError, OSError):
            pass

    # --- offld: one thread, signals forwarded -------------------------------------------------

    def run(self) -> list[Outcome]:
        """Run until every job has an outcome, with the caller's signals forwarded."""
        jobs = list(self.jobs.values())
        old = {s: signal.signal(s, self._on_signal) for s in FORWARDED + (signal.SIGCONT,)}
        old_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        try:
            while self.jobs:
                self.step(self.timing.heartbeat / 2)
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
        for job in jobs:
            job.join()
        return [job.outcome for job in jobs]

    def _on_signal(self, signum, frame) -> None:
        """Remember a signal; the loop forwards it (the wake-up fd interrupts poll)."""
        self.pending_signals.append(signum)

    # --- one round ------------------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        """Poll, route messages, pump stdin, collect sink progress, heartbeat, reap jobs."""
        poller = zmq.Poller()
        poller.register(self.wake_r, zmq.POLLIN)
        for channel in self.channels():
            if not self._held(channel):
                poller.register(channel.sock, zmq.POLLIN)
        stdin = {}
        for job in self.jobs.values():
            job.want(poller)
            if job.stdin_fd is not None:
                stdin[job.stdin_fd] = job
        self.register(poller)
        ready = dict(poller.poll(timeout * 1000))
        for channel in self.channels():
            if not self._held(channel):
                self._receive(channel)
        for fd, job in stdin.items():
            if fd in ready and job.outcome is None:
                job.stdin_ready()
        if self.wake_r in ready:
            self._woken()
        self.ready(ready)
        now = time.monotonic()
        for job in list(self.jobs.values()):
            job.tick(now, self.timing)
        self.tick(now)
        self._reap()

    def channels(self) -> list[Channel]:
        """Channels to poll: those of the jobs (subclasses add their own)."""
        return list({id(j.channel): j.channel for j in self.jobs.values()}.values())

    def _receive(self, channel: Channel) -> None:
        """Route each waiting message to its job; the rest goes to :meth:`unrouted`."""
        for _ in range(10_000):   # bounded: one flooding host cannot starve the others
            try:
                msg = channel.recv()
            except OffloadError as exc:
                self.channel_failed(channel, exc)
                continue
            if msg is None:
                return
            job = self.jobs.get(msg.job) if msg.job else None
            if job is not None and job.channel is channel:
                job.on_message(msg)
                if job.over_window():
                    return
            elif msg.kind == "ping":
                for job in self.jobs.values():
                    if job.channel is channel:
                        job.on_ping(msg)
            else:
                self.unrouted(channel, msg)

    def _held(self, channel: Channel) -> bool:
        """True while a job of ``channel`` holds more output than its credit (its host sent
        past it): nothing more is read from that host until the writers catch up."""
        return any(j.channel is channel and j.over_window() for j in self.jobs.values())

    def _woken(self) -> None:
        """Drain the wake-up pipe; forward signals; let jobs collect sink progress."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        signals, self.pending_signals = self.pending_signals, []
        for job in list(self.jobs.values()):
            for signum in signals:
                job.signal(signum)
            job.woken()

    def _reap(self) -> None:
        """Hand jobs that have an outcome to :meth:`finished`."""
        for job in [j for j in self.jobs.values() if j.outcome is not None]:
            del self.jobs[job.id]
            self.finished(job)

    # --- hooks ----------------------------------------------------------------------------------

    def unrouted(self, channel: Channel, msg: Message) -> None:
        """A message for no live job: a channel-wide error fails the channel's jobs."""
        if msg.kind == "error" and msg.job is None:
            self.channel_failed(channel, OffloadError(f"{channel.host}: {msg['text']}",
                                                      msg["kind"]))

    def channel_failed(self, channel: Channel, error: OffloadError) -> None:
        """A channel is unusable (its peer sent garbage, or a channel-wide error): its jobs
        end with ``error``; every one that may have started is said to have (never re-run)."""
        for job in self.jobs.values():
            if job.channel is channel and not job.state.final:
                job.cancel()   # the text says whether it may have run (OffloadError.__str__)
                job.fail(OffloadError(error.args[0], error.kind,
                                      error.started or job.may_have_started()))

    def register(self, poller: zmq.Poller) -> None:
        """Register extra poll items (subclasses)."""

    def ready(self, ready: dict) -> None:
        """Handle extra poll items that are ready (subclasses)."""

    def tick(self, now: float) -> None:
        """Periodic work after each round (subclasses)."""

    def finished(self, job: JobRun) -> None:
        """A job got its outcome (subclasses)."""

    def close(self) -> None:
        """Close the wake-up pipe."""
        os.close(self.wake_r)
        os.close(self.wake_w)
