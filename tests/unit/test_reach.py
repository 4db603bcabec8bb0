"""The words for a failed connection (offloadfs/reach.py): each names what failed and the fix."""
import errno
import socket

import pytest
import zmq

from offloadfs import reach

AUTH, PROTOCOL, NO_DETAIL = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                             zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@pytest.mark.parametrize("event, value, keyed, peer, why, words", [
    (AUTH, 0, True, None, "unauthorized", "not authorized there"),
    (PROTOCOL, reach.MECHANISM_MISMATCH, False, None, "unauthorized", "requires CURVE keys"),
    (NO_DETAIL, errno.EPIPE, False, "CURVE", "unauthorized", "requires CURVE keys"),
    (PROTOCOL, reach.MECHANISM_MISMATCH, True, None, "handshake", "the host uses no keys"),
    (NO_DETAIL, errno.EPIPE, True, "NULL", "handshake", "the host uses no keys"),
    (NO_DETAIL, 0, False, "", "handshake", "sends no ZeroMQ greeting"),
    (NO_DETAIL, 0, True, "", "handshake", "sends no ZeroMQ greeting"),
    (NO_DETAIL, 0, True, "CURVE", "handshake", "server_key is not the host's public key"),
    (NO_DETAIL, 0, False, None, "handshake", "does the host require CURVE keys?"),
])
def test_handshake_failures_say_what_the_peer_is(event, value, keyed, peer, why, words):
    """A peer that drops the connection is "requires CURVE keys" only when its greeting
    names CURVE (or libzmq saw the mismatch); one that sends no greeting is no offloadd."""
    got_why, text = reach.handshake(event, value, keyed, peer)
    assert got_why == why and words in text, text


def test_connect_failures_name_the_reason_and_the_fix():
    """Errnos and name lookups as words, a lookup naming the host alone."""
    end = "tcp://nosuch.invalid:7788"
    assert reach.unreachable(end, ("connect", errno.ECONNREFUSED)) == \
        "connection refused (is offloadd running there, on that port?)"
    assert reach.unreachable(end, ("connect", None)).startswith("no answer to the connection")
    assert reach.unreachable(end, ("connect", errno.EACCES)) == "permission denied"
    assert reach.unreachable(end, ("resolve", (socket.EAI_NONAME, "Name or service not known"))) \
        == "cannot resolve host 'nosuch.invalid': Name or service not known (check the name, " \
           "or give an address)"


def test_origins_and_names():
    """Where a host came from, and how it is shown."""
    assert reach.named("tcp://h:1", reach.origin("-H")) == "h:1 (from -H)"
    assert reach.named("tcp://[::1]:1") == "[::1]:1"
    assert reach.address("tcp://[::1]:7788") == ("::1", 7788)
    assert reach.origin("file", "/etc/x.toml") == "from /etc/x.toml"
    assert reach.origin("default", "/etc/x.toml") == \
        "the default; name a host with -H or [client] hosts in /etc/x.toml"
    assert reach.origin("default") == "the default; name a host with -H"


def test_the_agents_probe_answers_without_blocking_or_says_it_cannot_tell():
    """probe_now: a closed loopback port is refused at once; a name is never resolved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]            # bound, not listening: connections are refused
        assert reach.probe_now(f"tcp://127.0.0.1:{port}") == ("connect", errno.ECONNREFUSED)
        s.listen()
        assert reach.probe_now(f"tcp://127.0.0.1:{port}") is None
    assert reach.probe_now("tcp://somehost.invalid:7788") == ("untold", None)
    assert "offloadfs status" in reach.unreachable("tcp://h:1", ("untold", None))
