"""Hostile input: the daemon and the broker refuse it with typed errors at a bounded cost, and
keep serving (the decoder itself is fuzzed in test_protocol).

The messages come from hypothesis strategies built on the protocol's schema: random bytes,
truncated and oversized frames, msgpack of the wrong shapes, valid headers with fields of the
wrong type, and well-formed messages a client may not send (submits that must be refused,
stream messages for jobs that are not the sender's, pings naming thousands of jobs, kinds that
only a daemon sends). Every generated submit carries at least one defect and otherwise runs
``touch CANARY/N``, so a submit that should have been refused but ran leaves a file behind.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from offloadd import limits
from offloadd import server as daemon_server
from offloadd.broker import Broker as InProcessBroker
from offloadd.broker import BrokerConfig
from offloadd.config import ServeConfig
from offloadd.server import HostJob, Server

from offloadfs import protocol

from ..harness import OFFLD, alive, wait_for
from ..unit.test_protocol import EXAMPLES, MSGPACK_INT, VALUES, frames_of, header_of

NOBODY = 65534
COMMANDS = {"sh": "/bin/sh", "true": "/bin/true", "sleep": "/bin/sleep"}
VICTIM = "victim"                      # the job id of a legitimate client's job
ERROR_KINDS = {"frame", "decode", "version", "kind", "field", "too-large", "unknown-job",
               "not-allowed", "root", "identity", "busy", "duplicate", "no-host"}


# --- the strategies ----------------------------------------------------------------------------

JOB_IDS = st.sampled_from([VICTIM, "sync", "1", "x" * protocol.JOB_ID_MAX]) | \
    st.text(min_size=1, max_size=8)
BAD_ARGV0 = st.sampled_from([b"ls", b"/usr/bin/sh", b"/tmp/../bin/sh", b"./sh", b"sh ",
                             b"sh\xff", b"/bin/sh/", b"SH", b"/bin/cat"])
BAD_DATA = st.sampled_from([
    {"mode": "nfs", "server": "-oremount,rw:1", "export": "/"},
    {"mode": "nfs", "server": "127.0.0.1:2049", "export": "relative"},
    {"mode": "nfs", "server": 2049, "export": "/"},
    {"mode": "nfs", "server": "127.0.0.1:2049"},
    {"mode": "stage", "bytes": -1}, {"mode": "stage", "bytes": "many"},
    {"mode": "stage", "bytes": 2**60}, {"mode": "stage", "bytes": 1.5},
    {"mode": "elsewhere"}, {"mode": b"stage"}, {"mode": 7}])
NO_ID = 2**32 - 1


def named(**values) -> st.SearchStrategy:
    """One of ``values``, shown by its name (big values make hypothesis's reprs slow)."""
    return st.sampled_from(sorted(values)).map(lambda name: values[name])


NOT_INT = st.none() | st.booleans() | st.floats() | st.text(max_size=4) | \
    st.binary(max_size=4) | st.lists(MSGPACK_INT, max_size=2)
NOT_BYTES = st.none() | st.booleans() | MSGPACK_INT | st.text(max_size=4) | \
    st.lists(st.binary(max_size=2), max_size=2)
NOT_LIST = st.none() | st.booleans() | MSGPACK_INT | st.text(max_size=4) | \
    st.binary(max_size=4) | st.dictionaries(st.text(max_size=2), MSGPACK_INT, max_size=2)
NOT_MAP = st.none() | MSGPACK_INT | st.text(max_size=4) | st.lists(st.binary(), max_size=2)
SUBMIT_REQUIRED = sorted(protocol.SCHEMA["submit"][1])
WRONG_TYPE = {"argv": NOT_LIST, "cwd": NOT_BYTES, "uid": NOT_INT, "gid": NOT_INT,
              "groups": NOT_LIST | st.lists(NOT_INT, min_size=1, max_size=2), "env": NOT_MAP,
              "window": NOT_INT}
# Each defect alone makes a submit one the daemon must refuse, by the decoder or by policy.
DEFECTS = {
    "argv0": lambda draw, h: h.update(argv=[draw(BAD_ARGV0), b"-c", h["argv"][-1]]
                                      if isinstance(h.get("argv"), list) and h["argv"] else
                                      [draw(BAD_ARGV0)]),
    "uid0": lambda draw, h: h.update(uid=0),
    "gid0": lambda draw, h: h.update(gid=0),
    "group0": lambda draw, h: h.update(groups=[NOBODY, 0]),
    "no-id": lambda draw, h: h.update(**{draw(st.sampled_from(["uid", "gid"])): NO_ID}),
    "no-group": lambda draw, h: h.update(groups=[NO_ID]),
    "data": lambda draw, h: h.update(data=draw(BAD_DATA)),
    "cwd": lambda draw, h: h.update(cwd=draw(st.sampled_from([b"", b"tmp", b"/\x00"]))),
    "env": lambda draw, h: h.update(env=draw(named(
        equals={b"A=B": b"1"}, empty={b"": b"1"}, nul={b"X": b"a\x00"}, text={b"X": "text"},
        huge={b"BIG%d" % i: b"v" * 1024 for i in range(300)}))),
    "argv": lambda draw, h: h.update(argv=draw(named(
        none=[], empty=[b""], nul=[b"sh", b"a\x00b"], flat=b"sh", huge=[b"x" * 1024] * 2100))),
    "window": lambda draw, h: h.update(window=draw(st.sampled_from([0, -1, 2**31, True]))),
    "type": lambda draw, h: h.update(**{(f := draw(st.sampled_from(sorted(WRONG_TYPE)))):
                                        draw(WRONG_TYPE[f])}),
    "missing": lambda draw, h: h.pop(draw(st.sampled_from(SUBMIT_REQUIRED))),
    "version": lambda draw, h: h.update(v=draw(st.sampled_from([0, 2, "1", None]))),
    "job": lambda draw, h: h.update(job=draw(st.sampled_from(["", "j" * 65, 5, None]))),
}


@st.composite
def refused_submits(draw, canary: bytes) -> list[bytes]:
    """A submit that would run ``touch CANARY/N`` as nobody, but for one or more defects."""
    n = draw(st.integers(0, 10**6))
    header = {"v": protocol.VERSION, "t": "submit", "job": draw(JOB_IDS),
              "argv": [b"sh", b"-c", b"touch %s/%d" % (canary, n)], "cwd": b"/",
              "uid": NOBODY, "gid": NOBODY, "groups": [], "window": draw(st.integers(1, 2**30)),
              "env": draw(st.sampled_from([{}, {b"LANG": b"C"}, {b"LD_PRELOAD": b"/x.so"}]))}
    for name in draw(st.lists(st.sampled_from(sorted(DEFECTS)), min_size=1, max_size=2,
                              unique=True)):
        DEFECTS[name](draw, header)
    payload = draw(st.sampled_from([None] * 4 + [b"x"]))
    return frames_of(header, payload)


@st.composite
def stray(draw) -> list[bytes]:
    """A well-formed message about a job that is not the sender's (the victim's, or none)."""
    job = draw(JOB_IDS)
    kind = draw(st.sampled_from(["credit", "signal", "cancel", "close", "stdin", "stdin-eof",
                                 "file"]))
    fields = {"credit": {"n": draw(st.sampled_from([0, 1, 2**30]))},
              "signal": {"signum": draw(st.integers(1, 64))},
              "close": {"stream": draw(st.sampled_from(protocol.STREAMS))},
              "file": {"name": b"f", "mode": 0o4755, "last": draw(st.booleans())}}.get(kind, {})
    payload = draw(st.binary(max_size=64)) if kind in protocol.PAYLOAD_KINDS else None
    return protocol.encode(kind, job, payload, **fields)


def pings() -> st.SearchStrategy[list[bytes]]:
    """Pings naming jobs the sender does not have: a few, or ten thousand."""
    return st.builds(lambda jobs: protocol.encode("ping", jobs=jobs),
                     st.lists(JOB_IDS, max_size=20)
                     | named(many=[f"j{i}" for i in range(10_000)], victim=[VICTIM] * 5000))


CLIENT_KINDS = {"hello", "status", "submit", "ping", "cancel", "credit", "signal", "close",
                "stdin", "stdin-eof", "file"}


def not_for_a_daemon() -> st.SearchStrategy[list[bytes]]:
    """Valid messages of every kind a client does not send (those only a daemon or a host
    sends), and an error posing as a broker's request to announce ourselves."""
    kinds = sorted(set(protocol.SCHEMA) - CLIENT_KINDS)
    return st.sampled_from(kinds).map(lambda k: protocol.encode(k, EXAMPLES[k][0], EXAMPLES[k][1],
                                                                **EXAMPLES[k][2])) | \
        st.just(protocol.encode("error", kind="reannounce", text="announce yourself"))


def wrong_types() -> st.SearchStrategy[list[bytes]]:
    """A valid header of any kind with one field replaced by a value of any type, or gone."""
    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(sorted(EXAMPLES)))
        header = header_of(kind)
        name = draw(st.sampled_from(sorted(header)))
        return frames_of(header_of(kind, **{name: draw(st.just(...) | VALUES)}),
                         EXAMPLES[kind][1])
    return build()


def garbage() -> st.SearchStrategy[list[bytes]]:
    """Random bytes, truncated messages, msgpack of the wrong shape, wrong frame counts."""
    valid = st.sampled_from(sorted(EXAMPLES)).map(
        lambda k: protocol.encode(k, EXAMPLES[k][0], EXAMPLES[k][1], **EXAMPLES[k][2]))
    return st.one_of(
        st.lists(st.binary(max_size=128), min_size=1, max_size=4),
        st.builds(lambda frames, cut: [frames[0][:cut]], valid, st.integers(0, 64)),
        st.builds(lambda v: [msgpack.packb(v, use_bin_type=True)], VALUES),
        st.builds(lambda frames, extra: frames + extra, valid,
                  st.lists(st.binary(max_size=8), min_size=1, max_size=3)),
        named(deep=[b"\x91" * 100_000], huge_map=[b"\xdf\xff\xff\xff\xff"], never=[b"\xc1"],
              trailing=[msgpack.packb({"v": 1, "t": "hello"}) + b"trailing"],
              ext=[msgpack.packb(msgpack.ExtType(5, b"x"))]))


def hostile(canary: bytes) -> st.SearchStrategy[tuple[str, list[bytes]]]:
    """(route, frames): which kind of sender sends it, and the message."""
    route = st.sampled_from(["reader"] * 4 + ["deaf"] * 5 + ["fresh"])
    message = st.one_of(garbage(), wrong_types(), refused_submits(canary), stray(), pings(),
                        not_for_a_daemon(),
                        st.sampled_from(["hello", "status"]).map(protocol.encode))
    return st.tuples(route, message)


def test_the_strategies_cover_the_schema():
    """Every required field of a submit has values of the wrong type here, and the kinds a
    client sends are kinds of the protocol (every other kind is sent as one not for a
    daemon): a field added to a submit needs its hostile values."""
    assert set(WRONG_TYPE) == set(SUBMIT_REQUIRED)
    assert CLIENT_KINDS < set(protocol.SCHEMA) and set(EXAMPLES) == set(protocol.SCHEMA)


def corpus(canary: bytes, size: int) -> list[tuple[str, list[bytes]]]:
    """``size`` hostile messages, the same on every run (derandomized hypothesis; drawing is
    slow, about 1 ms a message, so floods cycle through a corpus instead of drawing each)."""
    out: list[tuple[str, list[bytes]]] = []

    @settings(max_examples=size // 20 + 1, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile(canary), min_size=20, max_size=20))
    def draw(batch):
        out.extend(batch)

    draw()
    assert len(out) >= size, f"hypothesis drew only {len(out)} messages"
    return out[:size]


# --- bounds without sockets --------------------------------------------------------------------

class Clock:
    """A clock the test moves."""

    def __init__(self):
        """Start at 100 s."""
        self.now = 100.0

    def __call__(self) -> float:
        """The time."""
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    """A peer gets ``burst`` at once, then ``rate`` per second; the drops are counted."""
    clock, drops = Clock(), []
    limiter = limits.PeerLimiter(2.0, 5, clock=clock, on_drop=lambda: drops.append(1))
    assert [limiter.allow(b"p") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 1.0
    assert [limiter.allow(b"p") for _ in range(3)] == [True, True, False]
    clock.now += 60
    assert sum(limiter.allow(b"p") for _ in range(10)) == 5      # never more than a burst
    assert limiter.dropped == len(drops) == 3 + 5


def test_peers_have_their_own_buckets_under_a_shared_one():
    """One peer's flood does not spend another's tokens, but all peers together get no more
    than the shared bucket, however many routing ids they use."""
    clock = Clock()
    limiter = limits.PeerLimiter(1.0, 3, total_rate=10.0, total_burst=20, clock=clock)
    assert sum(limiter.allow(b"flood") for _ in range(100)) == 3
    assert limiter.allow(b"other")
    assert sum(limiter.allow(b"id-%d" % i) for i in range(1000)) == 20 - 4
    clock.now += 1.0
    assert sum(limiter.allow(b"id2-%d" % i) for i in range(1000)) == 10


def test_limiter_remembers_a_bounded_number_of_peers():
    """A flood of new routing ids keeps at most ``max_peers`` buckets."""
    limiter = limits.PeerLimiter(1.0, 1, total_rate=1.0, total_burst=1, max_peers=100)
    for i in range(10_000):
        limiter.allow(i)
    assert len(limiter.peers) == 100


@pytest.mark.parametrize("args", [(0, 1), (1, 0), (1, 1, 0, 1), (1, 1, 1, 0)])
def test_limiter_refuses_nonsense_parameters(args):
    """Rates must be positive and bursts at least one."""
    with pytest.raises(ValueError):
        limits.PeerLimiter(*args)


def test_budget_caps_jobs_and_bytes_per_peer_and_in_all():
    """take refuses past a peer's job count or bytes, or the total; give frees; a peer with
    no jobs left is forgotten."""
    budget = limits.Budget(peer_jobs=2, peer_bytes=100, total_jobs=3, total_bytes=250)
    assert budget.take("a", 10) is None and budget.take("a", 10) is None
    assert "2 jobs" in budget.take("a", 10)
    assert "MiB" in budget.take("b", 101)
    assert budget.take("b", 90) is None
    assert "try again later" in budget.take("c", 1)           # three jobs in all
    budget.give("a", 10)
    assert budget.take("c", 1) is None
    for peer, cost in (("a", 10), ("b", 90), ("c", 1)):
        budget.give(peer, cost)
    assert (budget.jobs, budget.bytes, budget.held) == (0, 0, {})


def test_cost_counts_every_object_not_just_bytes():
    """65,536 empty arguments cost what they take in memory, not nothing."""
    assert limits.cost({"argv": [b""] * 65536, "env": {}}) > 64 * 65536
    assert limits.cost({"env": {b"K": b"v" * 1000}}) > 1000


# --- the daemon's and the broker's message handling, in process --------------------------------

LINK = "tcp://127.0.0.1:9"          # a broker nobody runs: the server's link to it never connects
IN_PROCESS = settings(max_examples=500, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))


@pytest.fixture
def server(tmp_path):
    """A Server on an ephemeral loopback port with a link to a (missing) broker, not looping:
    tests call its message handling directly. Shut down (sockets, pipe, mounts) at the end."""
    config = ServeConfig(listen="tcp://127.0.0.1:0", connect=[LINK], commands=COMMANDS,
                         slots=1, allow_root=False, scratch_dir=str(tmp_path / "scratch"),
                         mounts_dir=str(tmp_path / "mnt"))
    srv = Server(config)
    yield srv
    srv._shutdown()


def submit_frames(job: str, *argv: bytes, **changes) -> list[bytes]:
    """A valid submit running ``argv`` as nobody in /."""
    fields = dict(argv=list(argv), cwd=b"/", uid=NOBODY, gid=NOBODY, groups=[], env={},
                  window=1 << 20) | changes
    return protocol.encode("submit", job, None, **fields)


def errors_to(sent: list, peer: bytes) -> list[str]:
    """The kinds of the errors sent to ``peer``."""
    return [m["kind"] for p, f in sent if p == peer for m in [protocol.decode(f)]
            if m.kind == "error"]


def stopped_or_gone(pid: int) -> bool:
    """True if ``pid`` is gone, a zombie, or stopped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in "ZTt"


def test_server_refuses_generated_hostile_input(server, tmp_path, caplog, monkeypatch):
    """Generated hostile messages, from any routing id or one posing as the broker link, never
    raise, never start or touch a job, and log no internal error; the broker's job (the
    victim) keeps running."""
    link = next(iter(server.links))
    server._received([link, *submit_frames(VICTIM, b"sleep", b"60")], via_link=True)
    victim = server.jobs[(link, VICTIM)]
    assert victim.process is not None
    canary = tmp_path / "canary"
    admitted = []       # an admitted job goes at once (its client is not there): spy
    monkeypatch.setattr(daemon_server, "HostJob",
                        lambda *args, **kw: admitted.append(args) or HostJob(*args, **kw))

    @IN_PROCESS
    @given(st.binary(min_size=1, max_size=12) | st.just(link),
           refused_submits(os.fsencode(canary))
           | hostile(os.fsencode(canary)).map(lambda routed: routed[1]))
    def feed(peer, frames):
        server._received([peer, *frames])
        assert not admitted, admitted
        assert list(server.jobs) == [(link, VICTIM)]
        assert not stopped_or_gone(victim.process.pid)

    with caplog.at_level(logging.INFO, logger="offloadd"):
        feed()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not canary.exists()


def test_broker_refuses_generated_hostile_input(tmp_path, caplog):
    """The same on a broker's client port: nothing raises, no internal error, and its books
    (jobs, wire ids, budget) stay consistent."""
    broker = InProcessBroker(BrokerConfig(clients="tcp://127.0.0.1:0",
                                          workers="tcp://127.0.0.1:0"))

    @IN_PROCESS
    @given(st.binary(min_size=1, max_size=12),
           hostile(b"/nonexistent").map(lambda routed: routed[1]))
    def feed(peer, frames):
        broker._received(broker.front, [peer, *frames], broker._from_client)
        assert len(broker.jobs) == len(broker.wires) == broker.budget.jobs

    try:
        with caplog.at_level(logging.INFO, logger="offloadd"):
            feed()
    finally:
        broker._close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_posing_as_the_broker_link_cannot_touch_its_jobs(server):
    """A client whose routing id is the broker link's name is dropped, not taken for the
    broker: it can neither cancel nor signal the jobs the broker sent."""
    link = next(iter(server.links))
    server._received([link, *submit_frames(VICTIM, b"sleep", b"60")], via_link=True)
    pid = server.jobs[(link, VICTIM)].process.pid
    for frames in (protocol.encode("signal", VICTIM, None, signum=19),
                   protocol.encode("cancel", VICTIM)):
        server._received([link, *frames])
    assert (link, VICTIM) in server.jobs and not stopped_or_gone(pid)
    server._received([link, *protocol.encode("cancel", VICTIM)], via_link=True)
    assert (link, VICTIM) not in server.jobs


@pytest.fixture
def sent(server, monkeypatch) -> list:
    """What the server sends, as (peer, frames), instead of sending it (no client is there)."""
    out: list = []
    monkeypatch.setattr(server, "send", lambda peer, frames: out.append((peer, frames)))
    return out


@pytest.mark.parametrize("changes,kind", [
    ({"uid": 2**32 - 1}, "identity"), ({"gid": 2**32 - 1}, "identity"),
    ({"groups": [2**32 - 1]}, "identity"), ({"groups": [NOBODY, 0]}, "root"),
    ({"data": {"mode": "nfs", "server": "-oremount,rw:1", "export": "/"}}, "field"),
    ({"data": {"mode": "stage", "bytes": "many"}}, "field"),
    ({"data": {"mode": "elsewhere"}}, "field"),
])
def test_submits_that_would_run_as_root_or_with_bad_descriptors_are_refused(
        server, sent, changes, kind):
    """(uid_t)-1 would make set*id() keep the daemon's root ids; a group 0 is root's group; a
    mount server starting with '-' would be an option to mount(8): all refused, typed."""
    server._received([b"c1", *submit_frames("j", b"true", **changes)])
    assert not server.jobs and errors_to(sent, b"c1") == [kind]


def test_one_client_holds_at_most_its_share_of_jobs(server, sent):
    """Past PEER_JOBS live jobs a client's submits are refused as busy; another client is
    still served; the budget is given back as the jobs go."""
    for i in range(limits.PEER_JOBS + 1):
        server._received([b"greedy", *submit_frames(f"j{i}", b"sleep", b"60")])
    assert len(server.jobs) == limits.PEER_JOBS
    assert errors_to(sent, b"greedy") == ["busy"]
    server._received([b"other", *submit_frames("j", b"sleep", b"60")])
    assert (b"other", "j") in server.jobs
    for peer, job in list(server.jobs):
        server._received([peer, *protocol.encode("cancel", job)])
    assert (server.budget.jobs, server.budget.bytes, server.budget.held) == (0, 0, {})


def test_queue_positions_are_told_at_most_once_a_heartbeat(server, sent):
    """Cancelling queued jobs one by one does not re-tell every queued job its position each
    time (O(n^2) messages); the heartbeat tells each job still queued its latest one."""
    for i in range(101):
        server._received([b"c1", *submit_frames(f"j{i}", b"sleep", b"60")])
    queued = lambda: [m["position"] for _, f in sent for m in [protocol.decode(f)]  # noqa: E731
                      if m.kind == "queued"]
    assert len(queued()) == 100                       # one each, when queued
    for i in range(1, 51):
        server._received([b"c1", *protocol.encode("cancel", f"j{i}")])
    assert len(queued()) == 100
    server._heartbeat()
    assert sorted(queued()[100:]) == list(range(1, 51))


def test_stdin_beyond_the_credit_fails_the_job(server, sent):
    """A client that sends more stdin than its credit to a job that does not read it cannot
    make the daemon buffer it: the job fails with a credit error."""
    server._received([b"c1", *submit_frames("j", b"sleep", b"60")])
    chunk = protocol.encode("stdin", "j", b"x" * protocol.CHUNK)
    for _ in range(2 * protocol.WINDOW // protocol.CHUNK + 1):
        server._received([b"c1", *chunk])
    assert not server.jobs and errors_to(sent, b"c1") == ["credit"]


def test_tiny_stdin_chunks_count_their_overhead(server, sent):
    """One-byte stdin messages are not free objects: with the job's pipe full and 14 MiB
    queued, the 2 MiB left of the limit are used up by 2 MiB / (1 + STDIN_SLACK) messages,
    not by two million."""
    server._received([b"c1", *submit_frames("j", b"sleep", b"60")])
    for _ in range(15):
        server._received([b"c1", *protocol.encode("stdin", "j", b"x" * protocol.CHUNK)])
    tiny = protocol.encode("stdin", "j", b"x")
    for n in range(1, 2**21):  # noqa: B007 (n is how many it took)
        server._received([b"c1", *tiny])
        if not server.jobs:
            break
    assert errors_to(sent, b"c1") == ["credit"]
    assert n <= 2**21 // (1 + limits.STDIN_SLACK)


def test_a_signal_number_the_host_does_not_have_is_refused(server, sent):
    """signum 32 (glibc's own) is in the protocol's range but is no signal to forward."""
    server._received([b"c1", *submit_frames("j", b"sleep", b"60")])
    server._received([b"c1", *protocol.encode("signal", "j", None, signum=32)])
    assert errors_to(sent, b"c1") == ["field"] and (b"c1", "j") in server.jobs


def test_tables_stay_bounded_under_a_flood_of_routing_ids(server, sent):
    """Ten thousand routing ids, one message each: the peer table and the limiters keep a
    bounded number of peers, and the error replies stop at the shared rate limit."""
    for i in range(10_000):
        server._received([b"fresh-%d" % i, b"\xc1"])
    assert len(server.peers) <= limits.MAX_PEERS
    assert len(server.peer_gate.replies.peers) <= limits.MAX_PEERS
    assert len(sent) <= limits.REPLY_TOTAL_BURST + 10 * limits.REPLY_TOTAL_RATE
    dropped = server.metrics.registry.get_sample_value("offload_daemon_replies_dropped_total")
    assert dropped >= 10_000 - len(sent)


def test_a_ping_naming_many_jobs_gets_a_bounded_number_of_replies(server, sent):
    """A ping naming 10,000 unknown jobs is answered for at most a burst of them."""
    server._received([b"c1", *protocol.encode("ping", jobs=[f"j{i}" for i in range(10_000)])])
    assert len(sent) == limits.REPLY_BURST


# --- a real daemon under a flood ---------------------------------------------------------------

TOTAL, ROUND, WARMUP = 10_000, 1_000, 2_000
# Flat memory: after a warm-up of 2,000 messages (two rounds: the heap's working set is not
# always reached in the first, e.g. 31-33 MB after it and 36-39 MB from the second on, with the
# daemon's reads sized by FIONREAD), the RSS may grow by at most SLACK bytes per further
# message: 6.4 MB over the last 8,000. A leak of 1 KB a message is 8 MB, past it (a planted one
# measured +15 MB over 9,000). What legitimately stays measured 0.3 to 1.9 MB (daemon) and 0.3 to
# 3.2 MB (broker) with the test alone, and 4.1 to 5.5 MB (daemon) inside the whole suite on 2 busy
# CPUs (probably: the slower the flood, the more rate-limit tokens refill, the more replies wait
# for the deaf senders; not verified; one CI run failed at 5.5 MB): the limiters' tables filling
# with the fresh routing ids (bounded at limits.MAX_PEERS), the replies the deaf senders never
# read (a few hundred, rate limited), allocator fragmentation. The processes run with glibc's mmap
# threshold fixed at its default (MALLOC_MMAP_THRESHOLD_): left dynamic, it rises to the size of
# the first 4 MiB buffer freed, and from then on such buffers come from the heap and stay
# resident, a 2 to 8 MB step at a random point.
SLACK = 800
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in KB (VmRSS)."""
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def dealer(ctx: zmq.Context, endpoint: str, name: bytes) -> zmq.Socket:
    """A DEALER with routing id ``name``; sends fail after 10 s rather than hang."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def received(sock: zmq.Socket) -> list[protocol.Message]:
    """Every message waiting on ``sock``, decoded (the daemon's replies must decode)."""
    out = []
    while sock.poll(0):
        out.append(protocol.decode(sock.recv_multipart()))
    return out


class Flood:
    """The hostile senders: readers (read every reply), deaf ones (never read), and a fresh
    DEALER for each of some messages (and for each oversized frame); plus a monitor asking
    for status."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        """Connect them all."""
        self.ctx, self.endpoint = ctx, endpoint
        self.readers = [dealer(ctx, endpoint, b"reader-%d" % i) for i in range(2)]
        self.deaf = [dealer(ctx, endpoint, b"deaf-%d" % i) for i in range(2)]
        self.monitor = dealer(ctx, endpoint, b"monitor")
        self.kinds: dict[str, int] = {}
        self.sent = self.fresh = self.syncs = 0

    def send(self, route: str, frames: list[bytes]) -> None:
        """Send one hostile message the way ``route`` says."""
        if route == "fresh":
            self.fresh += 1
            sock = dealer(self.ctx, self.endpoint, b"fresh-%d" % self.fresh)
            sock.send_multipart(frames)
            sock.send_multipart(protocol.encode("status"))
            deadline = time.monotonic() + 20      # the answer shows both were handled
            while not any(m.kind == "status-reply" for m in received(sock)):
                if not sock.poll(max(0, deadline - time.monotonic()) * 1000):
                    pytest.fail("a new client's status went unanswered during the flood")
            sock.close()
        else:
            group = self.readers if route == "reader" else self.deaf
            group[self.sent % len(group)].send_multipart(frames)
        self.sent += 1

    def oversized(self) -> None:
        """A frame just over the decoder's limit (ZeroMQ passes it, the decoder refuses it)
        and one over ZMQ_MAXMSGSIZE (the daemon drops the connection, buffering nothing),
        each from a DEALER of its own (what a dropped connection had queued is lost)."""
        self.send("fresh", [b"\x81" + b"x" * protocol.MAX_HEADER])
        self.fresh += 1
        sock = dealer(self.ctx, self.endpoint, b"oversize-%d" % self.fresh)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.send_multipart([b"\x81" + b"x" * (protocol.MAX_HEADER + 8192)])
        sock.close()
        self.sent += 1

    def read(self) -> None:
        """Read what the readers got; count the errors by kind."""
        for sock in self.readers:
            for msg in received(sock):
                if msg.kind == "error":
                    self.kinds[msg["kind"]] = self.kinds.get(msg["kind"], 0) + 1

    def sync(self) -> None:
        """Each sender but the fresh ones submits a real job (``true``); once the daemon has
        run them all, it has handled everything each sent before (a DEALER's messages arrive
        in order)."""
        self.syncs += 1
        senders = [*self.readers, *self.deaf]
        for n, sock in enumerate(senders):
            sock.send_multipart(submit_frames(f"sync-{self.syncs}-{n}", b"true"))
        want = len(senders) * self.syncs
        wait_for(lambda: self.status()["done"] >= want, 60, f"{want} sync jobs to run",
                 interval=0.1)

    def status(self) -> dict:
        """The daemon's status-reply fields (asked again if the answer is rate limited)."""
        self.monitor.send_multipart(protocol.encode("status"))
        if not self.monitor.poll(1000):
            return {"done": -1}
        return dict(protocol.decode(self.monitor.recv_multipart()).fields)

    def close(self) -> None:
        """Close every socket."""
        for sock in (*self.readers, *self.deaf, self.monitor):
            sock.close()


@pytest.fixture
def nobody_dirs(tmp_path, traversable):
    """(canary, work): a directory nobody may write to (a job that ran leaves a file in it),
    and a working directory nobody may use."""
    canary, work = tmp_path / "canary", tmp_path / "work"
    for path in (canary, work):
        path.mkdir()
        path.chmod(0o777)
    return canary, work


def offld_as_nobody(target: str, work: Path, *command: str,
                    opts=("-H",)) -> subprocess.CompletedProcess:
    """``offld`` run by nobody (the daemon refuses root) to completion, bounded."""
    return subprocess.run([OFFLD, "-Q", *opts, target, "--", *command], cwd=work,
                          capture_output=True, timeout=60, user=NOBODY, group=NOBODY,
                          extra_groups=[])


@dataclasses.dataclass
class Outcome:
    """What a flood did: RSS after the warm-up and at the end (KB), whether the victim's job
    still ran, undisturbed, at the end, what its client heard, the error kinds the readers
    got."""

    warm_kb: int
    after_kb: int
    victim_ran: bool
    news: list
    kinds: dict
    rounds_kb: list = dataclasses.field(default_factory=list)   # RSS after each round


def flood(endpoint: str, pid: int, messages: list, total: int) -> Outcome:
    """Send ``total`` hostile messages (cycling through ``messages``) to ``endpoint``, the
    port of process ``pid``, while a legitimate client there runs a job (the victim) and
    keeps it alive."""
    ctx = zmq.Context()
    senders = Flood(ctx, endpoint)
    victim = dealer(ctx, endpoint, b"victim-peer")
    news: list[protocol.Message] = []
    rounds: list[int] = []
    try:
        victim.send_multipart(submit_frames(VICTIM, b"sleep", b"60"))
        started = wait_for(lambda: [m for m in received(victim) if m.kind == "started"], 20,
                           "the victim's job to start")
        # In rounds of 1,000, each ending when the target has handled it (so that what is
        # measured is what it keeps, not a backlog in its socket).
        for start in range(0, total, ROUND):
            senders.oversized()
            for i in range(senders.sent, start + ROUND):
                senders.send(*messages[i % len(messages)])
                if i % 100 == 0:               # the victim's client keeps its job alive
                    victim.send_multipart(protocol.encode("ping", jobs=[VICTIM]))
                    news += received(victim)
                    senders.read()
            senders.sync()
            rounds.append(rss_kb(pid))
            if start + ROUND == WARMUP:
                warm_kb = rounds[-1]
        assert senders.sent == total
        after_kb = rss_kb(pid)
        senders.sync()              # a quiet round: a buffer still held just now is not kept
        after_kb = min(after_kb, rss_kb(pid))
        senders.read()
        news += received(victim)
        pid = started[0]["pid"]
        return Outcome(warm_kb, after_kb, alive(pid) and not stopped_or_gone(pid), news,
                       senders.kinds, rounds)
    finally:
        victim.send_multipart(protocol.encode("cancel", VICTIM))
        victim.close(linger=1000)
        senders.close()
        ctx.term()


def check_outcome(outcome: Outcome, log: str, canary: Path, what: str, total: int,
                  capsys) -> None:
    """The victim's job still runs, untouched; nothing hostile ran; the replies were typed
    errors; the log has no error and a bounded number of warnings; memory stayed flat."""
    assert outcome.victim_ran
    assert not [m for m in outcome.news if m.kind in ("exit", "error")], outcome.news
    assert not list(canary.iterdir()), "a hostile submit ran"
    assert outcome.kinds and set(outcome.kinds) <= ERROR_KINDS, outcome.kinds
    warnings = log.count(" WARNING ")
    assert " ERROR " not in log and "Traceback" not in log
    assert warnings <= limits.WARN_TOTAL_BURST + 5, warnings
    with capsys.disabled():
        print(f"\n    {what} RSS after the warm-up {outcome.warm_kb / 1024:.1f} MB, at the end "
              f"{outcome.after_kb / 1024:.1f} MB; {warnings} warnings; errors read "
              f"{outcome.kinds}; after each round {[k // 1024 for k in outcome.rounds_kb]} MB")
    assert (outcome.after_kb - outcome.warm_kb) * 1024 < SLACK * (total - WARMUP), \
        f"{what} RSS after each round of {ROUND}: {outcome.rounds_kb} KB"


def test_daemon_survives_10000_hostile_messages_with_flat_memory(start_daemon, nobody_dirs,
                                                                   capsys, monkeypatch):
    """10,000 hostile messages from readers, deaf senders, a fresh routing id per message and
    oversized frames: the daemon lives, ran nothing it was sent, left a legitimate client's
    job alone, logged a bounded number of warnings, its memory stayed flat, and a real job
    through offld still works."""
    canary, work = nobody_dirs
    for name, value in MALLOC_ENV.items():
        monkeypatch.setenv(name, value)
    daemon = start_daemon(commands=COMMANDS, allow_root=False)
    outcome = flood(daemon.endpoint, daemon.proc.pid, corpus(os.fsencode(canary), 3_000),
                    TOTAL)
    assert daemon.proc.poll() is None
    got = offld_as_nobody(daemon.hostport, work, "sh", "-c", "echo alive; touch ran")
    assert got.returncode == 0 and got.stdout == b"alive\n", got.stderr
    assert (work / "ran").exists()
    check_outcome(outcome, daemon.log(), canary, "daemon", TOTAL, capsys)


def test_broker_client_port_survives_10000_hostile_messages(
        start_broker, start_daemon, nobody_dirs, capsys, monkeypatch):  # noqa: F811
    """The same on a broker's client port with one host behind it: the broker lives, passes
    nothing hostile on to run, and a real job through offld -L still works."""
    canary, work = nobody_dirs
    for name, value in MALLOC_ENV.items():
        monkeypatch.setenv(name, value)
    broker = start_broker()
    host = start_daemon("--connect", broker.workers, commands=COMMANDS, allow_root=False)
    wait_for(lambda: " ready: " in broker.log(), 20, "the host to be ready")
    outcome = flood(broker.clients, broker.proc.pid, corpus(os.fsencode(canary), 3_000),
                    TOTAL)
    assert broker.proc.poll() is None and host.proc.poll() is None
    got = offld_as_nobody(f"127.0.0.1:{broker.client_port}", work, "sh", "-c", "echo alive",
                          opts=("-L",))
    assert got.returncode == 0 and got.stdout == b"alive\n", got.stderr
    check_outcome(outcome, broker.log(), canary, "broker", TOTAL, capsys)
