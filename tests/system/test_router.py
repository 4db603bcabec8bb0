"""Unit tests for offloadd.router: binding, the wake-up pipe, the peer gate, held positions."""
import logging
import select

import zmq
from offloadd import limits, router

from offloadfs import protocol
from offloadfs.protocol import ProtocolError


def test_bind_takes_a_free_port_with_each_sides_options():
    """Port 0 becomes a real port; the daemon's and the broker's HWM and LINGER stay theirs."""
    ctx = zmq.Context()
    try:
        sock, endpoint = router.bind(ctx, "tcp://127.0.0.1:0", None, "clients",
                                     rcvhwm=router.DAEMON_RCVHWM, linger=router.DAEMON_LINGER)
        other, _ = router.bind(ctx, "tcp://127.0.0.1:0", None, "hosts")
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
        assert (sock.getsockopt(zmq.RCVHWM), sock.getsockopt(zmq.LINGER)) == (10000, 1000)
        assert (other.getsockopt(zmq.RCVHWM), other.getsockopt(zmq.LINGER)) == (1000, 500)
        assert sock.getsockopt(zmq.SNDHWM) == other.getsockopt(zmq.SNDHWM) == 0
        sock.close(0)
        other.close(0)
    finally:
        ctx.term()


def test_wildcard_port_only_rewrites_tcp_port_zero():
    """tcp://A:0 is ZeroMQ's tcp://A:*; anything else is left as it is."""
    assert router.wildcard_port("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert router.wildcard_port("tcp://127.0.0.1:7788") == "tcp://127.0.0.1:7788"
    assert router.wildcard_port("ipc:///tmp/x:0") == "ipc:///tmp/x:0"


def test_wakeup_stop_wakes_and_drain_empties():
    """stop() sets stopping and makes the pipe readable; drain() empties it."""
    wake = router.Wakeup()
    try:
        assert not wake.stopping
        wake.poke()
        wake.stop()
        assert wake.stopping and select.select([wake.r], [], [], 0)[0]
        wake.drain()
        assert not select.select([wake.r], [], [], 0)[0]
    finally:
        wake.close()


def test_refuse_stops_at_the_peers_rate_limit_unless_unlimited():
    """Error replies to one peer stop at its burst; an unlimited peer always gets one."""
    gate, sent = router.PeerGate(), []
    send = lambda peer, frames: sent.append((peer, protocol.decode(frames)))   # noqa: E731
    went = [gate.refuse(send, b"p", "j", "kind", "x" * (protocol.MAX_TEXT + 9), True)
            for _ in range(limits.REPLY_BURST + 5)]
    assert went.count(True) == limits.REPLY_BURST and not went[-1]
    assert gate.refuse(send, b"p", None, "kind", "text", limited=False)
    first, last = sent[0][1], sent[-1][1]
    assert (first.kind, first["kind"], first["started"], len(first["text"])) == \
        ("error", "kind", True, protocol.MAX_TEXT)
    assert "started" not in last.fields


def test_refuse_unknown_names_each_unknown_job_once_and_stops_at_a_drop():
    """Known jobs get nothing, a repeated id one reply, and the first dropped reply ends it."""
    asked: list = []
    router.refuse_unknown(["a", "k", "a", "b", "c"], lambda j: j == "k",
                          lambda j: asked.append(j) or j != "b")
    assert asked == ["a", "b"]


def test_bad_input_replies_and_logs_once(caplog):
    """A bad message: an error reply through the loop's refuse, a warning, then debug lines."""
    gate, refused = router.PeerGate(), []
    with caplog.at_level(logging.DEBUG, "offloadd"):
        for _ in range(3):
            gate.bad_input(lambda *a: refused.append(a), b"p", ProtocolError("bad"))
    assert refused == [(None, "protocol", "bad")] * 3
    levels = [r.levelno for r in caplog.records if "bad message from peer 70" in r.message]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_positions_send_only_the_latest_of_jobs_still_queued():
    """Two positions for one job send the last; a job no longer queued gets none."""
    held, sent = router.Positions(), []
    held.later((b"c", "j1"), 3)
    held.later((b"c", "j1"), 2)
    held.later((b"c", "j2"), 4)
    held.flush(lambda peer, frames: sent.append((peer, protocol.decode(frames))),
               lambda key: key[1] == "j1")
    assert [(p, m.kind, m.job, m["position"]) for p, m in sent] == [(b"c", "queued", "j1", 2)]
    held.flush(lambda *a: sent.append(a), lambda key: True)
    assert len(sent) == 1


def test_say_security_banner(caplog):
    """Keys: the CURVE line; no keys: a warning off loopback, else the loopback line."""
    with caplog.at_level(logging.INFO, "offloadd"):
        router.say_security(("CURVE on: %d keys", 2), ["tcp://0.0.0.0:1"], "open %s")
        router.say_security(None, ["tcp://127.0.0.1:1", "tcp://0.0.0.0:2"], "open %s %s")
        router.say_security(None, ["tcp://127.0.0.1:1"], "open %s")
        router.say_security(None, [], "open %s")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "CURVE on: 2 keys"), ("WARNING", "open tcp://127.0.0.1:1 tcp://0.0.0.0:2"),
        ("INFO", "no keys ([security] secret_key): listening on loopback only")]
