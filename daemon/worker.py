"""A host's connection to a broker (``offloadd serve --connect``): the Paranoid Pirate worker.

The server's loop thread owns every :class:`BrokerLink`: it polls ``sock``, feeds what arrives
to the server as if from a peer named ``peer``, sends the server's replies for that peer, and
calls :meth:`tick` each heartbeat. A broker silent for ``liveness`` seconds is presumed gone:
the link reconnects with a fresh socket (backoff doubling up to 32 s) and announces itself
again; the broker keeps no state that a reconnect loses.
"""
from __future__ import annotations

import logging
import time

import zmq

from offloadfs import protocol

log = logging.getLogger("offloadd")

BACKOFF_MAX = 32.0


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

    def _socket(self) -> zmq.Socket:
        """A fresh DEALER connected to the broker."""
        sock = self.ctx.socket(zmq.DEALER)
        if self.keys is not None:
            self.keys.apply(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER + 4096)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list) -> None:
        """Send one message to the broker."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)

    def received(self) -> None:
        """Something came from the broker: it is alive."""
        self.heard = time.monotonic()
        self.backoff = 1.0

    def tick(self, now: float, ready: list, jobs: list[str]) -> bool:
        """Heartbeat, or reconnect when the broker is silent; True if the link was remade
        (the caller then drops the jobs it had from this broker)."""
        if now - self.heard <= self.liveness:
            self.send(protocol.encode("ping", jobs=jobs))
            return False
        if now < self.retry_at:
            return False
        log.warning("broker %s silent for %.0fs; reconnecting (next try in %.0fs)",
                    self.endpoint, now - self.heard, self.backoff)
        self.sock.close(linger=0)
        self.sock = self._socket()
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.send(ready)
        return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)
