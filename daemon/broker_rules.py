"""The broker's scheduling rules: live hosts, their slots, one FIFO queue; no sockets, no I/O.

The broker (``offloadd broker``) sits between clients and hosts, both on ROUTER sockets: each
host's daemon connects with a DEALER and announces itself (``ready``: name, commands, tags,
slots). This module decides which host runs which job; the loop around it does the talking.
It is the zguide's load-balancing broker with Paranoid Pirate heartbeats.

Rules:

- **Where a job may run.** On a live host that offers the job's command and has every one of
  its tags. A host is live from its ``ready`` until it has been silent for ``liveness``
  seconds (dead at ``heard + liveness`` exactly), until it says goodbye, or until it announces
  itself again (then it starts fresh, see below).
- **Who gets a free slot (FIFO with safe bypass).** A free slot on host H goes to the oldest
  queued job that H can run. Put another way, queued jobs are considered oldest first, and
  each takes a slot on the eligible host with the most free slots (ties: the host that
  announced itself first). A job that finds no free slot waits; a *younger* job may then
  start before it, but only on a host the waiting job cannot use. So FIFO holds among jobs
  that could use the same host (a younger job never takes a slot an older one could have
  taken), a gpu job does not hold up plain jobs that can run elsewhere, and nothing starves:
  a waiting job gets the first slot freed on any host that can run it, unless an older job
  takes it, and there are only finitely many older jobs.
- **Queue positions.** ``Queued(job, position)`` gives a job's place in the one broker-wide
  queue (1 = oldest): from ``submit`` when the job has to wait, then from ``tick`` (each
  heartbeat) when it changed since it was last told, however many jobs left the queue in
  between (re-telling every waiting job each time one leaves is O(queue) actions per job:
  at 64 clients on 2 slots, more than the rest of the broker's work for it). It never grows,
  and it bounds how many jobs can get a slot this job could use before it does.
- **No host for a job.** A job that no live host could ever run (nobody offers its command, or
  nobody offering it has all its tags) waits at most ``grace`` seconds for such a host to
  appear, then fails with ``NoHost(job, reason)``: one line the client prints before exiting
  with 255. The job never left the broker, so the loop says it never ran (``started`` false:
  the client may run it locally). The default ``grace`` is 0: a submit no live host could run
  fails at once, and
  queued jobs whose last possible host died fail in the same call that declared it dead.
  A broker loop may pass a ``grace`` of a few heartbeats so that hosts can re-announce
  themselves after a broker restart or a quick daemon restart.
- **A host dies** (silent, goodbye, or announcing itself again). Jobs queued at the broker are
  unaffected: they never left it. Each job running there gets ``HostLost`` (exit 255 and one
  line to the client); it is never re-run, since it may have had effects (at most once): the
  loop's error says it may have started (``started`` true) from its dispatch on, even if its
  ``started`` never came back (the host may have died between spawn and send).
  A job there that was already being cancelled just gets ``Forget``. The host's commands
  leave the union if no other live host offers them (``CommandsChanged``). Anything it says
  later gets ``Reannounce``: it must send ``ready`` again and then starts fresh, with all its
  slots free and numbered from 0 again.
- **A client goes away.** A client silent for ``client_timeout`` seconds, or a ``cancel``:
  each of its queued jobs is removed (``Forget``), each running one gets ``Cancel(job,
  host_id)``, and its slot stays busy until the host reports the job ended (``slot_freed``),
  so a host never runs more jobs than it has slots.
- **A client stops itself** (``suspend``, e.g. Ctrl-Z of ``offld``): its silence is no death
  for that job. A running job suspended at S survives its client's silence until
  ``S + suspend_limit`` (then it is cancelled like any job of a gone client), or until
  ``resume``, after which normal liveness holds again. The silent client's other jobs go as
  above; its record stays while it has suspended jobs. A suspend of a job that is not running
  (queued, being cancelled, unknown) is ignored.
- **Slots** are numbered per host from 0; a job takes the lowest free number, so the host can
  set e.g. ``CUDA_VISIBLE_DEVICES=slot``.
- **Broker restart.** Nothing here needs to survive one. Jobs in flight belong to the hosts and
  the clients: a client whose ping names a job the new broker does not know is told the job
  may have run (exit 255); a host that speaks to a new broker gets ``Reannounce``, kills what
  it ran for the old one (nobody supervises it any more) and announces itself. The loop's
  wire ids carry a random per-process prefix, so a new broker's ids never meet an old one's
  on a host.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from collections.abc import Hashable, Iterable

from offloadfs.states import HostState, JobState, advance, advance_host

from .scheduler import Queued  # the same action as the host's scheduler: tell a client its place

# --- actions: what the loop carries out, in the order they are returned ----------------------


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Action: send the job's submit to ``host_id``; it runs there in ``slot`` (from 0)."""

    job: Hashable
    host_id: Hashable
    slot: int


@dataclasses.dataclass(frozen=True)
class HostLost:
    """Action: the job's host died while it ran: exit 255 and ``reason`` to its client (the
    job may have run: it was dispatched)."""

    job: Hashable
    host_id: Hashable
    reason: str


@dataclasses.dataclass(frozen=True)
class Cancel:
    """Action: tell ``host_id`` to kill the job; its slot stays busy until ``slot_freed``."""

    job: Hashable
    host_id: Hashable


@dataclasses.dataclass(frozen=True)
class Forget:
    """Action: the job left the rules with nobody to tell; drop what the loop keeps for it."""

    job: Hashable


@dataclasses.dataclass(frozen=True)
class NoHost:
    """Action: no live host can run the job: exit 255 and ``reason`` to its client (it never
    left the broker: it never ran)."""

    job: Hashable
    reason: str


@dataclasses.dataclass(frozen=True)
class CommandsChanged:
    """Action: live hosts now offer ``commands`` (sorted): tell the VMs, so shims follow."""

    commands: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Reannounce:
    """Action: ``host_id`` is not known (declared dead, or a new broker): ask it for ``ready``."""

    host_id: Hashable


# --- errors -----------------------------------------------------------------------------------


class RulesError(ValueError):
    """An event the rules refuse; the loop answers its sender with an error."""


class DuplicateJob(RulesError):
    """A submit for a job key that is still queued or running."""


class BadHost(RulesError):
    """A host announced itself with fewer than one slot."""


# --- records ----------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    """One job as the rules keep it, from submit until it leaves."""

    key: Hashable
    client: Hashable
    command: str
    tags: frozenset[str]
    state: JobState = JobState.QUEUED
    host: Hashable = None
    told: int = 0                     # the last position reported, 0 = none yet
    suspended: float | None = None    # when its client said it stops itself, None = it runs
    kind: tuple[str, frozenset[str]] = dataclasses.field(init=False)   # command and tags

    def __post_init__(self):
        """What a host must offer to run the job: its command and tags."""
        self.kind = self.command, self.tags


@dataclasses.dataclass(eq=False, slots=True)
class _Host:
    """One live host: what it offers, its slots and the jobs in them."""

    id: Hashable
    name: str
    commands: frozenset[str]
    tags: frozenset[str]
    slots: int
    order: int                        # announce order, for ties
    heard: float
    state: HostState = HostState.UP
    running: dict[Hashable, int] = dataclasses.field(default_factory=dict)
    freed: list[int] = dataclasses.field(default_factory=list)   # heap of free slots < fresh
    fresh: int = 0                    # every slot from here up is free

    @property
    def free(self) -> int:
        """Slots not in use."""
        return self.slots - len(self.running)

    def can_run(self, kind: tuple[str, frozenset[str]]) -> bool:
        """True if the host offers the command and has every tag."""
        command, tags = kind
        return command in self.commands and tags <= self.tags

    def take(self, job: Hashable) -> int:
        """Put ``job`` in the lowest free slot and return its number."""
        if self.freed:
            slot = heapq.heappop(self.freed)
        else:
            slot, self.fresh = self.fresh, self.fresh + 1
        self.running[job] = slot
        return slot

    def release(self, job: Hashable) -> None:
        """Free the slot ``job`` held."""
        heapq.heappush(self.freed, self.running.pop(job))


@dataclasses.dataclass(eq=False, slots=True)
class _Client:
    """A client: when it was last heard, and its jobs (in submit order)."""

    heard: float
    jobs: dict[Hashable, None] = dataclasses.field(default_factory=dict)


class Rules:
    """Where the broker's jobs run. The broker's loop thread is the only caller.

    The loop feeds events with the time (``time.monotonic()``) and carries out the returned
    actions in order. For each message from a host it calls ``host_ready`` (a ``ready``) or
    ``host_heard`` (anything else), then ``slot_freed`` if the message ended a job; for each
    message from a client ``client_heard`` (``submit``, ``suspend`` and ``resume`` count as
    heard), then ``submit``, ``cancel``, ``suspend`` or ``resume``. It calls ``tick`` at least
    every ``heartbeat`` seconds, or at ``wake_at()``.
    Job keys are opaque hashables, e.g. ``(client identity, job id)``.
    """

    def __init__(self, heartbeat: float = 1.0, liveness: float = 3.0,
                 client_timeout: float = 5.0, grace: float = 0.0,
                 suspend_limit: float = 86400.0):
        """No hosts, no jobs; times in seconds, see the module docstring."""
        if not 0 < heartbeat <= liveness:
            raise ValueError("need 0 < heartbeat <= liveness")
        if client_timeout <= 0 or grace < 0 or suspend_limit < 0:
            raise ValueError("need client_timeout > 0, grace >= 0 and suspend_limit >= 0")
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.client_timeout = client_timeout
        self.grace = grace
        self.suspend_limit = suspend_limit
        self.hosts: dict[Hashable, _Host] = {}
        self.jobs: dict[Hashable, _Job] = {}          # queued, running and being cancelled
        self.queue: collections.OrderedDict[Hashable, _Job] = collections.OrderedDict()
        self.clients: dict[Hashable, _Client] = {}
        self.hostless: dict[Hashable, float] = {}     # queued job -> since when no host fits
        self._order = itertools.count()
        self._commands: tuple[str, ...] = ()

    # --- what the broker tells whoever asks (welcome, status-reply) ---------------------------

    @property
    def commands(self) -> tuple[str, ...]:
        """The commands live hosts offer, sorted."""
        return self._commands

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags of live hosts, sorted."""
        return tuple(sorted(set().union(*(h.tags for h in self.hosts.values()))))

    @property
    def slots(self) -> int:
        """Slots of live hosts."""
        return sum(h.slots for h in self.hosts.values())

    @property
    def busy(self) -> int:
        """Slots in use on live hosts."""
        return sum(len(h.running) for h in self.hosts.values())

    def host_state(self, host_id: Hashable) -> HostState:
        """UP, SUSPECT (missed a heartbeat at the last tick), or DEAD (unknown or expired)."""
        host = self.hosts.get(host_id)
        return host.state if host else HostState.DEAD

    def wake_at(self) -> float | None:
        """The earliest time at which ``tick`` has something to do, or None."""
        times = [h.heard + self.liveness for h in self.hosts.values()]
        times += [self._client_due(c) for c in self.clients.values()]
        times += [since + self.grace for since in self.hostless.values()]
        return min(times, default=None)

    # --- hosts ---------------------------------------------------------------------------------

    def host_ready(self, host_id: Hashable, now: float, name: str, commands: Iterable[str],
                   tags: Iterable[str], slots: int) -> list:
        """A host (re)announces itself: it starts fresh, all ``slots`` free, its old jobs lost."""
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise BadHost(f"host {name} announced {slots!r} slots; it needs at least one")
        actions = (self._drop_host(host_id, "it announced itself again")
                   if host_id in self.hosts else [])
        self.hosts[host_id] = _Host(host_id, name, frozenset(commands), frozenset(tags), slots,
                                    next(self._order), now)
        return actions + self._hosts_changed(now) + self._settle(now)

    def host_heard(self, host_id: Hashable, now: float) -> list:
        """Any message but ``ready`` from a host: it lives; an unknown one must re-announce."""
        host = self.hosts.get(host_id)
        if host is None:
            return [Reannounce(host_id)]
        host.heard = now
        host.state = advance_host(host.state, "heard")
        return []

    def host_gone(self, host_id: Hashable, now: float) -> list:
        """A host said goodbye (orderly shutdown): like its death, without waiting."""
        if host_id not in self.hosts:
            return []
        actions = self._drop_host(host_id, "it shut down")
        return actions + self._hosts_changed(now) + self._settle(now)

    def slot_freed(self, host_id: Hashable, job: Hashable) -> list:
        """A job on a host ended (exit or error came back): its slot goes to the queue."""
        host = self.hosts.get(host_id)
        if host is None or job not in host.running:
            return []                 # late news of a job already lost, or nonsense
        host.release(job)
        self._remove(job)
        return self._settle(None)

    # --- clients and jobs ----------------------------------------------------------------------

    def client_heard(self, client_id: Hashable, now: float) -> list:
        """Any message from a client: it is still there."""
        client = self.clients.get(client_id)
        if client is None:
            self.clients[client_id] = _Client(now)
        else:
            client.heard = now
        return []

    def submit(self, job: Hashable, client_id: Hashable, now: float, command: str,
               tags: Iterable[str] = ()) -> list:
        """A job wants a slot on a host offering ``command`` with every tag in ``tags``."""
        if job in self.jobs:
            raise DuplicateJob(f"job {job!r} is already queued or running")
        self.client_heard(client_id, now)
        record = _Job(job, client_id, command, frozenset(tags))
        self.jobs[job] = record
        self.queue[job] = record
        self.clients[client_id].jobs[job] = None
        if not any(h.can_run(record.kind) for h in self.hosts.values()):
            self.hostless[job] = now
        actions = self._settle(now)
        if job in self.queue:         # it waits, last in line
            record.told = len(self.queue)
            actions.append(Queued(job, record.told))
        return actions

    def cancel(self, job: Hashable) -> list:
        """The client gave up on a job: drop it if queued, have its host kill it if running."""
        return self._cancel(job) + self._settle(None)

    def suspend(self, job: Hashable, now: float) -> list:
        """The client stops itself: a running job survives its silence for ``suspend_limit``."""
        record = self._client_of(job, now)
        if record is not None and record.state is JobState.RUNNING and record.suspended is None:
            record.suspended = now
        return []

    def resume(self, job: Hashable, now: float) -> list:
        """The client runs again: its job is back under normal client liveness."""
        record = self._client_of(job, now)
        if record is not None:
            record.suspended = None
        return []

    def tick(self, now: float) -> list:
        """Time passes: silent hosts die, silent clients' jobs go, jobs without hosts fail."""
        actions = []
        died = False
        for host in list(self.hosts.values()):
            if now >= host.heard + self.liveness:
                host.state = advance_host(host.state, "expired")
                actions += self._drop_host(host.id, "it stopped answering")
                died = True
            elif now >= host.heard + self.heartbeat:
                host.state = advance_host(host.state, "missed")
        for client_id, client in list(self.clients.items()):
            if now >= client.heard + self.client_timeout:
                kept = False
                for job in list(client.jobs):
                    if now < self._job_due(client, self.jobs[job]):
                        kept = True
                    else:
                        actions += self._cancel(job)
                if not kept:
                    del self.clients[client_id]
        if died:
            actions += self._hosts_changed(now)
        return actions + self._settle(now) + self._positions()

    # --- inside --------------------------------------------------------------------------------

    def _client_of(self, job: Hashable, now: float) -> _Job | None:
        """A job's record (None if unknown), its client heard at ``now``."""
        record = self.jobs.get(job)
        if record is not None:
            self.client_heard(record.client, now)
        return record

    def _job_due(self, client: _Client, job: _Job) -> float:
        """When a silent client's job goes: at its timeout, or its suspension's end if later."""
        due = client.heard + self.client_timeout
        if job.suspended is None or job.state is not JobState.RUNNING:
            return due
        return max(due, job.suspended + self.suspend_limit)

    def _client_due(self, client: _Client) -> float:
        """When ``tick`` next acts on a client: its first job not being cancelled is due."""
        records = (self.jobs[job] for job in client.jobs)
        return min((self._job_due(client, job) for job in records
                    if job.state is not JobState.CANCELLED),
                   default=client.heard + self.client_timeout)

    def _drop_host(self, host_id: Hashable, how: str) -> list:
        """Remove a host; its running jobs are lost (HostLost), cancelled ones forgotten."""
        host = self.hosts.pop(host_id)
        actions = []
        for job in host.running:
            record = self._remove(job)
            if record.state is JobState.RUNNING:
                reason = (f"offloadfs: the job was sent to host {host.name}, which was lost "
                          f"({how}); the job may have run, its outcome is unknown (it is not "
                          "run again)")
                actions.append(HostLost(job, host_id, reason))
            else:
                actions.append(Forget(job))
        return actions

    def _hosts_changed(self, now: float) -> list:
        """After hosts came or went: report a new commands union; mark jobs no host can run."""
        commands = tuple(sorted(set().union(*(h.commands for h in self.hosts.values()))))
        actions = []
        if commands != self._commands:
            self._commands = commands
            actions.append(CommandsChanged(commands))
        fits: dict[tuple, bool] = {}
        for job in self.queue.values():
            if job.kind not in fits:
                fits[job.kind] = any(h.can_run(job.kind) for h in self.hosts.values())
            if fits[job.kind]:
                self.hostless.pop(job.key, None)
            else:
                self.hostless.setdefault(job.key, now)
        return actions

    def _cancel(self, job: Hashable) -> list:
        """Drop a queued job (Forget) or have a running one killed (Cancel); else nothing."""
        record = self.jobs.get(job)
        if record is None or record.state is JobState.CANCELLED:
            return []
        if record.state is JobState.QUEUED:
            self._remove(job)
            return [Forget(job)]
        record.state = advance(record.state, "cancel")
        return [Cancel(job, record.host)]

    def _remove(self, job: Hashable) -> _Job:
        """Forget a job everywhere but in its host's slots."""
        record = self.jobs.pop(job)
        self.queue.pop(job, None)
        self.hostless.pop(job, None)
        client = self.clients.get(record.client)
        if client is not None:
            client.jobs.pop(job, None)
        return record

    def _settle(self, now: float | None) -> list:
        """Common tail of every event: jobs without host fail, free slots fill."""
        if not self.queue:            # nothing can fail or fill
            return []
        return self._no_host(now) + self._fill()

    def _no_host(self, now: float | None) -> list:
        """Fail the jobs that no live host could run for ``grace`` seconds."""
        if now is None or not self.hostless:
            return []
        actions = []
        for job, since in list(self.hostless.items()):
            if now >= since + self.grace:
                record = self._remove(job)
                actions.append(NoHost(job, self._why_not(record)))
        return actions

    def _why_not(self, job: _Job) -> str:
        """One line saying why no host can run ``job``."""
        if not any(job.command in h.commands for h in self.hosts.values()):
            return f"offloadfs: no live host offers {job.command!r}; the job never ran"
        return (f"offloadfs: no live host offers {job.command!r} with tags "
                f"{', '.join(sorted(job.tags))}; the job never ran")

    def _fill(self) -> list:
        """Queued jobs, oldest first, each take a slot on the fitting host with most free."""
        if not self.queue:
            return []
        free = sum(h.free for h in self.hosts.values())
        actions = []
        stuck: set[tuple] = set()     # kinds that found no free slot; slots only get fewer
        for job in self.queue.values():   # no copy of the queue: removed after the walk
            if not free:
                break
            if job.kind in stuck:
                continue
            host = self._best_host(job)
            if host is None:
                stuck.add(job.kind)
                continue
            job.state = advance(job.state, "started")
            job.host = host.id
            actions.append(Dispatch(job.key, host.id, host.take(job.key)))
            free -= 1
        for action in actions:
            del self.queue[action.job]
        return actions

    def _best_host(self, job: _Job) -> _Host | None:
        """The live host that can run ``job`` with the most free slots (ties: first announced,
        which comes first in ``hosts``)."""
        best, most = None, 0
        for host in self.hosts.values():
            free = host.slots - len(host.running)
            if free > most and host.can_run(job.kind):
                best, most = host, free
        return best

    def _positions(self) -> list:
        """Queued actions for every queued job whose position changed since it was told."""
        actions = []
        for position, job in enumerate(self.queue.values(), start=1):
            if job.told != position:
                job.told = position
                actions.append(Queued(job.key, position))
        return actions
