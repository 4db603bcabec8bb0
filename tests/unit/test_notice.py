"""The queue notice's rule (offloadfs.notice.WaitNotice), fed positions and times, no I/O."""
from __future__ import annotations

import os

from offloadfs import notice
from offloadfs.notice import WaitNotice

LINE = b"\roffld: waiting for a slot on gpu1:7788 (position %d)\x1b[K"


def rule() -> WaitNotice:
    """A notice for a job queued on gpu1:7788, shown after 1 s."""
    return WaitNotice("offld", notice.place("tcp://gpu1:7788", broker=False), delay=1.0)


def test_a_short_wait_shows_nothing():
    """Queued, then started within the delay: nothing is written, not even an erasure."""
    n = rule()
    assert n.queued(10.0, 3) == b"" and n.tick(10.9) == b"" and n.clear() == b""


def test_a_long_wait_shows_one_line_that_updates_and_is_erased():
    """After the delay the line appears; a new position rewrites it in place; the start
    erases it (the job's output then begins on a clean line); nothing more after."""
    n = rule()
    assert n.queued(10.0, 3) == b""
    assert n.tick(11.0) == LINE % 3
    assert n.tick(11.5) == b""                      # unchanged: nothing rewritten
    assert n.queued(12.0, 2) == LINE % 2
    assert n.clear() == b"\r\x1b[K"
    assert n.tick(20.0) == b"" and n.clear() == b""


def test_the_delay_counts_from_the_first_position():
    """Position updates do not restart the wait."""
    n = rule()
    n.queued(10.0, 3)
    assert n.queued(10.6, 2) == b"" and n.queued(11.1, 1) == LINE % 1


def test_through_a_broker_the_notice_says_so():
    """A broker's queue: "via broker"."""
    n = WaitNotice("offld", notice.place("tcp://b1:7790", broker=True), delay=0)
    assert n.queued(0.0, 1) == b"\roffld: waiting for a slot via broker b1:7790 (position 1)\x1b[K"


def test_no_notice_on_a_pipe_or_when_quiet():
    """Only a terminal gets notices, and never with -q."""
    r, w = os.pipe()
    try:
        assert notice.at_terminal(w, "offld", "on h:1", quiet=False) is notice.SILENT
    finally:
        os.close(r)
        os.close(w)
    master, slave = os.openpty()
    try:
        assert isinstance(notice.at_terminal(slave, "offld", "on h:1", quiet=False),
                          notice.TerminalNotice)
        assert notice.at_terminal(slave, "offld", "on h:1", quiet=True) is notice.SILENT
    finally:
        os.close(master)
        os.close(slave)


def test_the_mount_names_what_each_host_said():
    """The warning of a mount whose hosts all failed their first connection."""
    assert notice.unreachable([("tcp://gpu1:7788", "connection refused"), ("tcp://gpu2:7788", "")],
                              5.0) == (
        "no host reachable yet (tried gpu1:7788: connection refused; gpu2:7788: no answer "
        "within 5s); jobs run locally under auto, exit 255 under always")


def test_no_notice_while_the_caller_is_in_the_background():
    """A caller in its terminal's background (`offld ... &`) gets no notice, and no erasure
    of the shell's line; once in the foreground it does."""
    n = rule()
    assert n.queued(10.0, 3, front=False) == b"" and n.tick(11.5, front=False) == b""
    assert n.clear() == b""
    n.queued(20.0, 1)
    assert n.tick(21.0, front=False) == b"" and n.tick(21.5) == LINE % 1


def test_a_wait_for_the_hosts_first_answer_then_for_a_slot():
    """Right after the mount started: the hosts not heard yet, then (once one answered and
    queued the job) the queue position, in the same line."""
    n = WaitNotice("offloadfs", "on gpu1:7788", delay=1.0)
    assert n.connecting(10.0, ["tcp://gpu1:7788", "tcp://gpu2:7788"]) == b""
    assert n.connecting(11.0, ["tcp://gpu1:7788", "tcp://gpu2:7788"]) == \
        b"\roffloadfs: waiting for gpu1:7788, gpu2:7788 to answer\x1b[K"
    assert n.queued(11.2, 2) == b"\roffloadfs: waiting for a slot on gpu1:7788 (position 2)\x1b[K"


def test_brokers_given_on_the_command_line_are_named_as_brokers():
    """offld.brokers, which offld and the mount's agent both use: -L's endpoints when flags
    are given (the config's brokers then do not count), else the config's."""
    from types import SimpleNamespace

    from offloadfs import offld
    cfg = SimpleNamespace(brokers=["tcp://cb:7789"])
    both = SimpleNamespace(load_balancer=["lb:7789"], host=["h1"])
    assert offld.brokers(both, cfg) == ["tcp://lb:7789"]
    assert offld.brokers(SimpleNamespace(load_balancer=None, host=["h1"]), cfg) == []
    assert offld.brokers(SimpleNamespace(load_balancer=None, host=None), cfg) == cfg.brokers
    assert notice.place("tcp://lb:7789", True) == "via broker lb:7789"
