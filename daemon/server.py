"""``offloadd serve``: the ROUTER socket loop that runs clients' jobs on this host.

One thread does everything: :meth:`Server.run` polls the ROUTER socket, every job's pipes and
pidfds, and a wake-up pipe for signals; it decodes messages (``offloadfs.protocol``), applies
the rules (``policy``, ``scheduler``) and drives the processes (``runner``). Nothing else
touches the socket or the jobs. ``stop()`` may be called from a signal handler.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time

import zmq

from offloadfs import mountinfo, protocol, staging
from offloadfs.protocol import Message, ProtocolError
from offloadfs.states import JobState, advance

from . import policy
from .config import ServeConfig
from .metrics import Metrics
from .mounts import MountTable
from .worker import BrokerLink
from .runner import Process, SpawnError, user_of
from .scheduler import Position, Scheduler, Start
from .signals import stopping_on_signals

log = logging.getLogger("offloadd")

MAX_CREDIT = 16 * 1024 * 1024   # a client may not make us buffer more than this per job


@dataclasses.dataclass
class Job:
    """A client's job as the server keeps it."""

    peer: bytes
    id: str
    spec: Message
    state: JobState = JobState.NEW
    path: str = ""
    process: Process | None = None
    credit: int = 0
    owed: int = 0
    received: float = dataclasses.field(default_factory=time.monotonic)
    timings: dict = dataclasses.field(default_factory=dict)
    slot: int = 0
    attaching: float = 0.0
    mounted: tuple[str, str] | None = None
    scratch: str = ""
    stage_left: int = 0
    inbox: staging.Inbox | None = None
    outbox: staging.Outbox | None = None
    before: dict | None = None

    @property
    def key(self) -> tuple[bytes, str]:
        """The scheduler's key: job ids are unique per client only."""
        return (self.peer, self.id)

    def describe(self) -> str:
        """A short text for logs."""
        return f"job {self.id} ({os.fsdecode(self.spec['argv'][0])})"


class Server:
    """The daemon: owns the socket, the scheduler and every job's process."""

    def __init__(self, config: ServeConfig, ctx: zmq.Context | None = None):
        """Bind the ROUTER socket; nothing runs until :meth:`run`."""
        self.config = config
        self.allow = policy.Allowlist(config.commands)
        self.sched = Scheduler(config.slots)
        self.hostname = config.name or socket.gethostname()
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.peers: dict[bytes, float] = {}
        self.fdmap: dict[int, tuple[Job, str]] = {}
        self.done = self.failed = 0
        self.recent: list[dict] = []
        self._bad_logged: dict[bytes, float] = {}
        self._stopping = False
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self._bind(config.listen) if config.listen else None
        self.endpoint = getattr(self, "endpoint", "")
        self.links = {link.peer: link for link in
                      (BrokerLink(self.ctx, e, 3 * config.heartbeat) for e in config.connect)}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.mounts = MountTable(config.mounts_dir, config.mounts_client, config.idle_unmount,
                                 self._poke)
        self.metrics = Metrics("daemon")
        if config.metrics:
            self.metrics.serve(config.metrics)

    def _bind(self, endpoint: str) -> zmq.Socket:
        """A ROUTER socket bound to ``endpoint`` (port 0 picks a free port)."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER + 4096)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(_wildcard_port(endpoint))
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM); then kill running jobs, tell their clients,
        close."""
        log.info("listening on %s as %s, %d slots, commands: %s", self.endpoint or "(no port)",
                 self.hostname, self.config.slots, " ".join(self.allow.names()) or "(none)")
        for link in self.links.values():
            log.info("taking jobs from broker %s", link.endpoint)
            link.send(self._announcement())
        try:
            with stopping_on_signals(self.stop, self._wake_w):
                self._loop()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self._stopping = True
        self._poke()

    def _poke(self) -> None:
        """Wake the loop (any thread)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        """Poll and dispatch until stopped."""
        next_beat = time.monotonic()
        while not self._stopping:
            poller = self._poller()
            timeout = max(0.0, next_beat - time.monotonic())
            for what, _ in poller.poll(timeout * 1000):
                self._ready(what)
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
        poller.register(self._wake_r, zmq.POLLIN)
        self.fdmap = {}
        for job in self.jobs.values():
            self._want(poller, job)
        return poller

    def _want(self, poller: zmq.Poller, job: Job) -> None:
        """Register the fds of ``job`` that can make progress now."""
        proc = job.process
        if proc is None:
            return
        if proc.pidfd >= 0:
            self._register(poller, job, "pid", proc.pidfd, zmq.POLLIN)
        if job.credit > 0:
            for name in protocol.STREAMS:
                if proc.is_open(name):
                    self._register(poller, job, name, proc.fds[name], zmq.POLLIN)
        if proc.pending and proc.is_open("stdin"):
            self._register(poller, job, "stdin", proc.fds["stdin"], zmq.POLLOUT)

    def _register(self, poller, job: Job, role: str, fd: int, flags: int) -> None:
        """Register one fd and remember whose it is."""
        poller.register(fd, flags)
        self.fdmap[fd] = (job, role)

    def _ready(self, what) -> None:
        """Dispatch one ready socket or fd."""
        if what is self.sock:
            self._drain_socket()
        elif isinstance(what, zmq.Socket):
            self._drain_link(next(k for k in self.links.values() if k.sock is what))
        elif what == self._wake_r:
            _drain_pipe(self._wake_r)
            self.mounts.ready()
        elif what in self.fdmap:
            job, role = self.fdmap[what]
            if job.key in self.jobs:
                self._job_ready_safely(job, role)

    def _job_ready_safely(self, job: Job, role: str) -> None:
        """A bug in handling one job fails that job, never the daemon."""
        try:
            self._job_ready(job, role)
        except Exception:
            log.exception("internal error on %s (%s)", job.describe(), role)
            self._fail(job, "internal", f"internal error on {self.hostname}; the job was killed")

    def _drain_socket(self) -> None:
        """Handle every message waiting on the socket (bounded per round)."""
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._received(frames)

    def _drain_link(self, link: BrokerLink) -> None:
        """Handle what a broker sent (bounded per round), as from the peer ``link.peer``."""
        for _ in range(1000):
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            link.received()
            self._received([link.peer] + frames)

    def _announcement(self) -> list:
        """The announcement a broker gets: who we are and what we offer."""
        return protocol.encode("ready", host=self.hostname, commands=self.allow.names(),
                               slots=self.config.slots, tags=list(self.config.tags))

    # --- messages ------------------------------------------------------------------------------

    def _received(self, frames: list[bytes]) -> None:
        """Decode one message from a peer and handle it; bad input gets an error reply."""
        peer, body = frames[0], frames[1:]
        self.peers[peer] = time.monotonic()
        try:
            msg = protocol.decode(body)
        except ProtocolError as exc:
            self._bad_input(peer, exc)
            return
        handler = getattr(self, "_on_" + msg.kind.replace("-", "_"), None)
        if handler is None:
            self._bad_input(peer, protocol.KindError(f"{msg.kind} is not for a daemon"))
            return
        try:
            handler(peer, msg)
        except Exception:  # a bug must cost one message, never the daemon and its jobs
            log.exception("internal error handling %s from %s", msg.kind, peer.hex())
            self.send(peer, protocol.encode("error", msg.job, kind="internal",
                                            text=f"internal error handling {msg.kind}"))

    def _bad_input(self, peer: bytes, exc: ProtocolError) -> None:
        """Reply with an error and log at most once a minute per peer."""
        self.send(peer, protocol.error_frames(exc))
        now = time.monotonic()
        if now - self._bad_logged.get(peer, -1e9) > 60:
            self._bad_logged[peer] = now
            log.warning("bad message from peer %s: %s (further ones logged at debug level)",
                        peer.hex(), exc)
        else:
            log.debug("bad message from peer %s: %s", peer.hex(), exc)

    def _on_hello(self, peer: bytes, msg: Message) -> None:
        """Tell the client who we are and what we offer."""
        self.send(peer, protocol.encode(
            "welcome", host=self.hostname, commands=self.allow.names(), slots=self.config.slots,
            tags=list(self.config.tags), busy=self.sched.busy, queued=len(self.sched.queue)))

    def _on_ping(self, peer: bytes, msg: Message) -> None:
        """A heartbeat: jobs the client believes live but we do not know get an error."""
        for job_id in msg.get("jobs", []):
            if (peer, job_id) not in self.jobs:
                self._job_error(peer, job_id, "unknown-job",
                                f"{self.hostname} has no job {job_id} (daemon restarted?)")

    def _on_error(self, peer: bytes, msg: Message) -> None:
        """A broker that does not know us asks us to announce ourselves again."""
        link = self.links.get(peer)
        if link is not None and msg["kind"] == "reannounce":
            link.send(self._announcement())
        elif link is not None:
            log.warning("broker %s: %s: %s", link.endpoint, msg["kind"], msg["text"])

    def _on_status(self, peer: bytes, msg: Message) -> None:
        """Report slots, queue and recent jobs."""
        self.send(peer, protocol.encode(
            "status-reply", host=self.hostname, slots=self.config.slots, busy=self.sched.busy,
            queued=len(self.sched.queue), commands=self.allow.names(),
            tags=list(self.config.tags), jobs=self.recent[-50:], done=self.done,
            failed=self.failed))

    def _on_submit(self, peer: bytes, msg: Message) -> None:
        """A new job: check it, then start or queue it."""
        key = (peer, msg.job)
        if key in self.jobs:
            self._job_error(peer, msg.job, "duplicate", f"job {msg.job} is already known")
            return
        try:
            path = self._check(msg)
        except policy.Refused as exc:
            log.info("refused job %s from %s: %s", msg.job, peer.hex(), exc)
            self.failed += 1
            self._job_error(peer, msg.job, exc.kind, str(exc))
            return
        job = Job(peer, msg.job, msg, path=path, credit=min(msg["window"], MAX_CREDIT))
        self.jobs[key] = job
        data = msg.get("data") or {}
        if data.get("mode") == "stage":
            self._begin_staging(job, data)
        else:
            self._act(self.sched.submit(key))

    def _begin_staging(self, job: Job, data: dict) -> None:
        """-n: a scratch directory of the caller's; the input files come first."""
        spec = job.spec
        try:
            job.scratch = _scratch(self.config.scratch_dir, spec["uid"], spec["gid"])
        except OSError as exc:
            self._fail(job, "stage", f"cannot make a scratch directory: {exc.strerror}")
            return
        job.inbox = staging.Inbox(job.scratch, (spec["uid"], spec["gid"]))
        job.stage_left = int(data.get("bytes", 0))
        self.send(job.peer, protocol.encode("credit", job.id, n=protocol.WINDOW))
        self._staged_maybe(job)

    def _on_file(self, peer: bytes, msg: Message) -> None:
        """-n: a chunk of an input file, written into the job's scratch directory."""
        job = self._job(peer, msg)
        if job is None:
            return
        if job.inbox is None or job.state != JobState.NEW or len(msg.payload) > job.stage_left:
            self._fail(job, "stage", "file data the job did not announce")
            return
        job.inbox.write(msg["name"], msg["mode"], msg["last"], msg.payload)
        job.stage_left -= len(msg.payload)
        job.owed += len(msg.payload)
        if job.owed >= protocol.CREDIT_BATCH:
            self.send(job.peer, protocol.encode("credit", job.id, n=job.owed))
            job.owed = 0
        self._staged_maybe(job)

    def _staged_maybe(self, job: Job) -> None:
        """Once every input byte is in, note what is there and queue the job."""
        if job.stage_left == 0 and not job.inbox.open and job.before is None:
            job.owed = 0
            job.before = staging.snapshot(job.scratch)
            self._act(self.sched.submit(job.key))

    def _check(self, msg: Message) -> str:
        """Apply the host's policy to a submit; the command's path, or Refused."""
        path = self.allow.resolve(msg["argv"][0])
        policy.check_identity(msg["uid"], msg["gid"], self.config.allow_root, os.getuid())
        if mountinfo.resolves_into_offloadfs(path):
            raise policy.Refused("loop", f"{path} lies in an offloadfs mount on {self.hostname}; "
                                         f"running it would offload again")
        return path

    def _on_stdin(self, peer: bytes, msg: Message) -> None:
        """Stdin data for a running job."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.feed(msg.payload)
            self._credit_back(job, job.process.write_pending())

    def _on_stdin_eof(self, peer: bytes, msg: Message) -> None:
        """The client's stdin ended."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.end_input()

    def _on_credit(self, peer: bytes, msg: Message) -> None:
        """The client consumed output: it may receive more."""
        job = self._job(peer, msg)
        if job:
            job.credit = min(job.credit + msg["n"], MAX_CREDIT)
            self._maybe_finish(job)

    def _on_close(self, peer: bytes, msg: Message) -> None:
        """The client's reader of a stream went away: the job gets SIGPIPE as it would locally."""
        job = self._job(peer, msg)
        if job and job.process:
            job.process.close(msg["stream"])
            self._maybe_finish(job)

    def _on_signal(self, peer: bytes, msg: Message) -> None:
        """Forward a signal to the job's process group."""
        job = self._job(peer, msg)
        if job and job.process:
            log.info("%s: signal %d from client", job.describe(), msg["signum"])
            job.process.signal(msg["signum"])

    def _on_cancel(self, peer: bytes, msg: Message) -> None:
        """The client gave up: kill the job quietly."""
        job = self._job(peer, msg)
        if job:
            self._drop(job, "cancelled by client")

    def _job(self, peer: bytes, msg: Message) -> Job | None:
        """The job a message names, or None after telling the client it is unknown."""
        job = self.jobs.get((peer, msg.job))
        if job is None:
            self._job_error(peer, msg.job, "unknown-job", f"{self.hostname} has no job {msg.job}")
        return job

    # --- jobs ----------------------------------------------------------------------------------

    def _act(self, actions: list) -> None:
        """Carry out the scheduler's actions."""
        for action in actions:
            job = self.jobs.get(action.job)
            if job is None:
                continue
            if isinstance(action, Start):
                job.slot = action.slot
                self._start(job)
            elif isinstance(action, Position):
                job.state = advance(job.state, "queued")
                self.send(job.peer, protocol.encode("queued", job.id, position=action.position))

    def _start(self, job: Job) -> None:
        """Attach the job's data (maybe later, when its mount is made), then spawn it."""
        job.attaching = time.monotonic()
        job.timings["queue"] = job.attaching - job.received
        data = job.spec.get("data") or {}
        if data.get("mode") == "nfs":
            self.mounts.attach(data["server"], data["export"],
                               lambda result: self._attached(job, data, result))
        elif job.scratch:
            self._spawn(job, lambda: job.scratch)
        else:
            self._spawn(job, lambda: self._shared_cwd(job.spec))

    def _attached(self, job: Job, data: dict, result) -> None:
        """The job's export is mounted (``result`` is its path) or could not be."""
        if job.key not in self.jobs:
            if not isinstance(result, Exception):
                self.mounts.release(data["server"], data["export"])
            return
        if isinstance(result, Exception):
            self._fail(job, "attach", str(result))
            return
        job.mounted = (data["server"], data["export"])
        self._spawn(job, lambda: self._nfs_cwd(result, data))

    def _spawn(self, job: Job, where) -> None:
        """Spawn the job's process in its slot in the directory ``where()`` gives, or fail
        the job with a clear error."""
        spec = job.spec
        try:
            cwd = where()
            job.timings["attach"] = time.monotonic() - job.attaching
            job.process = Process(job.path, spec["argv"], cwd, self._env(spec, job.slot),
                                  self._ids(spec))
        except (SpawnError, policy.Refused) as exc:
            self._fail(job, getattr(exc, "kind", "spawn"), str(exc))
            return
        job.state = advance(job.state, "started")
        log.info("%s started, pid %d, slot %d", job.describe(), job.process.pid, job.slot)
        self.send(job.peer, protocol.encode("started", job.id, host=self.hostname,
                                            pid=job.process.pid, window=protocol.WINDOW))

    def _shared_cwd(self, spec: Message) -> str:
        """The job's working directory in shared mode: the same path, or its path_map twin."""
        cwd = policy.map_path(os.fsdecode(spec["cwd"]), self.config.path_map)
        if not os.path.isdir(cwd):
            raise policy.Refused("cwd", f"{cwd}: no such directory on {self.hostname}")
        return cwd

    def _nfs_cwd(self, mnt: str, data: dict) -> str:
        """The job's working directory in its mounted export, after checking that the mount
        is the caller's tree (the nonce file the VM wrote is there) and the cwd stays in it."""
        nonce = str(data.get("nonce", ""))
        if not nonce or "/" in nonce or not os.path.exists(os.path.join(mnt, ".offloadfs", nonce)):
            raise policy.Refused("attach", f"{data['server']}:{data['export']} mounted on "
                                           f"{self.hostname} is not the caller's tree (no nonce)")
        cwd = policy.below(mnt, str(data.get("path", "")))
        real = os.path.realpath(cwd)
        if real != mnt and not real.startswith(mnt + "/"):
            raise policy.Refused("cwd", f"{data.get('path')!r} leaves the export (symlink)")
        if not os.path.isdir(cwd):
            raise policy.Refused("cwd", f"{data.get('path')!r}: no such directory in the export")
        return cwd

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

    def _job_ready(self, job: Job, role: str) -> None:
        """One of the job's fds is ready."""
        proc = job.process
        if role in protocol.STREAMS and proc.is_open(role):
            self._pump_output(job, role)
        elif role == "stdin":
            self._credit_back(job, proc.write_pending())
        elif role == "pid" and proc.reap():
            job.timings["run"] = proc.ended - proc.started
            job.state = advance(job.state, "exited")
        self._maybe_finish(job)

    def _pump_output(self, job: Job, name: str) -> None:
        """Send what the job wrote on ``name``, within the client's credit."""
        data = job.process.read(name, min(protocol.CHUNK, job.credit))
        if data:
            job.credit -= len(data)
            self.send(job.peer, protocol.encode(name, job.id, data))

    def _credit_back(self, job: Job, n: int) -> None:
        """Give the client back stdin credit for bytes written to the job, in batches."""
        job.owed += n
        if job.owed >= protocol.CREDIT_BATCH or (job.owed and not job.process.pending):
            self.send(job.peer, protocol.encode("credit", job.id, n=job.owed))
            job.owed = 0

    def _maybe_finish(self, job: Job) -> None:
        """When the process is reaped and its output drained (and, staging, its files sent
        back), send the exit status."""
        proc = job.process
        if proc is None or not proc.finished or job.key not in self.jobs:
            return
        if job.scratch and not self._return_files(job):
            return
        job.timings["drain"] = time.monotonic() - proc.ended
        self.send(job.peer, protocol.encode(
            "exit", job.id, status=proc.status, signal=proc.term_signal, rusage=proc.rusage,
            timings=job.timings))
        log.info("%s exited %d in %.3fs", job.describe(), proc.status, job.timings["run"])
        self._forget(job, proc.status)

    def _return_files(self, job: Job) -> bool:
        """-n: send the files the job created or changed, within credit; True when done."""
        if job.outbox is None:
            names = staging.changed(job.scratch, job.before or {}, job.spec["uid"])
            job.outbox = staging.Outbox(job.scratch, names)
        while job.credit > 0:
            chunk = job.outbox.next_chunk(job.credit)
            if chunk is None:
                return True
            name, mode, last, data = chunk
            self.send(job.peer, protocol.encode("file", job.id, data, name=name, mode=mode,
                                                last=last))
            job.credit -= len(data)
        return False

    def _fail(self, job: Job, kind: str, text: str) -> None:
        """End a job with an error the client reports as exit 255."""
        log.info("%s failed: %s", job.describe(), text)
        self._job_error(job.peer, job.id, kind, text)
        self._forget(job, None)

    def _drop(self, job: Job, why: str) -> None:
        """Kill a job whose client is gone or gave up."""
        log.info("%s killed: %s", job.describe(), why)
        self._forget(job, None)

    def _forget(self, job: Job, status: int | None) -> None:
        """Remove a job (once), kill what is left of it, free its slot and mount, count it."""
        if self.jobs.pop(job.key, None) is None:
            return
        if job.process:
            job.process.kill()
        if job.mounted:
            self.mounts.release(*job.mounted)
        if job.outbox is not None:
            job.outbox.close()
        if job.inbox is not None:
            job.inbox.discard()
        if job.scratch:
            shutil.rmtree(job.scratch, ignore_errors=True)
        if status is None:
            self.failed += 1
        else:
            self.done += 1
        self.metrics.job_ended(os.path.basename(os.fsdecode(job.spec["argv"][0])),
                               "failed" if status is None else "done", job.timings)
        self.recent = (self.recent + [_summary(job, status)])[-100:]
        self._act(self.sched.cancel(job.key))

    def _job_error(self, peer: bytes, job_id: str, kind: str, text: str) -> None:
        """Send an ``error`` about one job."""
        self.send(peer, protocol.encode("error", job_id, kind=kind, text=text))

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
            self.sock.send_multipart([peer] + frames, zmq.NOBLOCK)
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
                self._peer_gone(peer, "client silent for %.0fs" % self.config.client_timeout)
            else:
                self.send(peer, protocol.encode("ping", jobs=ids))
        self.peers = {p: t for p, t in self.peers.items() if now - t < 600}

    def _peer_gone(self, peer: bytes, why: str) -> None:
        """Kill every job of a vanished client."""
        for job in [j for j in self.jobs.values() if j.peer == peer]:
            self._drop(job, why)

    def _shutdown(self) -> None:
        """Kill every job, tell each client, close the socket."""
        for job in list(self.jobs.values()):
            if job.process:
                job.process.kill()
            self._job_error(job.peer, job.id, "shutdown",
                            f"offloadd on {self.hostname} stopped; the job was killed")
            self.jobs.pop(job.key, None)
        self.mounts.close()
        self.metrics.close()
        for link in self.links.values():
            link.close()
        if self.sock is not None:
            self.sock.close(linger=1000)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_ctx:
            self.ctx.term()
        log.info("stopped")


def _summary(job: Job, status: int | None) -> dict:
    """A job as ``status`` reports it."""
    return {"job": job.id, "command": os.fsdecode(job.spec["argv"][0])[:255],
            "status": -1 if status is None else status, "uid": job.spec["uid"],
            **{k: round(v, 6) for k, v in job.timings.items()}}


def _scratch(parent: str, uid: int, gid: int) -> str:
    """A fresh 0700 directory for a staged job, owned by its caller."""
    os.makedirs(parent, mode=0o711, exist_ok=True)
    path = tempfile.mkdtemp(prefix="job-", dir=parent)
    os.chown(path, uid, gid)
    return path


def _wildcard_port(endpoint: str) -> str:
    """tcp://ADDR:0 means any free port, which ZeroMQ spells tcp://ADDR:*."""
    return endpoint[:-2] + ":*" if endpoint.startswith("tcp://") and endpoint.endswith(":0") else endpoint


def _drain_pipe(fd: int) -> None:
    """Empty the wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
