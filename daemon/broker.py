"""``offloadd broker``: the socket loop around the broker's rules (``broker_rules.Rules``).

One thread does everything: :meth:`Broker.run` polls the clients' ROUTER (they speak the same
protocol as to a daemon), the hosts' ROUTER (each daemon's DEALER, ``offloadd serve
--connect``) and a wake-up pipe; it feeds events to the rules and carries out their actions.
Jobs get a broker-wide id on their way to a host (ids are unique per client only): a random
prefix drawn once per broker process, then a counter, so that a restarted broker's ids never
meet those of its previous life on a host that still knows them. Every message of a job after
its dispatch is passed through unchanged but for that id, so streams keep their credit-based
flow control end to end. The broker keeps nothing that matters across a restart (see
``broker_rules``).

Every ``error`` the broker itself sends about a job says whether the job may have started
(``started``): true once it was dispatched to a host (host lost, broker stopped, a job it
does not know, as after its own restart), false only while the job never left the broker (no
host offers it, refused at submit, broker stopped while it was queued). A host's own error is
relayed unchanged, with the host's ``started``.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import socket
import time

import zmq

from offloadfs import keys, protocol
from offloadfs.protocol import Message, ProtocolError

from . import broker_rules as rules_mod
from . import limits, metrics, router
from .config import BrokerConfig, Security
from .metrics import Metrics
from .signals import stopping_on_signals

log = logging.getLogger("offloadd")

PASS_THROUGH = frozenset({"stdin", "stdin-eof", "credit", "close", "signal", "file", "resize",
                          "suspend", "resume"})
# What the broker reads of each kind a host sends it to pass on (``protocol.decode``'s
# ``reads``): only these fields are checked here, the client checks the rest of what it gets.
# The kinds not named (ready, ping) are checked whole.
HOST_READS = {**dict.fromkeys(("started", "stdout", "stderr", "tty", "file", "credit", "stopped",
                               "queued"), ()),
              "exit": ("status", "signal", "timings"), "error": ("started",)}
MORE = zmq.NOBLOCK | zmq.SNDMORE
RECENT = 100   # jobs that ended, kept for status
RECENT_ARGV0 = 4 * 255   # of each one's argv[0], the bytes of its record's 255 characters


def command_of(submit: Message) -> str:
    """The command a submit names: its argv[0]'s base name."""
    return os.path.basename(os.fsdecode(submit["argv"][0]))


@dataclasses.dataclass(slots=True)
class BrokerJob:
    """A client's job as the broker keeps it."""

    key: tuple[bytes, str]
    wire: str
    submit: Message
    command: str                # argv[0]'s base name
    host: bytes | None = None
    host_name: str = ""         # the host's name at dispatch, for error lines
    vm: str | None = None
    cost: int = 0               # what its spec holds of the budget (limits.cost)
    ended: bool = False         # counted in the metrics and the recent jobs (once)


class Broker:
    """Owns both sockets and the rules; see the module docstring for the thread."""

    def __init__(self, config: BrokerConfig, ctx: zmq.Context | None = None):
        """Bind both sockets; nothing runs until :meth:`run`."""
        self.config = config
        self.name = config.name or f"broker@{socket.gethostname()}"
        self.rules = rules_mod.Rules(config.heartbeat, config.liveness, config.client_timeout,
                                     grace=2 * config.heartbeat,
                                     suspend_limit=config.suspend_limit)
        self.metrics = Metrics("broker")
        if config.metrics:   # first: if its port is taken, nothing else is open yet
            self.metrics.serve(config.metrics)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.keys, self.rings, self.gate = self._security(config.security)
        self.sender_key: str | None = None
        self.sender_frame = None   # the message's first frame: its properties (Peer-Address)
        self.front, self.front_endpoint = router.bind(self.ctx, config.clients, self.keys,
                                                      "clients")
        self.back, self.back_endpoint = router.bind(self.ctx, config.workers, self.keys, "hosts")
        self.jobs: dict[tuple[bytes, str], BrokerJob] = {}
        self.wires: dict[str, tuple[bytes, str]] = {}
        self.life = os.urandom(6).hex()   # this process's prefix of wire ids
        self.ids = itertools.count(1)
        self.done = self.failed = 0
        self.recent: collections.deque[tuple] = collections.deque(maxlen=RECENT)   # for status
        self.now = time.monotonic()   # the time of the poll round being handled
        self.wakeup = router.Wakeup()
        self.peer_gate = router.PeerGate(self.metrics.dropped.inc)
        self.from_clients, self.from_hosts = self._handlers()
        self.actions = {rules_mod.Dispatch: self._do_dispatch, rules_mod.Queued: self._do_queued,
                        rules_mod.HostLost: self._do_host_lost, rules_mod.NoHost: self._do_no_host,
                        rules_mod.Cancel: self._do_cancel, rules_mod.Forget: self._do_forget,
                        rules_mod.CommandsChanged: self._do_commands_changed,
                        rules_mod.Reannounce: self._do_reannounce}
        self.budget = limits.budget()

    def _security(self, sec: Security):
        """(our keys, a keyring per port, the ZAP gate) with keys; (None, {}, None) without."""
        if not sec.on:
            return None, {}, None
        rings = {"clients": keys.Keyring(sec.authorized_keys),
                 "hosts": keys.Keyring(sec.authorized_hosts)}
        return keys.ServerKeys.load(sec.secret_key), rings, keys.Gate(self.ctx, rings)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM (or :meth:`stop`); then close both sockets."""
        log.info("broker %s: clients on %s, hosts on %s (job ids %s-N)", self.name,
                 self.front_endpoint, self.back_endpoint, self.life)
        router.say_security(
            ("CURVE on: %d VM keys, %d host keys authorized", len(self.rings["clients"].names()),
             len(self.rings["hosts"].names())) if self.keys else None,
            [self.front_endpoint, self.back_endpoint],
            "no keys ([security] secret_key): anyone who reaches %s or %s can submit jobs or "
            "pose as a host")
        try:
            with stopping_on_signals(self.stop, self.wakeup.w):
                self._loop()
        finally:
            try:
                self._farewell()
            finally:
                self._close()

    def stop(self) -> None:
        """Ask the loop to end (any thread, or a signal handler)."""
        self.wakeup.stop()

    def _loop(self) -> None:
        """Poll, dispatch, heartbeat."""
        poller = zmq.Poller()
        for item in (self.front, self.back, self.wakeup.r):
            poller.register(item, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self.wakeup.stopping:
            timeout = max(0.0, next_beat - time.monotonic())
            ready = dict(poller.poll(timeout * 1000))
            self.now = time.monotonic()
            if self.back in ready:
                self._drain(self.back, self._from_host, HOST_READS)
            if self.front in ready:
                self._drain(self.front, self._from_client)
            if self.wakeup.r in ready:
                self.wakeup.drain()
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.config.heartbeat

    def _drain(self, sock: zmq.Socket, handle, reads: dict | None = None) -> None:
        """Handle what waits on ``sock`` (bounded per round: one poll, then many reads)."""
        keyed = self.keys is not None
        for _ in range(1000):
            try:
                frames, self.sender_key = router.recv_routed(sock, keyed)
            except zmq.Again:
                return
            self._received(sock, frames, handle, reads)

    def _received(self, sock: zmq.Socket, frames: list, handle,
                  reads: dict | None = None) -> None:
        """Decode one message from a peer on ``sock`` (``reads``: see ``protocol.decode``) and
        ``handle`` it. Bad input gets an error reply within the peer's rate limit; a bug in
        handling costs that message, never the broker."""
        peer, body = frames[0], frames[1:]
        self.sender_frame = body[0] if body else None
        try:
            msg = protocol.decode(body, reads)
        except ProtocolError as exc:
            self.peer_gate.bad_input(lambda job_id, kind, text: self._refuse(
                sock, peer, job_id, kind, text), peer, exc)
            return
        try:
            handle(peer, msg)
        except Exception:
            self.peer_gate.internal_error(peer, msg.kind)
            self._refuse(sock, peer, msg.job, "internal", f"internal error handling {msg.kind}")

    # --- clients -------------------------------------------------------------------------------

    def _from_client(self, client: bytes, msg: Message) -> None:
        """A client's message: hello, status, ping, submit, cancel, or a job's stream."""
        now = self.now
        self._act(self.rules.client_heard(client, now))
        handler = self.from_clients.get(msg.kind)
        if handler is None:
            self._refuse(self.front, client, msg.job, "kind", f"{msg.kind} is not for a broker")
        else:
            handler(client, msg, now)

    def _answer(self, client: bytes, msg: Message, now: float) -> None:
        """A hello or a status: who we are, or our state (rate limited per peer)."""
        if self.peer_gate.answer(client):
            self._to_client(client, self._welcome() if msg.kind == "hello" else self._status())

    def _on_ping(self, client: bytes, msg: Message, now: float) -> None:
        """A heartbeat: jobs the client names that we do not know get an error."""
        router.refuse_unknown(
            msg.get("jobs", []), lambda job_id: (client, job_id) in self.jobs,
            lambda job_id: self._refuse(self.front, client, job_id, "unknown-job",
                                        self._unknown(job_id), started=True))

    def _on_cancel(self, client: bytes, msg: Message, now: float) -> None:
        """The client gave up a job: the rules drop it or have its host kill it."""
        job = self.jobs.get((client, msg.job))
        if job is not None:
            self._finish(job, metrics.CANCELLED)
            self._act(self.rules.cancel(job.key))

    def _submit(self, client: bytes, msg: Message, now: float) -> None:
        """A new job: remember it and let the rules place or queue it."""
        key = (client, msg.job)
        if key in self.jobs:
            self._refuse(self.front, client, msg.job, "duplicate",   # the one here may run
                         f"job {msg.job} is already known", started=True)
            return
        if self.keys and self.rings["clients"].name_of(self.sender_key) is None:
            self._refused(client, msg, "unauthorized", f"this VM's key is no longer authorized "
                          f"on {self.name}; the job never ran")
            return
        cost = limits.cost(msg.fields)
        why = self.budget.take(client, cost)
        if why is not None:
            self._refused(client, msg, "busy", f"{self.name}: {why}; the job never ran")
            return
        command = command_of(msg)
        job = BrokerJob(key, f"{self.life}-{next(self.ids)}", msg, command,
                        vm=self.sender_key if self.keys else None, cost=cost)
        self.jobs[key] = job
        self.wires[job.wire] = key
        self._act(self.rules.submit(key, client, now, command, msg.get("tags", ())))

    def _refused(self, client: bytes, msg: Message, kind: str, text: str) -> None:
        """Refuse a submit (it never ran): a warning naming its sender, counted, answered."""
        name = self.rings["clients"].name_of(self.sender_key) if self.keys else None
        self.peer_gate.refused(client, msg, router.sender(
            name, self.sender_key, msg["uid"], router.address_of(self.sender_frame)), text)
        self._count(msg.job, msg, command_of(msg), metrics.REFUSED)
        self._refuse(self.front, client, msg.job, kind, text, started=False)

    def _pass_to_host(self, client: bytes, msg: Message, now: float) -> None:
        """A job's message goes to its host under the broker's id for the job; a suspend or
        resume also tells the rules whether the client's silence is its death."""
        job = self.jobs.get((client, msg.job))
        if job is None:
            self._refuse(self.front, client, msg.job, "unknown-job", self._unknown(msg.job),
                         started=True)
            return
        if msg.kind == "suspend":
            self._act(self.rules.suspend(job.key, now))
        elif msg.kind == "resume":
            self._act(self.rules.resume(job.key, now))
        if job.host is not None:   # decoded and checked: passed on as it is, under our id
            self._send(self.back, job.host,
                       protocol.pack(msg.kind, job.wire, msg.payload, msg.fields))

    def _unknown(self, job_id: str) -> str:
        """The line for a job a client names that we do not know: after a broker restart, or
        lost in one, it may have been dispatched by the previous broker."""
        return (f"{self.name} has no job {job_id}: the broker restarted; the job may have "
                "run, its outcome is unknown")

    def _welcome(self) -> list:
        """Who we are: the union of what live hosts offer."""
        r = self.rules
        return protocol.encode("welcome", host=self.name, commands=list(r.commands),
                               slots=r.slots, tags=list(r.tags), busy=r.busy,
                               queued=len(r.queue))

    def _status(self) -> list:
        """Slots, busy, queue, and each live host as a row."""
        r = self.rules
        hosts = [{"host": h.name, "slots": h.slots, "busy": len(h.running),
                  "commands": " ".join(sorted(h.commands))[:255],
                  "tags": ",".join(sorted(h.tags))} for h in r.hosts.values()]
        return protocol.encode("status-reply", host=self.name, slots=r.slots, busy=r.busy,
                               queued=len(r.queue), commands=list(r.commands),
                               tags=list(r.tags),
                               jobs=hosts[:900] + [metrics.ended_record(*x)
                                                   for x in list(self.recent)[-50:]],
                               done=self.done,
                               failed=self.failed)

    # --- hosts ---------------------------------------------------------------------------------

    def _from_host(self, host: bytes, msg: Message) -> None:
        """A host's message: ready, ping, or news of a job (passed on to its client)."""
        self.from_hosts.get(msg.kind, self._host_news)(host, msg, self.now)

    def _handlers(self) -> tuple[dict, dict]:
        """The handler of each kind of message from a client (any other is refused), and from
        a host (any other kind: :meth:`_host_news`)."""
        from_clients = {"hello": self._answer, "status": self._answer, "ping": self._on_ping,
                        "submit": self._submit, "cancel": self._on_cancel,
                        **dict.fromkeys(PASS_THROUGH, self._pass_to_host)}
        return from_clients, {"ready": self._host_ready}

    def _host_news(self, host: bytes, msg: Message, now: float) -> None:
        """Any message but ``ready`` from a host: it lives; news of a job goes to its client
        as the host sent it, under the client's id for the job (``HOST_READS``: the client
        checks what the broker does not read)."""
        self._act(self.rules.host_heard(host, now))
        key = self.wires.get(msg.job) if msg.job else None
        job = self.jobs.get(key) if key else None
        if job is None or job.host != host:
            return
        kind = msg.kind
        if kind == "exit":   # counted first: a scrape after the client's exit sees it
            self._finish(job, metrics.exit_outcome(msg["status"], msg.get("signal")),
                         msg["status"], msg.get("timings"))
        elif kind == "error":
            self._finish(job, metrics.error_outcome(msg.get("started", True)))
        self._to_client(job.key[0], protocol.pack(kind, job.key[1], msg.payload,
                                                  msg.header or msg.fields))
        if kind == "stopped":   # its client stops too, maybe before its suspend leaves
            self._act(self.rules.suspend(key, now))
        elif kind == "exit" or kind == "error":
            self._act(self.rules.slot_freed(host, key))
            self._forget(key)

    def _host_ready(self, host: bytes, msg: Message, now: float) -> None:
        """A host offers itself (again: it starts fresh)."""
        try:
            actions = self.rules.host_ready(host, now, msg["host"], msg["commands"],
                                            msg.get("tags", []), msg["slots"])
        except rules_mod.RulesError as exc:
            self._send(self.back, host, protocol.encode("error", kind="ready", text=str(exc)))
            return
        log.info("host %s ready: %d slots, commands %s, tags %s", msg["host"], msg["slots"],
                 " ".join(msg["commands"]), ",".join(msg.get("tags", [])) or "-")
        self._act(actions)

    def _heartbeat(self) -> None:
        """Ping hosts and the clients with jobs; let the rules expire the silent."""
        now = time.monotonic()
        for host in list(self.rules.hosts):
            if not self._send(self.back, host, protocol.encode("ping")):
                log.info("host %r disconnected", host)
                self._act(self.rules.host_gone(host, now))   # no need to wait for silence
        by_client: dict[bytes, list[str]] = {}
        for client, job_id in self.jobs:
            by_client.setdefault(client, []).append(job_id)
        for client, ids in by_client.items():
            self._to_client(client, protocol.encode("ping", jobs=ids))
        r = self.rules
        self.metrics.load(r.slots, r.busy, len(r.queue))
        self._act(r.tick(now))

    # --- actions -------------------------------------------------------------------------------

    def _act(self, actions: list) -> None:
        """Carry out the rules' actions, in order."""
        for action in actions:
            self.actions[type(action)](action)

    def _do_dispatch(self, a: rules_mod.Dispatch) -> None:
        """Send the job's submit to its host, under the broker's id."""
        job = self.jobs[a.job]
        job.host = a.host_id
        host = self.rules.hosts.get(a.host_id)
        job.host_name = host.name if host is not None else repr(a.host_id)
        fields = job.submit.fields   # pack copies it
        if job.vm or "vm" in fields:   # never the client's vm
            fields = {k: v for k, v in fields.items() if k != "vm"}
            if job.vm:
                fields["vm"] = job.vm
        self._send(self.back, a.host_id, protocol.pack("submit", job.wire, None, fields))

    def _do_queued(self, a: rules_mod.Queued) -> None:
        """Tell the client where its job waits (the rules say it when the job queues, then
        at each tick where its place changed)."""
        client, job_id = a.job   # our own numbers: packed without encode's check
        self._to_client(client, protocol.pack("queued", job_id, None, {"position": a.position}))

    def _do_host_lost(self, a: rules_mod.HostLost) -> None:
        """The job's host died while it ran: exit 255 with one line on the client."""
        client, job_id = a.job
        self._finish(self.jobs.get(a.job), metrics.LOST)
        self.metrics.missed.labels(peer="host").inc()
        self._client_error(client, job_id, "host-lost", a.reason, started=True)
        self._forget(a.job)

    def _do_no_host(self, a: rules_mod.NoHost) -> None:
        """No live host can run the job."""
        client, job_id = a.job
        self._finish(self.jobs.get(a.job), metrics.REFUSED)
        self._client_error(client, job_id, "no-host", a.reason, started=False)
        self._forget(a.job)

    def _do_cancel(self, a: rules_mod.Cancel) -> None:
        """The job's client is gone: its host kills it."""
        job = self.jobs.get(a.job)
        if job is not None:
            self._finish(job, metrics.LOST)   # unless its client cancelled it
            self._send(self.back, a.host_id, protocol.encode("cancel", job.wire))

    def _do_forget(self, a: rules_mod.Forget) -> None:
        """Drop what we keep of a job (a queued one's client went away, unless it cancelled)."""
        self._finish(self.jobs.get(a.job), metrics.LOST)
        self._forget(a.job)

    def _finish(self, job: BrokerJob | None, outcome: str, status: int | None = None,
                timings: dict | None = None) -> None:
        """Count how a job we know ended (``metrics.OUTCOMES``), once: the first outcome
        stands."""
        if job is not None and not job.ended:
            job.ended = True
            self._count(job.key[1], job.submit, job.command, outcome, status, timings or {},
                        job.host_name or "-")

    def _count(self, job_id: str, submit: Message, command: str, outcome: str,
               status: int | None = None, timings: dict | None = None,
               host: str = "-") -> None:
        """A job ended: the done and failed counts, the metrics, the recent jobs (their
        records made when status asks)."""
        if status is None:
            self.failed += 1
        else:
            self.done += 1
        timings = timings or {}
        self.metrics.job_ended(metrics.command_label(command, self.rules.commands), outcome,
                               timings)
        self.recent.append((job_id, submit["argv"][0][:RECENT_ARGV0], status, host, timings))

    def _do_commands_changed(self, a: rules_mod.CommandsChanged) -> None:
        """VMs see the new command set at their next hello."""
        log.info("commands offered now: %s", " ".join(a.commands) or "(none)")

    def _do_reannounce(self, a: rules_mod.Reannounce) -> None:
        """Ask an unknown host to say ready again."""
        self._send(self.back, a.host_id, protocol.encode(
            "error", kind="reannounce", text=f"{self.name} does not know this host"))

    def _forget(self, key) -> None:
        """Remove a job from the broker's books."""
        job = self.jobs.pop(key, None)
        if job is not None:
            self.wires.pop(job.wire, None)
            self.budget.give(job.key[0], job.cost)

    # --- sending -------------------------------------------------------------------------------

    def _to_client(self, client: bytes, frames: list) -> None:
        """Send to a client."""
        self._send(self.front, client, frames)

    def _refuse(self, sock: zmq.Socket, peer: bytes, job_id: str | None, kind: str,
                text: str, started: bool | None = None) -> bool:
        """An error reply on ``sock`` (``router.PeerGate.refuse``), rate limited per peer;
        True if it went."""
        return self.peer_gate.refuse(lambda p, frames: self._send(sock, p, frames), peer,
                                     job_id, kind, text, started)

    def _client_error(self, client: bytes, job_id: str, kind: str, text: str, *,
                      started: bool) -> None:
        """An error about a client's job; ``started``: whether it may have run."""
        self._to_client(client, protocol.encode("error", job_id, kind=kind,
                                                text=text[:protocol.MAX_TEXT], started=started))

    def _farewell(self) -> None:
        """The broker stops: each job's client is told, a queued job never ran; a dispatched
        one is cancelled on its host (nobody would supervise it) and may have run."""
        for key, job in list(self.jobs.items()):
            client, job_id = key
            if job.host is None:
                self._client_error(client, job_id, "shutdown", f"offloadfs: broker {self.name} "
                                   "stopped; the job never ran", started=False)
            else:
                self._send(self.back, job.host, protocol.encode("cancel", job.wire))
                self._client_error(client, job_id, "shutdown", f"offloadfs: broker {self.name} "
                                   f"stopped; the job was sent to host {job.host_name}, which "
                                   "was told to kill it; the job may have run, its outcome is "
                                   "unknown", started=True)
            self._forget(key)

    def _send(self, sock: zmq.Socket, peer: bytes, frames: list) -> bool:
        """Send; False if the peer is gone (ZeroMQ saw its connection close). Frame by frame:
        send_multipart's checks of each frame cost more than the sends."""
        try:
            sock.send(peer, MORE)   # a gone peer fails here, before anything is queued
            for frame in frames[:-1]:
                sock.send(frame, MORE)
            sock.send(frames[-1], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False
        return True

    def _close(self) -> None:
        """Close sockets, the wake-up pipe and the metrics server."""
        self.metrics.close()
        if self.gate is not None:
            self.gate.close()
        self.front.close(linger=router.LINGER)
        self.back.close(linger=router.LINGER)
        self.wakeup.close()
        if self._own_ctx:
            self.ctx.term()
        log.info("broker stopped")
