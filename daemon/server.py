"""``offloadd serve``: the ROUTER socket loop that runs clients' jobs on this host.

One thread does everything: :meth:`Server.run` polls the ROUTER socket, every job's pipes and
pidfds, and a wake-up pipe for signals; it decodes messages (``offloadfs.protocol``), applies
the rules (``policy``, ``scheduler``) and drives the processes (``runner``). Nothing else
touches the socket or the jobs. ``stop()`` may be called from a signal handler.

What is here is the loop and the glue; the roles are elsewhere: the socket plumbing shared
with the broker (``router``), whether a submit is taken (``admission``), one job's streams and
credit (``streams.JobStreams``), a staged job's scratch directory (``hoststage.HostStage``).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

import zmq

from offloadfs import keys, protocol
from offloadfs.protocol import Message, ProtocolError
from offloadfs.states import JobState, advance

from . import admission, limits, metrics, policy, router, warden
from .config import ServeConfig, show_size
from .hoststage import UNANNOUNCED, HostStage
from .metrics import Metrics
from .mounts import MountTable
from .runner import Process, SpawnError, rlimits, user_of
from .scheduler import Dispatch, Queued, Scheduler
from .signals import stopping_on_signals
from .streams import JobStreams
from .worker import BrokerLink

log = logging.getLogger("offloadd")

FEATURES = [protocol.STDIN_NULL]   # what our welcome offers beyond the protocol's kinds
ENDED_KEPT = 1024   # ended jobs whose clients' late messages are dropped without an error


@dataclasses.dataclass
class HostJob:
    """A client's job as the host's daemon keeps it (the client's side of it is
    ``offloadfs.jobrun.JobRun``; a broker's record of it, ``broker.BrokerJob``)."""

    peer: bytes
    id: str
    spec: Message
    state: JobState = JobState.NEW
    path: str = ""
    process: Process | None = None
    streams: JobStreams | None = None
    received: float = dataclasses.field(default_factory=time.monotonic)
    timings: dict = dataclasses.field(default_factory=dict)
    slot: int = 0
    attaching: float = 0.0
    mounted: tuple[str, str] | None = None
    stage: HostStage | None = None   # a staged job's scratch directory
    cost: int = 0               # what its spec holds of the budget (limits.cost)
    suspended: float | None = None   # since when its client is stopped (it said ``suspend``)
    spawned: bool = False       # a process may have been started for it (it may have run)

    @property
    def key(self) -> tuple[bytes, str]:
        """The scheduler's key: job ids are unique per client only."""
        return (self.peer, self.id)

    def describe(self) -> str:
        """A short text for logs."""
        return f"job {self.id} ({os.fsdecode(self.spec['argv'][0])})"


class Server:
    """The daemon: owns the socket, the scheduler and every job's process. Its loop thread
    (:meth:`run`) calls everything, but :meth:`stop`, which any thread or a signal handler
    may call."""

    def __init__(self, config: ServeConfig, ctx: zmq.Context | None = None):
        """Bind the ROUTER socket; nothing runs until :meth:`run`."""
        self.config = config
        self.allow = policy.Allowlist(config.commands)
        self.sched = Scheduler(config.slots)
        self.rlimits = rlimits(config.limits)
        self.hostname = config.name or socket.gethostname()
        self.jobs: dict[tuple[bytes, str], HostJob] = {}
        self.ended: dict[tuple[bytes, str], None] = {}   # the last ENDED_KEPT jobs' keys
        self.peers: dict[bytes, float] = {}
        self.fdmap: dict[int, tuple[HostJob, str]] = {}
        self.done = self.failed = 0
        self.recent: list[dict] = []
        self.metrics = Metrics("daemon")
        if config.metrics:   # first: if its port is taken, nothing else is open yet
            self.metrics.serve(config.metrics)
        self.peer_gate = router.PeerGate(self.metrics.dropped.inc)
        self.offloadfs_mounts = admission.OffloadfsMounts()   # what a command may not be in
        self.budget = limits.budget()
        self._peers_cap = limits.MAX_PEERS
        self.positions = router.Positions()
        self.handlers = self._handlers()
        self.actions = {Dispatch: self._do_dispatch, Queued: self._do_queued}
        self.records = self._clear_leftovers(config.state_dir)   # before anything is served
        self.warden: subprocess.Popen | None = None
        self._warden_w = -1
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.keys, self.ring, self.gate = self._security(config.security)
        self.sender_key: str | None = None
        self.sender_frame = None   # the message's first frame: its properties (Peer-Address)
        self._withdrawn: set = set()   # (peer, job) a cancel names in this round's messages
        self.sock, self.endpoint = router.bind(
            self.ctx, config.listen, self.keys, "clients", rcvhwm=router.DAEMON_RCVHWM,
            linger=router.DAEMON_LINGER) if config.listen else (None, "")
        link_keys = self.keys.client(keys.load_public(config.security.broker_key)) \
            if self.keys and config.connect else None
        self.links = {link.peer: link for link in (BrokerLink(
            self.ctx, e, 3 * config.heartbeat, link_keys) for e in config.connect)}
        self.wakeup = router.Wakeup()
        self.mounts = MountTable(config.mounts_dir, config.mounts_client, config.idle_unmount,
                                 self.wakeup.poke, config.mount_options)

    def _clear_leftovers(self, state_dir: str) -> warden.Records | None:
        """Kill what jobs of a dead offloadd left running (its warden may have died with it),
        so that we never run more than our slots beside them; the records of our own jobs, or
        None (with a warning) if the state directory cannot be used."""
        why = warden.usable(state_dir)
        if why is not None:
            log.warning("no job records (%s): if offloadd is killed, what its jobs started may "
                        "keep running", why)
            return None
        killed = warden.sweep(state_dir, warden.owner_runs,
                              lambda line: log.warning("at start: %s", line))
        left = warden.wait_gone(killed, 2.0)
        if left:
            log.warning("processes %s of killed jobs are still there after 2 s", left)
        return warden.Records(state_dir, log.warning)

    def _start_warden(self) -> None:
        """Start the warden (warden.py): on our death, it kills the groups of our jobs."""
        if self.records is None:
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self.warden = subprocess.Popen(
                [sys.executable, "-I", "-S", warden.__file__, self.records.dir,
                 *self.records.owner.split(".")], stdin=r, stdout=subprocess.DEVNULL,
                cwd="/", start_new_session=True)
        except OSError as exc:
            log.warning("cannot start the warden: %s; if offloadd is killed, what its jobs "
                        "started may keep running", exc)
            os.close(w)
            return
        finally:
            os.close(r)
        if self._warden_w >= 0:
            os.close(self._warden_w)
        self._warden_w = w

    def _check_warden(self) -> None:
        """A warden that died (someone killed it) is started again."""
        if self.warden is not None and self.warden.poll() is not None:
            log.warning("the warden exited %d; starting another", self.warden.returncode)
            self._start_warden()

    def _stop_warden(self) -> None:
        """Our jobs are dead: end the warden (end of file on its pipe), reap it (bounded)."""
        if self._warden_w >= 0:
            os.close(self._warden_w)
            self._warden_w = -1
        if self.warden is not None:
            try:
                self.warden.wait(5)
            except subprocess.TimeoutExpired:
                self.warden.kill()
                self.warden.wait()
            self.warden = None

    def _security(self, sec):
        """(our keys, the authorized keyring, the ZAP gate) with keys; three Nones without."""
        if not sec.on:
            return None, None, None
        ring = keys.Keyring(sec.authorized_keys)
        return keys.ServerKeys.load(sec.secret_key), ring, keys.Gate(self.ctx, {"clients": ring})

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM); then kill running jobs, tell their clients,
        close."""
        log.info("listening on %s as %s, %d slots, commands: %s", self.endpoint or "(no port)",
                 self.hostname, self.config.slots, " ".join(self.allow.names()) or "(none)")
        self._say_security()
        for link in self.links.values():
            log.info("taking jobs from broker %s", link.endpoint)
            link.send(self._announcement())
        self._start_warden()
        gc.freeze()   # what start-up made lives on: no collection walks it again (p99)
        old = signal.signal(signal.SIGCHLD, _child_changed)   # wakes the loop: see _polled
        try:
            with stopping_on_signals(self.stop, self.wakeup.w):
                self._loop()
        finally:
            signal.signal(signal.SIGCHLD, old)
            self._shutdown()

    def _say_security(self) -> None:
        """Log whether clients must hold a key, and warn when anyone may reach us without."""
        names = self.ring.names() if self.ring is not None else []
        router.say_security(
            None if self.ring is None else ("CURVE on: %d authorized keys in %s (%s)",
                                            len(names), self.ring.directory,
                                            " ".join(names) or "none yet"),
            [self.endpoint] if self.endpoint else [],
            "no keys ([security] secret_key): anyone who reaches %s can run the allowlisted "
            "commands as any non-root user")

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self.wakeup.stop()

    def _loop(self) -> None:
        """Poll and dispatch until stopped."""
        next_beat = time.monotonic()
        while not self.wakeup.stopping:
            poller = self._poller()
            timeout = max(0.0, next_beat - time.monotonic())
            for what, _ in poller.poll(math.ceil(timeout * 1000)):   # pyzmq truncates ms
                self._polled(what)
            if time.monotonic() >= next_beat:
                self._heartbeat()
                self.mounts.tick(time.monotonic())
                next_beat = time.monotonic() + self.config.heartbeat

    def _poller(self) -> zmq.Poller:
        """A poller over the socket, the wake-up pipe and whatever each job is waiting for."""
        poller = zmq.Poller()
        if self.sock is not None:
            poller.register(self.sock, zmq.POLLIN)
        for link in self.links.values():
            poller.register(link.sock, zmq.POLLIN)
        poller.register(self.wakeup.r, zmq.POLLIN)
        self.fdmap = {}
        for job in self.jobs.values():
            self._want(poller, job)
        return poller

    def _want(self, poller: zmq.Poller, job: HostJob) -> None:
        """Register the fds of ``job`` that can make progress now."""
        proc = job.process
        if proc is None:
            return
        if proc.pidfd >= 0:
            self._register(poller, job, "pid", proc.pidfd, zmq.POLLIN)
        if proc.is_open("leader"):
            self._register(poller, job, "leader", proc.fds["leader"], zmq.POLLIN)
        job.streams.want(proc, lambda role, fd, flags: self._register(poller, job, role, fd,
                                                                      flags))

    def _register(self, poller, job: HostJob, role: str, fd: int, flags: int) -> None:
        """Register one fd and remember whose it is."""
        poller.register(fd, flags)
        self.fdmap[fd] = (job, role)

    def _polled(self, what) -> None:
        """Dispatch one ready socket or fd."""
        if what is self.sock:
            self._drain_socket()
        elif isinstance(what, zmq.Socket):
            self._drain_link(next(k for k in self.links.values() if k.sock is what))
        elif what == self.wakeup.r:
            self.wakeup.drain()
            self.mounts.ready()
            for job in list(self.jobs.values()):   # a SIGCHLD may be a job that stopped
                if job.process is not None and not job.process.tty:
                    self._changed(job)
        elif what in self.fdmap:
            job, role = self.fdmap[what]
            if job.key in self.jobs:
                self._job_polled_safely(job, role)

    def _job_polled_safely(self, job: HostJob, role: str) -> None:
        """A bug in handling one job fails that job, never the daemon."""
        try:
            self._job_polled(job, role)
        except Exception:
            log.exception("internal error on %s (%s)", job.describe(), role)
            self._fail(job, "internal", f"internal error on {self.hostname}; the job was killed")

    def _drain_socket(self) -> None:
        """Handle every message waiting on the socket (bounded per round)."""
        batch = []
        for _ in range(1000):
            try:
                batch.append(router.recv_routed(self.sock, self.keys is not None))
            except zmq.Again:
                break
        self._withdrawn = _cancelled_in(batch)
        for frames, key in batch:
            self._received(frames, key)

    def _drain_link(self, link: BrokerLink) -> None:
        """Handle what a broker sent (bounded per round), as from the peer ``link.peer``."""
        batch = []
        for _ in range(1000):
            try:
                batch.append(([link.peer] + link.sock.recv_multipart(zmq.NOBLOCK), None))
            except zmq.Again:
                break
            link.received()
        self._withdrawn = _cancelled_in(batch)
        for frames, _ in batch:
            self._received(frames, via_link=True)

    def _announcement(self) -> list:
        """The announcement a broker gets: who we are and what we offer."""
        return protocol.encode("ready", host=self.hostname, commands=self.allow.names(),
                               slots=self.config.slots, tags=list(self.config.tags))

    # --- messages ------------------------------------------------------------------------------

    def _received(self, frames: list[bytes], key: str | None = None, *,
                  via_link: bool = False) -> None:
        """Decode one message from a peer (authenticated by CURVE ``key``, if any) and handle
        it; bad input gets an error reply. Handlers read the key as ``sender_key``. Only
        ``_drain_link`` passes ``via_link``: a client on our socket whose routing id is a
        broker link's name is an impostor (it would act on the broker's jobs)."""
        peer, body = frames[0], frames[1:]
        if peer in self.links and not via_link:
            self.peer_gate.note(peer, logging.WARNING, "peer on %s poses as broker link %s; "
                                "dropped", self.endpoint, peer.decode(errors="replace"))
            return
        self.sender_key = key
        self.sender_frame = body[0] if body else None
        self._heard(peer)
        try:
            msg = protocol.decode(body)
        except ProtocolError as exc:
            self._bad_input(peer, exc)
            return
        handler = self.handlers.get(msg.kind)
        if handler is None:
            self._bad_input(peer, protocol.KindError(f"{msg.kind} is not for a daemon"))
            return
        try:
            handler(peer, msg)
        except Exception:  # a bug must cost one message, never the daemon and its jobs
            self.peer_gate.internal_error(peer, msg.kind)
            job = self.jobs.get((peer, msg.job)) if msg.job else None
            self._refuse(peer, msg.job, "internal", f"internal error handling {msg.kind}",
                         self._may_have_run(job, msg.kind == "submit"))

    def _heard(self, peer: bytes) -> None:
        """Note when ``peer`` was last heard; a flood of new routing ids makes us forget the
        peers without jobs (only theirs are ever looked up)."""
        if len(self.peers) >= self._peers_cap:
            self._prune_peers()
        self.peers[peer] = time.monotonic()

    def _prune_peers(self) -> None:
        """Forget the peers that hold no job."""
        holding = {job.peer for job in self.jobs.values()}
        self.peers = {p: t for p, t in self.peers.items() if p in holding}
        self._peers_cap = max(limits.MAX_PEERS, 2 * len(self.peers))

    def _bad_input(self, peer: bytes, exc: ProtocolError) -> None:
        """Reply with an error (rate limited) and log sparingly."""
        self.peer_gate.bad_input(lambda job_id, kind, text: self._refuse(peer, job_id, kind, text),
                                 peer, exc)

    def _refuse(self, peer: bytes, job_id: str | None, kind: str, text: str,
                started: bool | None = None) -> bool:
        """An error reply (``router.PeerGate.refuse``), rate limited per peer. A broker link
        has no limit: it frees the job's slot only when it hears of it, and its load is
        bounded by what it dispatches. True if it went."""
        return self.peer_gate.refuse(self.send, peer, job_id, kind, text, started,
                                     limited=peer not in self.links)

    def _unknown(self, job_id: str) -> str:
        """The line for a job a client names that we do not know."""
        return f"{self.hostname} has no job {job_id}; it may have run and ended, or the " \
            "daemon restarted"

    @staticmethod
    def _may_have_run(job: HostJob | None, new: bool = False) -> bool:
        """Whether a job may have run, for an error about it: a job we know, if a process was
        ever spawned for it; one we do not know, unless it is a submit we refused (``new``),
        yes: it may have run and ended here, or before a restart."""
        return job.spawned if job is not None else not new

    def _handlers(self) -> dict:
        """The handler of each kind of message a daemon takes (any other is refused)."""
        return {"hello": self._on_hello, "ping": self._on_ping, "error": self._on_error,
                "status": self._on_status, "submit": self._on_submit, "file": self._on_file,
                "stdin": self._on_stdin, "stdin-eof": self._on_stdin_eof,
                "credit": self._on_credit, "close": self._on_close, "signal": self._on_signal,
                "resize": self._on_resize, "suspend": self._on_suspend,
                "resume": self._on_resume, "cancel": self._on_cancel}

    def _on_hello(self, peer: bytes, msg: Message) -> None:
        """Tell the client who we are and what we offer (rate limited per peer)."""
        if not self.peer_gate.answer(peer):
            return
        self.send(peer, protocol.encode(
            "welcome", host=self.hostname, commands=self.allow.names(), slots=self.config.slots,
            tags=list(self.config.tags), busy=self.sched.busy, queued=len(self.sched.queue),
            features=FEATURES))

    def _on_ping(self, peer: bytes, msg: Message) -> None:
        """A heartbeat: jobs the client believes live but we do not know get an error (each
        once, within the rate limit; the client's next ping names the rest again)."""
        router.refuse_unknown(msg.get("jobs", []), lambda job_id: (peer, job_id) in self.jobs
                              or (peer, job_id) in self.ended,
                              lambda job_id: self._refuse(peer, job_id, "unknown-job",
                                                          self._unknown(job_id), True))

    def _on_error(self, peer: bytes, msg: Message) -> None:
        """A broker that does not know us asks us to announce ourselves again."""
        link = self.links.get(peer)
        if link is not None and msg["kind"] == "reannounce":
            link.send(self._announcement())
        elif link is not None:
            log.warning("broker %s: %s: %s", link.endpoint, msg["kind"], msg["text"])

    def _on_status(self, peer: bytes, msg: Message) -> None:
        """Report slots, queue and recent jobs (rate limited per peer)."""
        if not self.peer_gate.answer(peer):
            return
        self.send(peer, protocol.encode(
            "status-reply", host=self.hostname, slots=self.config.slots, busy=self.sched.busy,
            queued=len(self.sched.queue), commands=self.allow.names(),
            tags=list(self.config.tags), jobs=self.recent[-50:], done=self.done,
            failed=self.failed))

    def _on_submit(self, peer: bytes, msg: Message) -> None:
        """A new job: check it, then start or queue it; one its client cancelled in the same
        round (we were stopped or busy past its ``ack_timeout``, so it may be running the
        job elsewhere) never starts."""
        key = (peer, msg.job)
        if key in self._withdrawn and key not in self.jobs and key not in self.ended:
            self._withdraw(peer, msg)
            return
        if key in self.jobs:   # the error names the job already here, which may have run
            self._refuse(peer, msg.job, "duplicate", f"job {msg.job} is already known",
                         self.jobs[key].spawned)
            return
        try:
            vm_key = msg.get("vm") if peer in self.links else self.sender_key
            path = admission.check(self.config, msg, self.allow, self.ring, vm_key,
                                   self.hostname, self.offloadfs_mounts)
            cost = admission.admit(self.budget, peer, msg, self.hostname)
        except policy.Refused as exc:
            self.peer_gate.refused(peer, msg, self._client(peer, msg), str(exc))
            self.failed += 1
            self.metrics.job_ended(self._command_label(msg), metrics.REFUSED, {})
            self._refuse(peer, msg.job, exc.kind, str(exc), False)
            return
        job = HostJob(peer, msg.job, msg, path=path, cost=cost, streams=JobStreams(
            msg.job, msg["window"], lambda frames: self.send(peer, frames),
            self.config.limits.get("output")))
        self.jobs[key] = job
        data = msg.get("data") or {}
        try:
            if data.get("mode") == protocol.DATA_STAGE:
                self._begin_staging(job, data)
            else:
                self._act(self.sched.submit(key))
        except Exception:   # a bug costs this job (it may have been spawned), not its slot
            log.exception("internal error starting %s", job.describe())
            self._fail(job, "internal", f"internal error on {self.hostname} starting the job")

    def _withdraw(self, peer: bytes, msg: Message) -> None:
        """A submit whose cancel waits behind it: never started, its cancel dropped quietly
        (the job counts as ended), a broker told so that it frees the slot."""
        log.info("job %s from %s withdrawn before it started (its cancel came with it)",
                 msg.job, self._client(peer, msg))
        self._ended((peer, msg.job))
        self.metrics.job_ended(self._command_label(msg), metrics.CANCELLED, {})
        if peer in self.links:
            self._job_error(peer, msg.job, "cancelled", f"the job was cancelled before "
                            f"{self.hostname} started it", False)

    def _client(self, peer: bytes, msg: Message) -> str:
        """Who sent a submit, for the log: its key's name (with keys), the uid it claims, and
        where it connected from (its address, or the broker it came through)."""
        link = self.links.get(peer)
        vm_key = msg.get("vm") if link else self.sender_key
        name = self.ring.name_of(vm_key) if self.ring is not None and vm_key else None
        return router.sender(name, vm_key, msg["uid"], f"via broker {link.endpoint}" if link
                             else router.address_of(self.sender_frame))

    def _command_label(self, spec: Message) -> str:
        """The metrics' command label of a job: its command's name, if allowlisted here."""
        return metrics.command_label(os.path.basename(os.fsdecode(spec["argv"][0])),
                                     self.allow.names())

    def _begin_staging(self, job: HostJob, data: dict) -> None:
        """-n: a scratch directory of the caller's; the input files come first."""
        spec = job.spec
        try:
            job.stage = HostStage(self.config.scratch_dir, spec["uid"], spec["gid"],
                                  int(data.get("bytes", 0)))
        except OSError as exc:
            self._fail(job, "stage", f"cannot make a scratch directory: {exc.strerror}")
            return
        self.send(job.peer, protocol.encode("credit", job.id, n=protocol.WINDOW))
        self._staged_maybe(job)

    def _on_file(self, peer: bytes, msg: Message) -> None:
        """-n: a chunk of an input file, written into the job's scratch directory."""
        job = self._job(peer, msg)
        if job is None:
            return
        why = UNANNOUNCED if job.stage is None or job.state != JobState.NEW else \
            job.stage.take(msg["name"], msg["mode"], msg["last"], msg.payload)
        if why is not None:
            self._fail(job, "stage", why)
            return
        job.streams.staged(len(msg.payload))
        self._staged_maybe(job)

    def _staged_maybe(self, job: HostJob) -> None:
        """Once every input byte is in, note what is there and queue the job."""
        if job.stage.complete():
            job.streams.forgive()
            self._act(self.sched.submit(job.key))

    def _on_stdin(self, peer: bytes, msg: Message) -> None:
        """Stdin data for a running job."""
        job = self._job(peer, msg)
        if job and job.process and not job.streams.stdin(job.process, msg.payload):
            self._fail(job, "credit", "the client sent more stdin than its credit")

    def _on_stdin_eof(self, peer: bytes, msg: Message) -> None:
        """The client's stdin ended."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.end_input()

    def _on_credit(self, peer: bytes, msg: Message) -> None:
        """The client consumed output: it may receive more."""
        job = self._job(peer, msg)
        if job:
            job.streams.granted(msg["n"])
            self._maybe_exit(job)

    def _on_close(self, peer: bytes, msg: Message) -> None:
        """The client's reader of a stream went away: the job gets SIGPIPE as it would locally."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.close(msg["stream"])
            self._maybe_exit(job)

    def _on_signal(self, peer: bytes, msg: Message) -> None:
        """Forward a signal to the job's process group."""
        if msg["signum"] not in SIGNALS:
            self._refuse(peer, msg.job, "field", f"{msg['signum']} is not a signal here",
                         self._may_have_run(self.jobs.get((peer, msg.job))))
            return
        job = self._job(peer, msg)
        if job and job.process:
            self.peer_gate.note(peer, logging.INFO, "%s: signal %d from client",
                                job.describe(), msg["signum"])
            job.process.signal(msg["signum"])

    def _on_resize(self, peer: bytes, msg: Message) -> None:
        """The caller's window changed size: so does the job's terminal."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.resize(msg["rows"], msg["cols"], msg["xpixel"], msg["ypixel"])

    def _on_suspend(self, peer: bytes, msg: Message) -> None:
        """The client stops itself (Ctrl-Z): its silence does not end the job until resume,
        for at most ``suspend_limit``."""
        job = self._job(peer, msg)
        if job:
            job.suspended = time.monotonic()

    def _on_resume(self, peer: bytes, msg: Message) -> None:
        """The client runs again: so does the job, in the fore- or background of its pty."""
        job = self._job(peer, msg)
        if job:
            job.suspended = None
            if job.process:
                job.process.resume(msg["foreground"])

    def _on_cancel(self, peer: bytes, msg: Message) -> None:
        """The client gave up: kill the job quietly; a broker is told it is gone (it keeps
        the job's slot busy until then)."""
        job = self._job(peer, msg)
        if job:
            self._drop(job, "cancelled by client", metrics.CANCELLED)
            if peer in self.links:
                self._job_error(peer, job.id, "cancelled", f"the job was cancelled; "
                                f"{self.hostname} killed it", job.spawned)

    def _job(self, peer: bytes, msg: Message) -> HostJob | None:
        """The job a message names, or None after telling the client it is unknown. A job
        that just ended is not unknown: the client sent this before our exit reached it (a
        ``stdin-eof`` for a job that was quicker, a ``credit``, a signal): it is dropped
        without a word."""
        job = self.jobs.get((peer, msg.job))
        if job is None and (peer, msg.job) not in self.ended:
            self._refuse(peer, msg.job, "unknown-job", self._unknown(msg.job), True)
        return job

    # --- jobs ----------------------------------------------------------------------------------

    def _act(self, actions: list) -> None:
        """Carry out the scheduler's actions about jobs we still have (``actions``)."""
        for action in actions:
            job = self.jobs.get(action.job)
            if job is not None:
                self.actions[type(action)](job, action)

    def _do_dispatch(self, job: HostJob, action: Dispatch) -> None:
        """Start the job in the slot the scheduler gave it."""
        job.slot = action.slot
        self._start(job)

    def _do_queued(self, job: HostJob, action: Queued) -> None:
        """Tell the client its job's queue position: at once the first time, else at the next
        heartbeat."""
        if job.state == JobState.QUEUED:
            self.positions.later(job.key, action.position)
        else:
            job.state = advance(job.state, "queued")
            self.send(job.peer, protocol.encode("queued", job.id, position=action.position))

    def _flush_positions(self) -> None:
        """Tell queued jobs their new positions (``router.Positions``)."""
        self.positions.flush(self.send, lambda key: key in self.jobs
                             and self.jobs[key].state == JobState.QUEUED)

    def _start(self, job: HostJob) -> None:
        """Attach the job's data (maybe later, when its mount is made), then spawn it."""
        job.attaching = time.monotonic()
        job.timings["queue"] = job.attaching - job.received
        data = job.spec.get("data") or {}
        if data.get("mode") == protocol.DATA_NFS:
            self.mounts.attach(data["server"], data["export"],
                               lambda result: self._attached(job, data, result))
        elif job.stage is not None:
            self._spawn(job, lambda: (job.stage.dir, job.stage.dir))
        else:
            self._spawn(job, lambda: (admission.shared_cwd(self.config, job.spec,
                                                           self.hostname), None))

    def _attached(self, job: HostJob, data: dict, result) -> None:
        """The job's export is mounted (``result`` is its path) or could not be."""
        if job.key not in self.jobs:
            if not isinstance(result, Exception):
                self.mounts.release(data["server"], data["export"])
            return
        if isinstance(result, Exception):
            self._fail(job, "attach", str(result))
            return
        job.mounted = (data["server"], data["export"])
        self._spawn(job, lambda: (admission.nfs_cwd(result, data, self.hostname), result))

    def _spawn(self, job: HostJob, where) -> None:
        """Spawn the job's process in its slot in the directory ``where()`` gives, confined
        to the tree it also gives (None: shared mode), or fail the job with a clear error."""
        spec = job.spec
        try:
            cwd, root = where()
            job.timings["attach"] = time.monotonic() - job.attaching
            env, ids = self._env(spec, job.slot), self._ids(spec)
            job.spawned = True   # from the fork on, it may run (unless SpawnError says not)
            job.process = Process(job.path, spec["argv"], cwd, env, ids, root, self.rlimits,
                                  spec.get("tty"), self.records, job.describe(),
                                  spec.get("stdin_null", False))
        except (SpawnError, policy.Refused) as exc:   # nothing of the command ran
            job.spawned = False
            self._fail(job, getattr(exc, "kind", "spawn"), str(exc))
            return
        job.state = advance(job.state, "started")
        log.info("%s started, pid %d, slot %d", job.describe(), job.process.pid, job.slot)
        self.send(job.peer, protocol.encode("started", job.id, host=self.hostname,
                                            pid=job.process.pid, window=protocol.WINDOW))

    def _env(self, spec: Message, slot: int) -> dict[bytes, bytes]:
        """The job's environment from the host's base, the pass list and the slot."""
        home, user = user_of(spec["uid"])
        base = policy.base_env(home, user) | {"OFFLOAD_SLOT": str(slot)} | \
            {k: v.replace("{slot}", str(slot)) for k, v in self.config.slot_env.items()}
        return policy.job_env(spec["env"], self.config.env_pass, base)

    def _ids(self, spec: Message) -> tuple[int, int, list[int]] | None:
        """(uid, gid, groups) to switch to, or None to run as this daemon."""
        if os.getuid() != 0 or (spec["uid"], spec["gid"]) == (0, 0):
            return None
        return spec["uid"], spec["gid"], spec["groups"]

    def _job_polled(self, job: HostJob, role: str) -> None:
        """One of the job's fds is ready."""
        proc = job.process
        if role in protocol.STREAMS and proc.is_open(role):
            self._pump_output(job, role)
        elif role == "stdin":
            job.streams.written(proc)
        elif role == "leader":
            self._changed(job)
        elif role == "pid" and proc.reap():
            job.timings["run"] = proc.ended - proc.started
            job.state = advance(job.state, "exited")
        self._maybe_exit(job)

    def _changed(self, job: HostJob) -> None:
        """Tell the client that its job stopped (it then stops itself, as at a terminal)."""
        for event, signum in job.process.changes():
            if event == "stopped":   # its client stops too, and may be silent a while
                if not self._flush_output(job):
                    return
                job.suspended = job.suspended or time.monotonic()
                log.info("%s stopped by signal %d", job.describe(), signum)
                self.send(job.peer, protocol.encode("stopped", job.id, signal=signum))

    def _flush_output(self, job: HostJob) -> bool:
        """Send what the job wrote before it stopped (its terminal's echo of ^Z is in the pty
        already when the stop is seen), so that the client shows it before it stops too; False
        if that ended the job (its output passed the limit)."""
        for name in protocol.STREAMS:
            if job.process.is_open(name):
                self._pump_output(job, name)
        return self.jobs.get((job.peer, job.id)) is job

    def _pump_output(self, job: HostJob, name: str) -> None:
        """Send what the job wrote on ``name`` (``JobStreams.pump``); a job whose output
        passes the host's limit is killed."""
        if not job.streams.pump(job.process, name):
            self._fail(job, "limit", f"the job's output passed the host's limit of "
                                     f"{show_size(self.config.limits['output'])}; it was killed")

    def _maybe_exit(self, job: HostJob) -> None:
        """When the process is reaped and its output drained (and, staging, its files sent
        back), send the exit status."""
        proc = job.process
        if proc is None or not proc.finished or job.key not in self.jobs:
            return
        if job.stage is not None:
            if not job.streams.send_files(job.stage.outbox()):
                return
            job.stage.close()   # before the exit: its client finds nothing of it left here
            job.stage = None
        job.timings["drain"] = time.monotonic() - proc.ended
        self.send(job.peer, protocol.encode(
            "exit", job.id, status=proc.status, signal=proc.term_signal, rusage=proc.rusage,
            timings=job.timings))
        log.info("%s exited %d in %.3fs", job.describe(), proc.status, job.timings["run"])
        self._retire(job, metrics.exit_outcome(proc.status, proc.term_signal), proc.status)

    def _fail(self, job: HostJob, kind: str, text: str) -> None:
        """End a job with an error the client reports as exit 255 (saying whether it may have
        run: then it must never be run again, anywhere)."""
        log.info("%s failed: %s", job.describe(), text)
        self._job_error(job.peer, job.id, kind, text, job.spawned)
        self._retire(job, metrics.error_outcome(job.spawned))

    def _drop(self, job: HostJob, why: str, outcome: str = metrics.LOST) -> None:
        """Kill a job whose client is gone (``outcome`` lost) or gave up (cancelled)."""
        log.info("%s killed: %s", job.describe(), why)
        self._retire(job, outcome)

    def _retire(self, job: HostJob, outcome: str, status: int | None = None) -> None:
        """Remove a job (once), kill what is left of it, free its slot and mount, count it
        (``outcome``: one of ``metrics.OUTCOMES``; ``status``: its exit status, if it
        exited)."""
        if self.jobs.pop(job.key, None) is None:
            return
        self._ended(job.key)
        self.budget.give(job.peer, job.cost)
        if job.process:
            job.process.kill()
        if job.mounted:
            self.mounts.release(*job.mounted)
        if job.stage is not None:
            job.stage.close()
        if status is None:
            self.failed += 1
        else:
            self.done += 1
        self.metrics.job_ended(self._command_label(job.spec), outcome, job.timings)
        self.recent = (self.recent + [_summary(job, status, self.hostname)])[-100:]
        self._act(self.sched.cancel(job.key))

    def _ended(self, key: tuple) -> None:
        """Keep an ended job's key (the last ``ENDED_KEPT``): its client's late words are
        dropped without a reply."""
        self.ended[key] = None
        if len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]

    def _job_error(self, peer: bytes, job_id: str, kind: str, text: str,
                   started: bool) -> None:
        """Send an ``error`` about one job; ``started``: whether it may have run."""
        self.send(peer, protocol.encode("error", job_id, kind=kind, text=text, started=started))

    # --- peers ---------------------------------------------------------------------------------

    def send(self, peer: bytes, frames: list) -> None:
        """Send to a peer (a client, or a broker's link); a peer that is gone loses its jobs."""
        link = self.links.get(peer)
        if link is not None:
            try:
                link.send(frames)
            except zmq.ZMQError as exc:
                log.warning("cannot send to broker %s: %s", link.endpoint, exc)
            return
        try:
            self.sock.send_multipart([peer] + frames, zmq.NOBLOCK, copy=len(frames) == 1)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self._peer_gone(peer, "client disconnected")

    def _heartbeat(self) -> None:
        """Ping clients with jobs; drop the jobs of clients silent past the timeout."""
        now = time.monotonic()
        by_peer: dict[bytes, list[str]] = {}
        for job in self.jobs.values():
            by_peer.setdefault(job.peer, []).append(job.id)
        self.metrics.load(self.config.slots, self.sched.busy, len(self.sched.queue))
        for link in self.links.values():
            if link.tick(now, self._announcement(), by_peer.pop(link.peer, [])):
                self.metrics.missed.labels(peer="broker").inc()
                self._peer_gone(link.peer, f"broker {link.endpoint} lost")
        for peer, ids in by_peer.items():
            if now - self.peers.get(peer, now) > self.config.client_timeout:
                self.metrics.missed.labels(peer="client").inc()
                self._peer_gone(peer, f"client silent for {self.config.client_timeout:.0f}s",
                                now)
                ids = [i for i in ids if (peer, i) in self.jobs]   # suspended ones
            if ids:   # a stopped client is pinged too: a send that fails means it is gone
                self.send(peer, protocol.encode("ping", jobs=ids))
        self._prune_peers()
        self._flush_positions()
        self._end_lingering_ttys(now)
        self._check_warden()

    def _end_lingering_ttys(self, now: float) -> None:
        """A job that ended while something it left behind holds its pty: send what the pty
        has, then close it so that the exit goes out."""
        for job in list(self.jobs.values()):
            if job.process is not None and job.process.linger_over(now):
                if job.streams.credit > 0:
                    self._pump_output(job, "tty")
                job.process.close("tty")
                self._maybe_exit(job)

    def _peer_gone(self, peer: bytes, why: str, now: float | None = None) -> None:
        """Kill every job of a vanished client; with ``now`` (silence, not a disconnect), a
        job whose client said it suspends itself is kept for up to ``suspend_limit``."""
        for job in [j for j in self.jobs.values() if j.peer == peer]:
            if now is not None and job.suspended is not None \
                    and now - job.suspended < self.config.suspend_limit:
                continue
            self._drop(job, why if job.suspended is None else
                       f"its client stayed stopped for {self.config.suspend_limit:.0f}s")

    def _shutdown(self) -> None:
        """Kill every job, tell each client (whether it had run), close the socket."""
        for job in list(self.jobs.values()):
            if not job.spawned:
                what = "the job never ran"
            elif job.process is not None and job.process.status is not None:
                what = "the job had ended, but not all of its output was sent"
            else:
                what = "the job was killed"
            if job.process:
                job.process.kill()
            self._job_error(job.peer, job.id, "shutdown",
                            f"offloadd on {self.hostname} stopped; {what}", job.spawned)
            self.jobs.pop(job.key, None)
        if self.records is not None:
            self.records.close()
        self._stop_warden()
        self.mounts.close()
        self.offloadfs_mounts.close()
        self.metrics.close()
        if self.gate is not None:
            self.gate.close()
        for link in self.links.values():
            link.close()
        if self.sock is not None:
            self.sock.close(linger=router.DAEMON_LINGER)
        self.wakeup.close()
        if self._own_ctx:
            self.ctx.term()
        log.info("stopped")


SIGNALS = frozenset(signal.valid_signals())   # a signal a client may send its job


def _child_changed(signum, frame) -> None:
    """SIGCHLD: nothing to do here; the wake-up fd makes the loop look at its jobs."""


def _cancelled_in(batch: list) -> set:
    """The jobs (peer, id) that a round's messages cancel: a header frame that holds the word
    is decoded to be sure (a lone message needs no look)."""
    if len(batch) < 2:
        return set()
    out = set()
    for frames, _ in batch:
        head = frames[1] if len(frames) > 1 else b""
        if b"cancel" not in (head if isinstance(head, bytes) else head.bytes):
            continue
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError:
            continue   # its own turn says what is wrong with it
        if msg.kind == "cancel" and msg.job:
            out.add((frames[0], msg.job))
    return out


def _summary(job: HostJob, status: int | None, host: str) -> dict:
    """A job as ``status`` reports it (``host``: where it ran, this daemon)."""
    return metrics.ended_record(job.id, job.spec["argv"][0], status, host, job.timings) | \
        {"uid": job.spec["uid"]}
