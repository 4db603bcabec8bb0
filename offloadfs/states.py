"""Job and host states and their legal transitions; no dependencies, no I/O.

Both sides keep a job's state with :func:`advance`: the daemon (scheduler and runner, on its
event-loop thread) and the client (one job run, on the client's loop thread). Illegal
transitions raise :class:`IllegalTransition`, which the caller turns into a protocol error.
"""
from __future__ import annotations

import enum


class JobState(enum.Enum):
    """Where a job is in its life."""

    NEW = "new"              # known to the client, not yet acknowledged by a daemon
    QUEUED = "queued"        # waiting for a free slot
    RUNNING = "running"      # the process runs
    DRAINING = "draining"    # the process exited, output still flowing
    DONE = "done"            # exit status delivered
    FAILED = "failed"        # ended by an error of the offload itself (exit 255 on the client)
    CANCELLED = "cancelled"  # the client went away or gave up

    @property
    def final(self) -> bool:
        """True once nothing more happens to the job."""
        return self in FINAL


class HostState(enum.Enum):
    """What a client or broker believes of a host."""

    UNKNOWN = "unknown"      # not heard from yet
    UP = "up"                # heard from within the heartbeat interval
    SUSPECT = "suspect"      # missed a heartbeat
    DEAD = "dead"            # silent past the liveness limit


FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

JOB_EVENTS: dict[tuple[JobState, str], JobState] = {
    (JobState.NEW, "queued"): JobState.QUEUED,
    (JobState.NEW, "started"): JobState.RUNNING,
    (JobState.QUEUED, "queued"): JobState.QUEUED,
    (JobState.QUEUED, "started"): JobState.RUNNING,
    (JobState.RUNNING, "exited"): JobState.DRAINING,
    (JobState.RUNNING, "exit"): JobState.DONE,
    (JobState.DRAINING, "exit"): JobState.DONE,
}
for _s in (JobState.NEW, JobState.QUEUED, JobState.RUNNING, JobState.DRAINING):
    JOB_EVENTS[(_s, "error")] = JobState.FAILED
    JOB_EVENTS[(_s, "cancel")] = JobState.CANCELLED

HOST_EVENTS: dict[tuple[HostState, str], HostState] = {
    (HostState.UNKNOWN, "heard"): HostState.UP,
    (HostState.UP, "heard"): HostState.UP,
    (HostState.SUSPECT, "heard"): HostState.UP,
    (HostState.DEAD, "heard"): HostState.UP,
    (HostState.UNKNOWN, "missed"): HostState.DEAD,
    (HostState.UP, "missed"): HostState.SUSPECT,
    (HostState.SUSPECT, "missed"): HostState.SUSPECT,
    (HostState.SUSPECT, "expired"): HostState.DEAD,
    (HostState.UP, "expired"): HostState.DEAD,
    (HostState.UNKNOWN, "expired"): HostState.DEAD,
    (HostState.DEAD, "expired"): HostState.DEAD,
    (HostState.DEAD, "missed"): HostState.DEAD,
}


class IllegalTransition(Exception):
    """An event that the current state does not allow."""


def advance(state: JobState, event: str) -> JobState:
    """The job state after ``event``, or IllegalTransition."""
    try:
        return JOB_EVENTS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"job in state {state.value} cannot take {event!r}") from None


def advance_host(state: HostState, event: str) -> HostState:
    """The host state after ``event`` (heard, missed, expired), or IllegalTransition."""
    try:
        return HOST_EVENTS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"host in state {state.value} cannot take {event!r}") from None


class Contact(enum.Enum):
    """What a request for a command does when no host that is up offers it (yet)."""

    GO = "go"            # a host that is up offers it: send it there
    WAIT = "wait"        # none yet, but a host has not answered its first connection
    GIVE_UP = "give up"  # no host offering it answers: run it locally or fail (by policy)


def first_contact(usable: bool, links, bound: float) -> Contact:
    """The start-up rule: ``usable`` says a host that is up offers the command; ``links``
    are (state, seconds since its first connection attempt began) of every host. A host
    still UNKNOWN (its first attempt neither answered nor failed) within ``bound`` seconds
    of that attempt may yet offer the command: wait for it. A refused connection or a
    failed handshake makes it DEAD: no wait for that one."""
    if usable:
        return Contact.GO
    if any(state == HostState.UNKNOWN and age < bound for state, age in links):
        return Contact.WAIT
    return Contact.GIVE_UP
