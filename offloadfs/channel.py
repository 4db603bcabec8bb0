"""A client's connection to one daemon or broker: a DEALER socket, the hello, heartbeats.

A :class:`Channel` belongs to one thread, the client loop's (``offld``'s main thread, or the
mount's agent thread). It keeps a fixed routing id, so a reconnect after a network blip is the
same peer to the daemon and the jobs survive it.
"""
from __future__ import annotations

import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol
from .protocol import Message, ProtocolError

# The connection events hello() watches: each one means no welcome will ever come.
FAILURES = (zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
MECHANISM_MISMATCH = 0x11000002     # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
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


class Channel:
    """One DEALER socket to ``endpoint``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys=None):
        """Connect, with CURVE if ``keys`` (a keys.Keychain or keys.ClientKeys) are given
        (ZeroMQ connects in the background; :meth:`hello` proves the peer is there)."""
        self.endpoint = endpoint
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
        monitor = self.sock.get_monitor_socket(FAILURES)
        try:
            self.send(frames)
            msg = self.wait(timeout, {reply, "error"}, monitor)
        finally:
            self.sock.disable_monitor()
            monitor.close(linger=0)
        if msg is None:
            raise OffloadError(f"no answer from {self.endpoint} within {timeout:g}s", "no-host")
        if msg.kind == "refused":
            raise OffloadError(f"{self.endpoint}: {msg['text']}", msg["why"])
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
                return self.failure(recv_monitor_message(monitor))
            msg = self.recv() if self.sock in ready else None
            if msg is not None and msg.kind in kinds:
                return msg
        return None

    def failure(self, event: dict) -> Message:
        """What a connection event means for the user, as a ``refused`` message."""
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_CONNECT_RETRIED:
            why, text = "no-host", "connection refused"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why, text = "unauthorized", ("this VM's key is not authorized there (its public key "
                                         "must be in the host's authorized_keys)")
        elif self.keys is None:
            why, text = "unauthorized", ("the host requires CURVE keys: set [security] "
                                         "secret_key and server_key")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == MECHANISM_MISMATCH:
            why, text = "handshake", "the host uses no keys, but [security] sets keys here"
        else:
            why, text = "handshake", ("the secure handshake failed: [security] server_key is "
                                      "not the host's public key, or the host uses no keys")
        return Message("refused", fields={"why": why, "text": text})

    def close(self, linger: int | None = None) -> None:
        """Close the socket (pending messages get LINGER ms, or ``linger``, to leave)."""
        self.sock.close(linger)
