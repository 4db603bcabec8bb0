"""Slots and the FIFO queue of one host; plain rules, no I/O.

The server's loop thread is the only caller: it feeds ``submit``, ``slot_freed`` and
``cancel`` and carries out the returned actions (start a job, tell a client its queue
position).

The actions and events have the names the broker's rules (``broker_rules``) give them:
``Dispatch`` (a job gets a slot: here it starts in it; the broker sends it to a host's slot,
where it is not started yet, so ``Start`` would read wrong there), ``Queued`` (the wire message
it becomes, ``queued``) and ``slot_freed``.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Action: start this job now, in a free slot (``slot`` counts from 0)."""

    job: Hashable
    slot: int


@dataclasses.dataclass(frozen=True)
class Queued:
    """Action: tell this job's client its queue position (1 = next to start); sent when it
    changes (the broker's rules use it too)."""

    job: Hashable
    position: int


class Scheduler:
    """Runs at most ``slots`` jobs at once, queueing the rest first come first served."""

    def __init__(self, slots: int):
        """Start with every slot free and an empty queue."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.running: dict[Hashable, int] = {}
        self.queue: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    @property
    def busy(self) -> int:
        """Slots in use."""
        return len(self.running)

    def submit(self, job: Hashable) -> list:
        """A new job: start it if a slot is free, else queue it."""
        if job in self.running or job in self.queue:
            raise ValueError(f"job {job!r} is already known")
        self.queue[job] = None
        return self._fill() or [Queued(job, len(self.queue))]

    def slot_freed(self, job: Hashable) -> list:
        """A running job ended: its slot goes to the head of the queue."""
        self.running.pop(job, None)
        return self._fill()

    def cancel(self, job: Hashable) -> list:
        """A job went away, queued or running."""
        if job in self.running:
            return self.slot_freed(job)
        if self.queue.pop(job, 0) is None:
            return self._positions()
        return []

    def _fill(self) -> list:
        """Start queued jobs while slots are free; then report the new positions."""
        started = []
        while self.queue and len(self.running) < self.slots:
            job, _ = self.queue.popitem(last=False)
            slot = min(set(range(self.slots)) - set(self.running.values()))
            self.running[job] = slot
            started.append(Dispatch(job, slot))
        return started + (self._positions() if started else [])

    def _positions(self) -> list:
        """The position of every queued job."""
        return [Queued(job, i) for i, job in enumerate(self.queue, start=1)]
