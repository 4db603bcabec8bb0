"""What one peer's messages may cost the daemon or the broker: plain rules, no I/O.

Both loops answer bad input with an ``error``, but their ROUTER sockets queue replies without
bound for a peer that never reads (SNDHWM is 0, for the stream data that credit bounds), and
they log. :class:`PeerLimiter` is a token bucket per peer, with an optional bucket shared by
all peers on top, that says whether such a reply (or log line) may go; the rest are dropped
and counted. :class:`Budget` counts the jobs a peer holds and what their specs cost in memory,
so that no peer, and not all peers together, can make a loop keep more than its limits.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable
from typing import Any

from offloadfs import protocol

# The numbers (docs/decisions.md, "Wire and liveness").
REPLY_RATE, REPLY_BURST = 10.0, 50                 # replies to one peer: per second, at once
REPLY_TOTAL_RATE, REPLY_TOTAL_BURST = 200.0, 400   # error replies to all peers together
WARN_RATE, WARN_TOTAL_RATE, WARN_TOTAL_BURST = 1 / 60, 10 / 60, 10   # log lines on bad input
MAX_PEERS = 4096                                   # peers remembered by a limiter or a table
PEER_JOBS, PEER_BYTES = 256, 64 * 2**20            # one client's live jobs, their specs' memory
TOTAL_JOBS, TOTAL_BYTES = 4096, 256 * 2**20        # all clients' together
STDIN_SLACK = 64            # memory a queued stdin chunk takes beyond its bytes
STAGE_OPEN = 8              # staged input files open at once per job (a client sends one)
MAX_STAGE_BYTES = protocol.MAX_STAGE_BYTES   # a staged job's announced input


class _Bucket:
    """``burst`` tokens at most, refilled at ``rate`` per second."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        """A full bucket."""
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def refill(self, now: float) -> float:
        """Add the tokens earned since the last call; the tokens there are now."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens


class PeerLimiter:
    """Allows ``burst`` events per peer at once and ``rate`` per second after that; with
    ``total_rate``, all peers together get no more than ``total_burst`` at once and
    ``total_rate`` per second. At most ``max_peers`` peers are remembered (the least recently
    seen are forgotten first, which hands them a full bucket again, so a flood from ever new
    peers is held by the shared bucket)."""

    def __init__(self, rate: float, burst: float, total_rate: float | None = None,
                 total_burst: float | None = None, max_peers: int = MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[], Any] | None = None):
        """Check the parameters; nothing is spent yet. ``on_drop()`` is called for each event
        dropped (to count it in a metric)."""
        if rate <= 0 or burst < 1 or max_peers < 1:
            raise ValueError("need rate > 0, burst >= 1 and max_peers >= 1")
        if total_rate is not None and (total_rate <= 0 or (total_burst or 0) < 1):
            raise ValueError("need total_rate > 0 and total_burst >= 1")
        self.rate, self.burst, self.max_peers, self.clock = rate, burst, max_peers, clock
        self.on_drop = on_drop
        self.total = None if total_rate is None else _Bucket(total_rate, total_burst, clock())
        self.peers: collections.OrderedDict[Hashable, _Bucket] = collections.OrderedDict()
        self.dropped = 0

    def allow(self, peer: Hashable) -> bool:
        """Spend a token of ``peer`` (and a shared one): True if it had one, else False (the
        event is to be dropped; ``dropped`` counts it)."""
        now = self.clock()
        bucket = self.peers.pop(peer, None) or _Bucket(self.rate, self.burst, now)
        self.peers[peer] = bucket
        while len(self.peers) > self.max_peers:
            self.peers.popitem(last=False)
        ok = bucket.refill(now) >= 1 and (self.total is None or self.total.refill(now) >= 1)
        if ok:
            bucket.tokens -= 1
            if self.total is not None:
                self.total.tokens -= 1
        else:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
        return ok


def replies(on_drop: Callable[[], Any] | None = None) -> PeerLimiter:
    """The limiter of error replies to bad or refused input, or about jobs a peer does not
    have: per peer, and all peers together."""
    return PeerLimiter(REPLY_RATE, REPLY_BURST, REPLY_TOTAL_RATE, REPLY_TOTAL_BURST,
                       on_drop=on_drop)


def answers(on_drop: Callable[[], Any] | None = None) -> PeerLimiter:
    """The limiter of answers to hello and status: per peer only, so that a flood from others
    never leaves a client's hello unanswered."""
    return PeerLimiter(REPLY_RATE, REPLY_BURST, on_drop=on_drop)


def warnings() -> PeerLimiter:
    """The limiter of log lines about a peer's bad input: one a minute per peer, ten a minute
    in all (a flood from ever new routing ids cannot fill the journal)."""
    return PeerLimiter(WARN_RATE, 1, WARN_TOTAL_RATE, WARN_TOTAL_BURST)


def budget() -> Budget:
    """The budget of live jobs per client and in all."""
    return Budget(PEER_JOBS, PEER_BYTES, TOTAL_JOBS, TOTAL_BYTES)


class Budget:
    """Jobs held per peer and in all, and the memory their specs take (see :func:`cost`)."""

    def __init__(self, peer_jobs: int, peer_bytes: int, total_jobs: int, total_bytes: int):
        """Limits per peer and in all; nothing is held yet."""
        self.peer_jobs, self.peer_bytes = peer_jobs, peer_bytes
        self.total_jobs, self.total_bytes = total_jobs, total_bytes
        self.held: dict[Hashable, list[int]] = {}     # peer -> [jobs, bytes]
        self.jobs = self.bytes = 0

    def take(self, peer: Hashable, cost: int) -> str | None:
        """Hold one more job of ``cost`` bytes for ``peer``; or, if that passes a limit, hold
        nothing and return why (a text for the refusal)."""
        jobs, size = self.held.get(peer, (0, 0))
        if jobs >= self.peer_jobs:
            return f"this client already has {jobs} jobs here (at most {self.peer_jobs})"
        if size + cost > self.peer_bytes:
            return (f"this client's jobs would hold {_mib(size + cost)} of arguments and "
                    f"environment here (at most {_mib(self.peer_bytes)})")
        if self.jobs >= self.total_jobs or self.bytes + cost > self.total_bytes:
            return "this host holds as many jobs as it takes; try again later"
        self.held[peer] = [jobs + 1, size + cost]
        self.jobs += 1
        self.bytes += cost
        return None

    def give(self, peer: Hashable, cost: int) -> None:
        """A job of ``peer`` held with ``cost`` is gone."""
        held = self.held.get(peer)
        if held is None:
            return
        held[0] -= 1
        held[1] -= cost
        self.jobs -= 1
        self.bytes -= cost
        if held[0] <= 0:
            del self.held[peer]


def cost(fields: dict) -> int:
    """What keeping a decoded message's fields costs in memory, roughly: its bytes and strings
    plus a fixed overhead per Python object (so a million empty arguments are not free)."""
    return 1024 + _size(fields)


def _size(value: Any) -> int:
    """Bytes ``value`` (a decoded msgpack value) takes, roughly (``map`` over a container, not
    a generator: a third of the cost, which at a broker was a tenth of a job's)."""
    if isinstance(value, (bytes, str)):
        return 64 + len(value)
    if isinstance(value, dict):
        return 64 + sum(map(_size, value)) + sum(map(_size, value.values()))
    if isinstance(value, (list, tuple)):
        return 64 + sum(map(_size, value))
    return 32


def _mib(n: int) -> str:
    """``n`` bytes in MiB, for texts."""
    return f"{n / 2**20:.1f} MiB"
