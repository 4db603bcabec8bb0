"""The ROUTER-socket plumbing that the daemon's loop (``server``) and the broker's share.

Both loops own one thread each and call everything here from it, but for :meth:`Wakeup.stop`
and :meth:`Wakeup.poke`, which any thread or a signal handler may call. Nothing here knows a
job: :func:`bind` makes a socket, :func:`recv_routed` reads one message from it,
:class:`PeerGate` holds the rate limits on what a peer's input may cost us (error replies,
answers, log lines: ``limits``), :class:`Positions` holds queue positions back for the next
heartbeat, :class:`Wakeup` is the self-pipe that wakes a poll, and :func:`say_security` the
banner on keys.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from offloadfs import protocol
from offloadfs.logsetup import printable
from offloadfs.protocol import ProtocolError

from . import limits
from .config import is_loopback

log = logging.getLogger("offloadd")

Send = Callable[[bytes, list], Any]   # (peer, frames): how a loop sends to a peer

# Socket options of a bound ROUTER (both loops' values are those they have had from the start).
# SNDHWM 0, both: ZeroMQ queues our sends to a peer without bound rather than drop them (a
# ROUTER drops at the mark); the stream data is bounded by the client's credit, and the rest
# (error replies, answers) by the rate limits of PeerGate (docs/decisions.md, "Wire and
# liveness").
# RCVHWM: how many messages ZeroMQ queues from one peer before it reads no more from it (TCP
# then pushes back). The broker keeps ZeroMQ's default (1000): it only relays, and what it
# relays is bounded by credit end to end. The daemon takes 10000 (DAEMON_RCVHWM), so that a
# burst from one client (stdin chunks, staged files, signals) waits in the queue instead of
# stalling the client's socket.
# LINGER: how long close() still tries to deliver what is queued. The daemon gives its last
# words (each job's "offloadd stopped" error) 1000 ms (DAEMON_LINGER), the broker 500 ms.
RCVHWM = 1000
DAEMON_RCVHWM = 10000
LINGER = 500
DAEMON_LINGER = 1000


def bind(ctx: zmq.Context, endpoint: str, keys, domain: str, *, rcvhwm: int = RCVHWM,
         linger: int = LINGER) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to ``endpoint`` (port 0: any free port), CURVE with ``keys``, whose
    peers' keys the ZAP ``domain`` checks; the socket and the endpoint it got."""
    sock = ctx.socket(zmq.ROUTER)
    if keys:
        keys.apply(sock, domain)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER + 4096)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.LINGER, linger)
    sock.bind(wildcard_port(endpoint))
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def recv_routed(sock: zmq.Socket, keyed: bool) -> tuple[list, str | None]:
    """One message waiting on a ROUTER (else zmq.Again): the peer's id as bytes, then its
    frames uncopied (a stream chunk is read where ZeroMQ put it), and with CURVE (``keyed``)
    the sender's key, which the ZAP handler put on each frame."""
    part = sock.recv(zmq.NOBLOCK, copy=False)
    frames = [part.bytes]
    while part.more:   # recv_multipart asks the socket (RCVMORE) instead, a tenth of a job
        part = sock.recv(zmq.NOBLOCK, copy=False)
        frames.append(part)
    key = frames[1].get("User-Id") if keyed and len(frames) > 1 else None
    return frames, key


def sender(name: str | None, key: str | None, uid, where: str) -> str:
    """A submit's sender for a log line: its CURVE key's ``name`` (``key``: the key itself, if
    any), the uid it claims, and ``where`` it came from."""
    vm = f"VM {name}" if name else ("an unauthorized key" if key else "a client without a key")
    return f"{vm}, uid {uid}, {where}"


def address_of(frame) -> str:
    """Where a message came from, for a log line: its first frame's Peer-Address."""
    address = frame.get("Peer-Address") if isinstance(frame, zmq.Frame) else None
    return f"at {address or 'an unknown address'}"


def wildcard_port(endpoint: str) -> str:
    """tcp://ADDR:0 means any free port, which ZeroMQ spells tcp://ADDR:*."""
    wild = endpoint.startswith("tcp://") and endpoint.endswith(":0")
    return endpoint[:-2] + ":*" if wild else endpoint


def drain_pipe(fd: int) -> None:
    """Empty the wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def say_security(curve: tuple | None, endpoints: list[str], exposed: str) -> None:
    """Log whether peers must hold a key: ``curve`` (a log line and its arguments) with keys;
    without, warn (``exposed``, given the endpoints) when anyone may reach an endpoint."""
    if curve is not None:
        log.info(*curve)
    elif any(not is_loopback(e) for e in endpoints):
        log.warning(exposed, *endpoints)
    elif endpoints:
        log.info("no keys ([security] secret_key): listening on loopback only")


class Wakeup:
    """The self-pipe that wakes a loop's poll: the loop polls ``r`` and calls :meth:`drain`
    and :meth:`close` (its thread); :meth:`stop` and :meth:`poke` are safe from any thread and
    from a signal handler; the loop runs while ``stopping`` is false."""

    def __init__(self):
        """A fresh non-blocking pipe; not stopping."""
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False

    def stop(self) -> None:
        """Ask the loop to end."""
        self.stopping = True
        self.poke()

    def poke(self) -> None:
        """Wake the loop."""
        try:
            os.write(self.w, b"x")
        except OSError:
            pass

    def drain(self) -> None:
        """Empty the pipe (the loop woke)."""
        drain_pipe(self.r)

    def close(self) -> None:
        """Close both ends."""
        os.close(self.r)
        os.close(self.w)


class PeerGate:
    """What a peer's input may cost a loop: error replies (``replies``), answers to hello and
    status (``answers``), log lines (``warnings``), each rate limited per peer (``limits``).
    The loop's thread calls everything; a limiter's drops count in ``on_drop``."""

    def __init__(self, on_drop: Callable[[], Any] | None = None):
        """Fresh limiters."""
        self.replies = limits.replies(on_drop)
        self.answers = limits.answers(on_drop)
        self.warnings = limits.warnings()

    def answer(self, peer: bytes) -> bool:
        """Whether an answer to hello or status may go to ``peer`` now."""
        return self.answers.allow(peer)

    def note(self, peer: bytes, level: int, text: str, *args, **kw) -> None:
        """Log a line about a peer's input at ``level`` if the log's rate limit lets it (once
        a minute per peer, ten a minute in all), else at debug level."""
        log.log(level if self.warnings.allow(peer) else logging.DEBUG, text, *args, **kw)

    def refused(self, peer: bytes, msg, who: str, why: str) -> None:
        """Log (a warning, within the rate limit) that the submit ``msg`` of ``who`` (see
        :func:`sender`) was refused, and ``why``; what the peer sent is shown printable."""
        self.note(peer, logging.WARNING, "refused job %s (%s) of %s: %s",
                  printable(msg.job), printable(os.fsdecode(msg["argv"][0]), 80), who,
                  printable(why, 400))

    def refuse(self, send: Send, peer: bytes, job_id: str | None, kind: str, text: str,
               started: bool | None = None, *, limited: bool = True) -> bool:
        """An error reply to input we do not act on (bad, refused, or about a job the peer
        does not have here); past the peer's rate limit (unless not ``limited``) it is dropped
        silently and counted. ``started`` (about a job): whether it may have run; None leaves
        it out (the client then assumes it may have). True if it went."""
        if limited and not self.replies.allow(peer):
            return False
        extra = {} if job_id is None or started is None else {"started": started}
        send(peer, protocol.encode("error", job_id, kind=kind, text=text[:protocol.MAX_TEXT],
                                   **extra))
        return True

    def bad_input(self, refuse: Callable[[str | None, str, str], Any], peer: bytes,
                  exc: ProtocolError) -> None:
        """Reply with an error through ``refuse(job_id, kind, text)`` and log sparingly."""
        refuse(None, exc.kind, str(exc))
        self.note(peer, logging.WARNING, "bad message from peer %s: %s (further ones logged "
                  "at debug level)", peer.hex(), exc)

    def internal_error(self, peer: bytes, kind: str) -> None:
        """Log (sparingly, with the traceback) a bug met handling a ``kind`` from ``peer``."""
        self.note(peer, logging.ERROR, "internal error handling %s from %s", kind, peer.hex(),
                  exc_info=True)


def refuse_unknown(ids: Iterable[str], known: Callable[[str], bool],
                   refuse: Callable[[str], bool]) -> None:
    """A ping's jobs that we do not know each get ``refuse(job_id)`` once, within the rate
    limit: the first dropped ends it (the peer's next ping names the rest again)."""
    for job_id in dict.fromkeys(ids):
        if not known(job_id) and not refuse(job_id):
            return


class Positions:
    """Queue positions held back for the next heartbeat: a job is told its position at once
    the first time, then at most once a heartbeat (telling every queued job each time one
    leaves the queue costs O(n^2) messages, which a client submitting and cancelling could
    make us send: at 64 waiting clients, 45% of the broker's time). The loop's thread calls
    :meth:`later` and, each heartbeat, :meth:`flush`."""

    def __init__(self):
        """Nothing held."""
        self.held: dict[tuple[bytes, str], int] = {}

    def later(self, key: tuple[bytes, str], position: int) -> None:
        """Tell the job ``key`` (its client, its id) ``position`` at the next flush."""
        self.held[key] = position

    def flush(self, send: Send, still_queued: Callable[[tuple[bytes, str]], bool]) -> None:
        """Send the latest position of each job held that is still queued."""
        held, self.held = self.held, {}
        for key, position in held.items():
            if still_queued(key):
                send(key[0], protocol.encode("queued", key[1], position=position))
