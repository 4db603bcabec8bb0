"""The client agent inside the mount process: holds the hosts' connections, runs shims' jobs.

Threads: the agent thread (``offloadfs-agent``) owns every ZeroMQ socket, host link and JobRun
(it is a :class:`~offloadfs.client.ClientLoop`). FUSE worker threads call :meth:`Agent.submit`
with a :class:`~offloadfs.request.ShimRequest` and then block in :meth:`ShimRequest.next_line`
until the agent decides (offloaded job finished, run locally, or fail closed: the rule is
:func:`offloadfs.request.decide`); the FUSE thread itself then finishes the caller's output and
builds the shim's reply line. Nothing else crosses threads but the inbox
queue, the wake-up pipe and each request's queue of lines.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import threading
import time

import zmq

from . import environ, export, notice, protocol, shim, staging, terminal
from . import request as rules
from .caller import filesystem_ids, pending_signals
from .channel import Channel, OffloadError, recv_monitor_event
from .client import ClientLoop
from .config import ClientConfig
from .jobrun import ENDING, FORWARDED, JobRun, JobSpec, Outcome
from .registry import Registry
from .request import Decision, ShimRequest
from .states import Contact, HostState, first_contact

log = logging.getLogger("offloadfs")

SIGNAL_POLL = 0.05          # seconds between looks at running callers' pending signals
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# What a host link's monitor reports: up, down, refused (a first attempt that failed ends the
# start-up wait for that host: states.first_contact), or a failed handshake.
WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
           | HANDSHAKE_FAILED)
HOST_LIVENESS = 3.0         # a host not answering hello this long is dead for new jobs
REBUILD_AFTER = 3.0         # a connection still away after this long gets a new socket
FORWARD = frozenset(int(s) for s in FORWARDED)


class HostLink:
    """The agent's view of one configured host: its channel, monitor and liveness."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys=None):
        """Connect (with CURVE ``keys`` if given) and watch the connection."""
        self.endpoint = endpoint
        self.channel = Channel(ctx, endpoint, keys)
        self.monitor = self.channel.sock.get_monitor_socket(WATCHED)
        self.failure = ""
        self.state = HostState.UNKNOWN
        self.since = time.monotonic()         # its first connection attempt began
        self.hello_sent = 0.0
        self.name = endpoint
        self.commands: list[str] = []
        self.in_flight = 0
        self.dead_since: float | None = None
        self.down_at: float | None = None     # the connection went away at, until it is back
        self.keys = keys
        self.ctx = ctx

    def usable(self, name: str) -> bool:
        """True if this host is up and offers ``name``."""
        return self.state == HostState.UP and name in self.commands

    def close(self, linger: int | None = None) -> None:
        """Stop monitoring and close the socket."""
        self.channel.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.channel.close(linger)

    def rebuild(self) -> None:
        """A new socket to the same endpoint: ZeroMQ does not come back from every dropped
        connection (a frame over MAXMSGSIZE), and a send must never wait on one."""
        self.close(linger=0)
        self.channel = Channel(self.ctx, self.endpoint, self.keys)
        self.monitor = self.channel.sock.get_monitor_socket(WATCHED)
        self.down_at = None


class Agent(ClientLoop):
    """Runs shims' jobs on the configured hosts; see the module docstring for threads.

    Any thread calls :meth:`start`, :meth:`stop`, :meth:`submit`, :meth:`continued` and
    :meth:`status`; everything else runs on the agent thread. There :meth:`_main` repeats
    :meth:`ClientLoop.step`, which calls back the hooks this class overrides, in this order
    each round: :meth:`channels` (the hosts' channels, not only those of running jobs),
    :meth:`register` and :meth:`ready` (host monitors, callers' pidfds), :meth:`unrouted`
    (welcomes), :meth:`tick` (new requests, hellos, liveness, signals) and :meth:`finished`
    (a job's end: the shim's answer)."""

    def __init__(self, config: ClientConfig, registry: Registry, endpoints: list[str],
                 brokers: list[str] | None = None):
        """Links to ``endpoints``, of which ``brokers`` (default: the config's) are brokers;
        nothing runs until :meth:`start`."""
        super().__init__(config.timing())
        self.config, self.registry, self.endpoints = config, registry, endpoints
        self.brokers = set(config.brokers if brokers is None else brokers)
        self.export = export.make(config.export or export.ExportConfig())
        self.export_error: str | None = None
        self.ctx: zmq.Context | None = None
        self.links: list[HostLink] = []
        self.inbox: queue.SimpleQueue[ShimRequest] = queue.SimpleQueue()
        self.continues: queue.SimpleQueue[ShimRequest] = queue.SimpleQueue()
        self.requests: dict[str, ShimRequest] = {}
        # Requests waiting for a host's first answer (states.first_contact), with the notice
        # shown to each one's caller meanwhile.
        self.waiting: dict[ShimRequest, notice.TerminalNotice | notice.Silent] = {}
        self._told_contact = False             # the start-up's outcome was logged
        self.thread = threading.Thread(target=self._main, name="offloadfs-agent", daemon=True)
        self._stopping = False
        self._failures = 0
        self.loop_ended = lambda: False   # set by the filesystem: libfuse's loop is ending
        self._last_signal_poll = 0.0
        self.recent: list[dict] = []
        self.listener = None   # offld's hand-off (listener.Listener), set by the mount

    # --- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the agent thread (and the hand-off listener, if the mount has one)."""
        self.thread.start()
        if self.listener is not None:
            self.listener.start()

    def stop(self) -> None:
        """Ask the agent thread to end and wait for it (running jobs are cancelled)."""
        self._stopping = True
        if self.listener is not None:
            self.listener.stop()
        self.poke()
        if self.thread.is_alive():
            self.thread.join(10)

    def submit(self, request: ShimRequest) -> None:
        """Hand a shim's request to the agent thread."""
        request.stamp("submitted")
        self.inbox.put(request)
        self.poke()

    def continued(self, request: ShimRequest) -> None:
        """A shim runs again after it stopped with its job (it wrote ``c``)."""
        self.continues.put(request)
        self.poke()

    # --- the agent thread -----------------------------------------------------------------------

    def _main(self) -> None:
        """Connect (here, after any daemonizing fork), loop until stopped, then cancel what
        runs and close every socket."""
        self._start_export()
        self.ctx = zmq.Context()
        self.links = [HostLink(self.ctx, e, self.config.keys) for e in self.endpoints]
        gc.freeze()   # the mount's start-up lives on: no collection walks it again (p99)
        try:
            while not self._stopping:
                self._step_safely()
        finally:
            self._shutdown()

    def _step_safely(self) -> None:
        """One round; a bug costs that round (logged), never the agent and its jobs."""
        try:
            busy = self.requests or self.waiting
            self.step(SIGNAL_POLL if busy else self.timing.heartbeat / 2)
            self._failures = 0
        except Exception:
            self._failures += 1
            if self._failures <= 3 or self._failures % 1000 == 0:
                log.exception("internal error in the agent (%d in a row); it goes on",
                              self._failures)
            time.sleep(min(0.001 * self._failures, 0.1))   # a bug that repeats must not spin

    def _start_export(self) -> None:
        """Offer the VM's tree to the hosts (on this thread: a child dies with it)."""
        try:
            self.export.start()
        except export.ExportError as exc:
            self.export_error = str(exc)
            log.error("cannot export %s: %s; jobs run locally (or fail under always)",
                      self.export.cfg.root, exc)

    def _shutdown(self) -> None:
        """Cancel jobs, release waiting shims, close sockets, stop the export."""
        for job in list(self.jobs.values()):
            job.cancel()
            job.fail(OffloadError("the offloadfs mount is stopping", "shutdown", True))
        self._reap()
        self._release_waiting()
        for link in self.links:
            link.close()
        self.ctx.term()
        self.close()
        self.export.stop()

    def _release_waiting(self) -> None:
        """Requests never sent when the mount stops: local under auto, refused under always."""
        waiting, self.waiting = self.waiting, {}
        while not self.inbox.empty():
            waiting[self.inbox.get()] = notice.SILENT
        for request, waits in waiting.items():
            waits.clear()
            self._cannot(request, "the offloadfs mount is stopping")

    def channels(self) -> list[Channel]:
        """Every host's channel."""
        return [link.channel for link in self.links]

    def register(self, poller: zmq.Poller) -> None:
        """Watch host monitors and the pidfds of callers whose jobs run."""
        for link in self.links:
            poller.register(link.monitor, zmq.POLLIN)
        for request in self.requests.values():
            if request.pidfd >= 0:
                poller.register(request.pidfd, zmq.POLLIN)

    def ready(self, ready: dict) -> None:
        """Connection events; callers that died."""
        for link in self.links:
            if link.monitor in ready:
                self._monitor_event(link)
        for request in list(self.requests.values()):
            if request.pidfd in ready and request.job is not None:
                request.job.cancel()
                request.job.fail(OffloadError("the caller went away", "cancelled", True))

    def _monitor_event(self, link: HostLink) -> None:
        """A connection came up (say hello now) or went down (no new jobs there)."""
        try:
            message = recv_monitor_event(link.monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        event = message["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            link.failure = ""
            link.down_at = None
            self._hello(link, time.monotonic())
        elif event == zmq.EVENT_DISCONNECTED:
            link.down_at = link.down_at or time.monotonic()
            self._host_down(link, "disconnected")
        elif event == zmq.EVENT_CONNECT_RETRIED:
            # Why, learnt once per outage (each retry would cost the probe's few ms again).
            link.failure = link.failure or link.channel.failure(message)["text"]
            self._host_down(link, link.failure)   # a first attempt that failed: no wait
        elif event & HANDSHAKE_FAILED:
            self._refused(link, link.channel.failure(message)["text"])

    def _refused(self, link: HostLink, why: str) -> None:
        """The host refused our connection (CURVE): say why once, not at every retry."""
        if why != link.failure:
            log.warning("host %s refused the connection: %s", link.endpoint, why)
            link.failure = why
        self._host_down(link, why)

    def unrouted(self, channel: Channel, msg) -> None:
        """Welcomes refresh a host's commands; other stray messages are ignored."""
        link = next(link for link in self.links if link.channel is channel)
        if msg.kind == "welcome":
            self._host_up(link, msg)
        else:
            super().unrouted(channel, msg)

    def tick(self, now: float) -> None:
        """Take new requests, say hello to hosts, expire silent ones, forward signals; stop
        when the mount is being stopped (its waiting shims get their answer now)."""
        if self.loop_ended():
            self._stopping = True
            return
        waiting, self.waiting = self.waiting, {}
        for request, waits in waiting.items():   # a host answered, or the wait is over
            if not self._interrupted(request, waits):
                self._dispatch(request, waits)
        while not self.inbox.empty():
            self._dispatch(self.inbox.get())
        while not self.continues.empty():
            job = self.continues.get().job
            if job is not None:
                job.continued()
        for link in self.links:
            if now - link.hello_sent >= self.timing.heartbeat:
                self._hello(link, now)
            if link.state == HostState.UP and now - link.channel.heard > HOST_LIVENESS:
                self._host_down(link, f"silent for {HOST_LIVENESS:g}s")
            self._forget(link, now)
            self._maybe_rebuild(link, now)
        self._tell_contact(now)
        if now - self._last_signal_poll >= SIGNAL_POLL:
            self._last_signal_poll = now
            for request in self.requests.values():
                self._forward_signals(request)

    def _maybe_rebuild(self, link: HostLink, now: float) -> None:
        """A link whose connection stayed away (or would not take a send) gets a new socket
        once none of its jobs is left (they end by their liveness rule, as ones that may have
        run); the other hosts are never held up by it."""
        gone = link.channel.stalled or (link.down_at is not None
                                        and now - link.down_at > REBUILD_AFTER)
        if gone and link.in_flight == 0:
            log.info("host %s: a new connection to %s", link.name, link.endpoint)
            link.rebuild()

    def finished(self, job: JobRun) -> None:
        """A shim's job ended: its shim gets its answer, whatever goes wrong in the books."""
        request = self.requests.pop(job.id)
        request.stamp("finished")
        try:
            self._conclude(request, job)
        except Exception:
            log.exception("internal error ending %s; its shim gets the outcome", request.name)
            if not request.decided:
                request.decide_outcome(job.outcome)

    def _conclude(self, request: ShimRequest, job: JobRun) -> None:
        """Fall back if the job never started and policy allows (request.decide), else reply."""
        self.export.finish(job.spec.data)
        link = next((link for link in self.links if link.channel is job.channel), None)
        if link is not None:
            link.in_flight -= 1
        out = job.outcome
        error = out.error
        decision = rules.decide(request.policy, ended=rules.ending(error),
                                error="" if error is None else str(error))
        if decision.route != rules.REMOTE:
            self._apply(request, decision)
            return
        self.registry.record(request.name, "failures" if error else "jobs", out.timings)
        why = str(error) if error else f"policy {request.policy}"
        self._remember(request, out.host, why, out.status, out.timings)
        request.decide_outcome(out)

    # --- decisions ------------------------------------------------------------------------------

    def _dispatch(self, request: ShimRequest, waits=notice.SILENT) -> None:
        """Send a request to a host, or decide to run it locally or refuse it; or let it wait
        for a host's first answer (``waits``: the notice its caller sees meanwhile)."""
        request.stamp("dispatch")
        link = self._pick(request.name)
        now = time.monotonic()
        contact = self._contact(now, usable=link is not None)
        if contact == Contact.WAIT:
            if waits is notice.SILENT:
                waits = self._notice(request, "")
            waits.connecting(now, [k.endpoint for k in self.links
                                   if k.state == HostState.UNKNOWN])
            self.waiting[request] = waits
            return
        waits.clear()   # before any line of ours or the job's on the caller's terminal
        if contact == Contact.GIVE_UP:
            self._apply(request, rules.decide(request.policy, host=False))
            return
        try:
            data = None if request.name in self.config.stage_commands else \
                self._descriptor(request)
        except ValueError as exc:
            self._cannot(request, str(exc))
            return
        try:
            request.pidfd = os.pidfd_open(request.caller.pid)
        except OSError as exc:
            request.decide_refused(f"the caller went away: {exc.strerror}")
            return
        spec = self._spec(request)
        spec.data, staged = data, None
        if request.name in self.config.stage_commands:
            staged = self._stage(request, spec)
            if staged is None:
                return
        c = request.caller
        term = terminal.choose(request.stdio, c.pid, request.tty)
        job = JobRun(link.channel, spec, request.stdio, self.wake_w, caller=c.pid,
                     staged=staged, as_caller=lambda: filesystem_ids(c.uid, c.gid),
                     terminal=term)
        job.on_stop = request.stopped
        job.waits = self._notice(request, notice.place(link.endpoint,
                                                       link.endpoint in self.brokers))
        settings = term.stty() if term is not None and term.reads_keys else ""
        if settings:
            request.emit(shim.reply_settings(settings))
        request.job = job
        if not self.requests:   # the first look at its signals a poll interval from now, not
            self._last_signal_poll = time.monotonic()   # in this round (early ones: below)
        self.requests[job.id] = request
        link.in_flight += 1
        job.submit()
        request.stamp("sent")
        self.add(job)
        for signum in request.early_signals:  # caught by the shim before it asked
            job.signal(signum)

    def _cannot(self, request: ShimRequest, why: str) -> None:
        """The job cannot be offloaded: local under auto, refusal under always."""
        self._apply(request, rules.decide(request.policy, obstacle=why))

    def _apply(self, request: ShimRequest, decision: Decision) -> None:
        """Run locally or fail closed as decided, counted in the registry and the status."""
        self.registry.record(request.name, decision.counted, {})
        if decision.route == rules.FAIL:
            self._remember(request, "nowhere", decision.reason, 255, {})
        else:
            self._remember(request, "local", decision.reason, -1, {})
        request.decide(decision)

    def _stage(self, request: ShimRequest, spec: JobSpec) -> tuple | None:
        """Staging for this command (config [staging] commands): its files travel with it.
        None (and the request decided) if the caller's files cannot be read."""
        c = request.caller
        try:
            with filesystem_ids(c.uid, c.gid):
                spec.argv, files = staging.plan(spec.argv, c.cwd)
                spec.data = {"mode": protocol.DATA_STAGE, "bytes": staging.total(c.cwd, files)}
        except OSError as exc:
            self._cannot(request, f"cannot stage its files: {exc.strerror}")
            return None
        return staging.Outbox(c.cwd, files), staging.Inbox(c.cwd)

    def _descriptor(self, request: ShimRequest) -> dict | None:
        """Where the host finds the caller's cwd; ValueError when it cannot."""
        if self.export_error:
            raise ValueError(f"the export is down: {self.export_error}")
        cwd = os.fsdecode(request.caller.cwd)
        try:
            return self.export.descriptor(cwd)
        except KeyError:
            raise ValueError(f"{cwd} is outside the exported tree "
                             f"{self.export.cfg.root}") from None
        except OSError as exc:
            raise ValueError(f"cannot write the job's nonce: {exc.strerror}") from None

    def _pick(self, name: str) -> HostLink | None:
        """The usable host with the fewest of our jobs in flight (configuration order on ties)."""
        usable = [link for link in self.links if link.usable(name)]
        return min(usable, key=lambda link: link.in_flight) if usable else None

    def _interrupted(self, request: ShimRequest, waits) -> bool:
        """A caller killed or interrupted (Ctrl-C) while its request waits for a host: it
        ends now, as a job not yet started would (nothing ran anywhere)."""
        pending = pending_signals(request.caller.pid) & (set(ENDING) | {signal.SIGKILL})
        if not pending:
            return False
        signum = min(pending)
        waits.clear()
        self._remember(request, "nowhere", f"signal {signum} while waiting for a host",
                       128 + signum, {})
        request.decide_outcome(Outcome(128 + signum, "nowhere", signal=signum))
        return True

    def _notice(self, request: ShimRequest, where: str):
        """The waiting notice for the caller's stderr, if that is a terminal."""
        return notice.at_terminal(request.stdio[2], request.prog, where, request.quiet,
                                  pid=request.caller.pid)

    def _contact(self, now: float, usable: bool = False) -> Contact:
        """The start-up rule (states.first_contact) over the links, bounded by the connect
        timeout: wait while a host has not answered its first connection attempt."""
        return first_contact(usable, [(link.state, now - link.since) for link in self.links],
                             self.config.connect_timeout)

    def _tell_contact(self, now: float) -> None:
        """Once, when the start-up is over without any host up: a warning naming what each
        host said (a host that answers later is logged as up)."""
        if self._told_contact or not self.links:
            return
        if any(link.state == HostState.UP for link in self.links):
            self._told_contact = True   # a host answered: nothing to warn of
        elif self._contact(now) == Contact.GIVE_UP:
            self._told_contact = True
            log.warning("%s", notice.unreachable(
                [(link.endpoint, link.failure) for link in self.links],
                self.config.connect_timeout))

    def _spec(self, request: ShimRequest) -> JobSpec:
        """The job for a shim request, with the caller's kernel-reported identity."""
        c = request.caller
        env = environ.passing(c.env, list(environ.DEFAULT_PASS) + self.config.env_pass)
        return JobSpec(argv=[os.fsencode(request.name)] + request.args, cwd=c.cwd, uid=c.uid,
                       gid=c.gid, groups=c.groups, env=env,
                       tags=self.config.tags.get(request.name, []))

    def _forward_signals(self, request: ShimRequest) -> None:
        """Forward signals newly pending on the caller to its job. A caller being killed
        (SIGKILL pending: a shim waiting on FUSE cannot die until its read is answered)
        has its job cancelled and its read answered at once."""
        job = request.job
        if job is None or job.state.final:
            return
        pending = pending_signals(request.caller.pid)
        if signal.SIGKILL in pending:
            job.cancel()
            job.fail(OffloadError("the caller was killed", "cancelled", True))
            return
        pending &= FORWARD
        for signum in sorted(pending - request.forwarded):
            job.signal(signum)
        request.forwarded = pending

    # --- hosts ----------------------------------------------------------------------------------

    def _hello(self, link: HostLink, now: float) -> None:
        """Ask a host who it is (liveness and command refresh)."""
        link.hello_sent = now
        link.channel.send(protocol.encode("hello"))

    def _host_up(self, link: HostLink, msg) -> None:
        """A welcome: the host is up and offers these commands."""
        if link.state != HostState.UP:
            log.info("host %s (%s) is up: %s", msg["host"], link.endpoint,
                     " ".join(msg["commands"]))
        link.state, link.name, link.commands = HostState.UP, msg["host"], list(msg["commands"])
        link.channel.welcome = msg
        if link.commands:   # a broker just restarted offers nothing until its hosts return:
            self.registry.offer(link.endpoint, link.commands)   # its shims stay meanwhile

    def _host_down(self, link: HostLink, why: str) -> None:
        """No new jobs go to this host until it answers again. Its shims stay (shells hash
        command paths: a vanished shim fails instead of falling through PATH) until it has
        been dead for ``forget_after``; meanwhile they fall back or fail closed by policy."""
        if link.state == HostState.UP:
            log.info("host %s (%s) is down: %s", link.name, link.endpoint, why)
            link.dead_since = time.monotonic()
        link.state = HostState.DEAD

    def _forget(self, link: HostLink, now: float) -> None:
        """Withdraw the commands of a host dead for longer than ``forget_after``."""
        if link.state == HostState.DEAD and link.dead_since is not None \
                and now - link.dead_since > self.config.forget_after:
            self.registry.withdraw(link.endpoint)
            link.dead_since = None

    def status(self) -> dict:
        """What ``offloadfs status`` shows (any thread: a snapshot of plain values)."""
        hosts = [{"endpoint": link.endpoint, "host": link.name, "state": link.state.value,
                  "commands": list(link.commands), "in_flight": link.in_flight,
                  **_load(link.channel.welcome)} for link in list(self.links)]
        jobs = [{**job, "stamps": dict(job["stamps"])} for job in list(self.recent)]
        return {"hosts": hosts, "jobs": jobs}

    def _remember(self, request: ShimRequest, where: str, why: str, status: int,
                  timings: dict) -> None:
        """Keep the last jobs for status: where each ran, why, and its stage timings."""
        entry = {"command": request.name, "where": where, "why": why, "status": status,
                 "uid": request.caller.uid, **{k: round(v, 6) for k, v in timings.items()},
                 "stamps": request.stamps}   # still filling in: copied by status()
        self.recent = (self.recent + [entry])[-50:]


def _load(welcome) -> dict:
    """Slots, busy slots and queue length from a host's last welcome."""
    if welcome is None:
        return {}
    return {k: welcome.get(k) for k in ("slots", "busy", "queued", "tags")}
