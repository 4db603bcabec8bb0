"""A client's connection to one daemon or broker: a DEALER socket, the hello, heartbeats.

A :class:`Channel` belongs to one thread, the client loop's (``offld``'s main thread, or the
mount's agent thread). It keeps a fixed routing id, so a reconnect after a network blip is the
same peer to the daemon and the jobs survive it.
"""
from __future__ import annotations

import os
import struct
import time

import zmq

from . import protocol, reach
from .protocol import Message, ProtocolError

# The connection events hello() watches: each one means no welcome will ever come...
FAILURES = (zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
PROGRESS = {zmq.EVENT_CONNECTED: "connected",   # ...and these say how far it got
            zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake"}
PROBE_TIMEOUT = 2.0   # seconds for the one plain connection that learns why ZeroMQ's failed
RCVHWM = 16   # messages ZeroMQ queues for us; then it reads no more and TCP pushes back


class OffloadError(Exception):
    """An error of the offload itself (no host, refused, protocol, lost contact): exit 255."""

    def __init__(self, text: str, kind: str = "offload", started: bool = False):
        """``started`` tells whether a job may have run (then it must never be retried)."""
        super().__init__(text)
        self.kind = kind
        self.started = started

    def __str__(self) -> str:
        """The text, saying whether the job may have run (every exit 255 tells the user)."""
        text = super().__str__()
        if any(words in text for words in SAYS_WHETHER):
            return text
        return text + ("; the job may have run, its outcome is unknown" if self.started
                       else "; the job never ran")


SAYS_WHETHER = ("never ran", "may have run", "was killed", "had ended", "did not run")


def recv_monitor_event(monitor: zmq.Socket, flags: int = 0) -> dict:
    """One event from a ``get_monitor_socket`` PAIR: ``{"event", "value", "endpoint"}``.

    The parsing of pyzmq's ``zmq.utils.monitor.recv_monitor_message``, which we do not import:
    that module imports ``zmq.asyncio``, hence asyncio, ssl and concurrent.futures, a third of
    ``offld``'s start-up. The first frame is a uint16 event and a uint32 value, native order
    and no padding; the second is the endpoint."""
    frames = monitor.recv_multipart(flags)
    if len(frames) != 2 or len(frames[0]) != 6:
        raise RuntimeError(f"Invalid event message format: {frames}")
    event, value = struct.unpack("=hi", frames[0])
    return {"event": zmq.Event(event), "value": zmq.Event(value), "endpoint": frames[1]}


class Channel:
    """One DEALER socket to ``endpoint``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys=None, origin: str = ""):
        """Connect, with CURVE if ``keys`` (a keys.Keychain or keys.ClientKeys) are given
        (ZeroMQ connects in the background; :meth:`hello` proves the peer is there);
        ``origin`` says where the endpoint came from, for errors (``reach.origin``)."""
        self.endpoint = endpoint
        self.origin = origin
        self.stage = ""   # how far the connection got while a request waited (PROGRESS)
        self.keys = None if keys is None else keys.for_endpoint(endpoint)
        self.sock = ctx.socket(zmq.DEALER)
        if self.keys is not None:
            self.keys.apply(self.sock)
        self.sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(11))
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER + 4096)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sock.connect(endpoint)
        self.heard = 0.0
        self.stalled = False
        self.welcome: Message | None = None

    @property
    def host(self) -> str:
        """The peer's host name once welcomed, else the endpoint."""
        return self.welcome["host"] if self.welcome else self.endpoint

    def send(self, frames: list) -> bool:
        """Send one message's frames without ever blocking; False if ZeroMQ has no connection
        to queue it on (a connection it dropped and did not make again: see ``stalled``)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames) == 1)
        except zmq.Again:
            self.stalled = True
            return False
        return True

    def recv(self) -> Message | None:
        """One decoded message if one is waiting, else None; bad input raises OffloadError."""
        if not self.sock.get(zmq.EVENTS) & zmq.POLLIN:   # cheaper than a zmq.Again raised
            return None
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)   # payloads as views
        except zmq.Again:
            return None
        self.heard = time.monotonic()
        try:
            return protocol.decode(frames)
        except ProtocolError as exc:
            raise OffloadError(f"{self.host} sent a bad message: {exc}", "protocol") from None

    def hello(self, timeout: float) -> Message:
        """Say hello and wait up to ``timeout`` s for the welcome, or raise OffloadError."""
        self.welcome = self.ask(protocol.encode("hello"), "welcome", timeout)
        return self.welcome

    def ask(self, frames: list, reply: str, timeout: float) -> Message:
        """Send a request and wait up to ``timeout`` s for its ``reply``, or raise
        OffloadError. A refused connection or a failed CURVE handshake fails at once instead
        of waiting out the timeout."""
        monitor = self.sock.get_monitor_socket(FAILURES | sum(PROGRESS))
        try:
            self.send(frames)
            msg = self.wait(timeout, {reply, "error"}, monitor)
        finally:
            self.sock.disable_monitor()
            monitor.close(linger=0)
        if msg is None:
            msg = Message("refused", fields={"why": "no-host",
                                             "text": reach.silent(timeout, self.stage)})
        if msg.kind == "refused":
            raise OffloadError(f"{reach.named(self.endpoint, self.origin)}: {msg['text']}",
                               msg["why"])
        if msg.kind == "error":
            raise OffloadError(f"{self.endpoint}: {msg['text']}", msg["kind"])
        return msg

    def wait(self, timeout: float, kinds: set[str], monitor: zmq.Socket | None = None):
        """The next message of one of ``kinds`` within ``timeout`` s (others are dropped);
        None on timeout; a ``refused`` message if ``monitor`` reports a failure first."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(left * 1000))
            if monitor in ready:
                event = recv_monitor_event(monitor)
                self.stage = PROGRESS.get(event["event"], self.stage)
                refused = None if event["event"] in PROGRESS else self.failure(event, left)
                if refused is not None:
                    return refused
            msg = self.recv() if self.sock in ready else None
            if msg is not None and msg.kind in kinds:
                return msg
        return None

    def failure(self, event: dict, left: float = 0.0) -> Message | None:
        """What a connection event means for the user, as a ``refused`` message. With
        ``left`` s to spare (a caller that may block: offld, status), one plain connection
        learns why; without (the agent), one that cannot block. None if a failed connection
        works when tried again."""
        kind, value = event["event"], event["value"]
        probing = min(left, PROBE_TIMEOUT)
        if kind == zmq.EVENT_CONNECT_RETRIED:
            seen = reach.probe(self.endpoint, probing) if probing > 0 else \
                reach.probe_now(self.endpoint)
            if seen is None:
                return None
            why, text = "no-host", reach.unreachable(self.endpoint, seen)
        else:
            quick = kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and probing > 0
            peer = reach.greeting(self.endpoint, probing) if quick else None
            why, text = reach.handshake(kind, value, self.keys is not None, peer)
        return Message("refused", fields={"why": why, "text": text})

    def close(self, linger: int | None = None) -> None:
        """Close the socket (pending messages get LINGER ms, or ``linger``, to leave)."""
        self.sock.close(linger)
