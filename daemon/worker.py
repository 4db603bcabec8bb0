"""A host's connection to a broker (``offloadd serve --connect``): the Paranoid Pirate worker.

The server's loop thread owns every :class:`BrokerLink`: it polls ``sock``, feeds what arrives
to the server as if from a peer named ``peer``, sends the server's replies for that peer, and
calls :meth:`tick` each heartbeat. A broker silent for ``liveness`` seconds is presumed gone:
the link reconnects with a fresh socket (backoff doubling up to 32 s) and announces itself
again; the broker keeps no state that a reconnect loses.

Either way the jobs this broker gave us are nobody's any more: ``tick`` returns True and the
server kills them (``_peer_gone``). The same holds when a broker that answers no longer knows
us (``error`` of kind ``reannounce``: a new broker on the same port, or one that took us for
dead and failed our jobs on their clients): the link looks at what it receives (its socket
shows it each message), holds back the announcement the server sends in reply, and at the
next ``tick`` announces itself and returns True, so the old jobs die before the broker can
dispatch new ones (an announcement sent at once could bring new jobs that the kill would then
take too). A ``reannounce`` that answers what we sent before our last announcement reached
the broker (we have heard nothing else from it since, and it is recent) is stale: ignored.
"""
from __future__ import annotations

import logging
import time

import zmq

from offloadfs import protocol

log = logging.getLogger("offloadd")

BACKOFF_MAX = 32.0


class _LinkSocket(zmq.Socket):
    """A link's DEALER: it shows its link every message it receives."""

    link: BrokerLink | None = None

    def recv_multipart(self, *args, **kwargs):
        """Receive one message, as zmq.Socket does, and let the link look at it."""
        frames = super().recv_multipart(*args, **kwargs)
        if self.link is not None:
            self.link._saw(frames)
        return frames


def _kind(frames: list, hint: bytes) -> str | None:
    """The kind of a one-frame message whose header holds ``hint`` (a cheap test first),
    else None."""
    if len(frames) != 1:
        return None
    head = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
    if hint not in head:
        return None
    try:
        msg = protocol.decode([head])
    except protocol.ProtocolError:
        return None
    return msg.kind if msg.kind != "error" else "error " + msg["kind"]


class BrokerLink:
    """One DEALER socket to one broker's worker port."""

    def __init__(self, ctx: zmq.Context, endpoint: str, liveness: float, keys=None):
        """Connect (CURVE with ``keys``, a keys.ClientKeys, if given)."""
        self.ctx, self.endpoint, self.liveness, self.keys = ctx, endpoint, liveness, keys
        self.peer = b"broker:" + endpoint.encode()
        self.backoff = 1.0
        self.sock = self._socket()
        self.heard = time.monotonic()
        self.retry_at = 0.0
        self.announced = self.heard   # when our last announcement went (the server's first)
        self.confirmed = False        # the broker said something else than reannounce since
        self.forgotten = False        # the broker no longer knows us: tick() acts on it
        self._hold = False            # the next announcement the server sends waits for tick

    def _socket(self) -> zmq.Socket:
        """A fresh DEALER connected to the broker."""
        sock = self.ctx.socket(zmq.DEALER, socket_class=_LinkSocket)
        sock.link = self
        if self.keys is not None:
            self.keys.apply(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER + 4096)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list) -> None:
        """Send one message to the broker; the announcement that answers a ``reannounce`` is
        held back (see the module docstring)."""
        if self._hold and _kind(frames, b"ready") == "ready":
            self._hold = False
            return
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames) == 1)

    def _saw(self, frames: list) -> None:
        """A message from the broker: does it still know us?"""
        if _kind(frames, b"reannounce") != "error reannounce":
            self.confirmed = True
            return
        self._hold = True
        stale = not self.confirmed and time.monotonic() - self.announced < self.liveness
        if not (stale or self.forgotten):
            self.forgotten = True

    def _announce(self, now: float, ready: list) -> None:
        """Send our announcement (``ready``) now."""
        self.sock.send_multipart(ready, zmq.NOBLOCK)
        self.announced, self.confirmed = now, False

    def received(self) -> None:
        """Something came from the broker: it is alive."""
        self.heard = time.monotonic()
        self.backoff = 1.0

    def tick(self, now: float, ready: list, jobs: list[str]) -> bool:
        """Heartbeat, or reconnect when the broker is silent, or announce ourselves to a
        broker that no longer knows us; True if the broker's jobs here are lost (the caller
        then drops the jobs it had from this broker)."""
        if self.forgotten:
            self.forgotten = False
            log.warning("broker %s no longer knows this host (a new broker, or it took us for "
                        "dead): killing the jobs it gave us, announcing again", self.endpoint)
            self._announce(now, ready)
            return True
        if now - self.heard <= self.liveness:
            self.send(protocol.encode("ping", jobs=jobs))
            return False
        if now < self.retry_at:
            return False
        log.warning("broker %s silent for %.0fs; reconnecting (next try in %.0fs)",
                    self.endpoint, now - self.heard, self.backoff)
        self.close()
        self.sock = self._socket()
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self._hold = self.forgotten = False   # news of the old socket's broker
        self._announce(now, ready)
        return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.link = None
        self.sock.close(linger=0)
