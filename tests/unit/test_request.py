"""The one local-or-remote rule (offloadfs.request.decide) as a table, and ShimRequest's reply."""
from __future__ import annotations

import types

import pytest

from offloadfs import request as rules
from offloadfs.channel import OffloadError
from offloadfs.jobrun import Outcome
from offloadfs.request import FAIL, LOCAL, REMOTE, Decision, Ending, ShimRequest, decide, ending

from ..fakes import FakeCaller, stdio  # noqa: F401 (a fixture)

E = Ending
ALWAYS_NEVER_RAN = "{} (policy always)"

# (policy, facts) -> (route, reason): before the job is sent anywhere.
BEFORE = [
    ("auto", {}, REMOTE, ""),
    ("always", {}, REMOTE, ""),
    ("never", {}, LOCAL, "policy never"),
    ("never", {"agent": False, "stdio": False, "host": False}, LOCAL, "policy never"),
    ("auto", {"agent": False}, LOCAL, rules.AGENT_DOWN),
    ("always", {"agent": False}, FAIL, ALWAYS_NEVER_RAN.format(rules.AGENT_DOWN)),
    ("auto", {"stdio": False}, LOCAL, rules.NO_STDIO),
    ("always", {"stdio": False}, FAIL, ALWAYS_NEVER_RAN.format(rules.NO_STDIO)),
    ("auto", {"agent": False, "stdio": False}, LOCAL, rules.AGENT_DOWN),   # the first reason
    ("auto", {"host": False}, LOCAL, rules.NO_HOST),
    ("always", {"host": False}, FAIL, ALWAYS_NEVER_RAN.format(rules.NO_HOST)),
    ("auto", {"obstacle": "the export is down: x"}, LOCAL, "the export is down: x"),
    ("always", {"obstacle": "the export is down: x"}, FAIL,
     ALWAYS_NEVER_RAN.format("the export is down: x")),
    ("auto", {"host": False, "obstacle": "later"}, LOCAL, rules.NO_HOST),
]

# (policy, how the job ended) -> route: local only when it provably never ran, under auto.
AFTER = [
    ("auto", E.EXITED, REMOTE),
    ("auto", E.NEVER_RAN, LOCAL),
    ("auto", E.MAY_HAVE_RUN, REMOTE),
    ("auto", E.CANCELLED, REMOTE),
    ("always", E.EXITED, REMOTE),
    ("always", E.NEVER_RAN, REMOTE),    # fails closed: the job's error says it never ran
    ("always", E.MAY_HAVE_RUN, REMOTE),
    ("always", E.CANCELLED, REMOTE),
]


@pytest.mark.parametrize("policy,facts,route,reason", BEFORE)
def test_before_the_job(policy, facts, route, reason):
    """Policy first, then the first thing in the way; always fails closed."""
    assert decide(policy, **facts) == Decision(route, reason)


@pytest.mark.parametrize("policy,ended,route", AFTER)
def test_after_the_job(policy, ended, route):
    """A job ended: the error's text is the fallback's reason."""
    got = decide(policy, ended=ended, error="h1: refused; the job never ran")
    assert got.route == route
    assert got.reason == ("h1: refused; the job never ran" if route == LOCAL else "")


@pytest.mark.parametrize("error,expected", [
    (None, E.EXITED),
    (OffloadError("refused", "busy", False), E.NEVER_RAN),
    (OffloadError("lost", "lost", True), E.MAY_HAVE_RUN),
    (OffloadError("the caller went away", "cancelled", True), E.CANCELLED),
    (OffloadError("gave up", "cancelled", False), E.CANCELLED),   # never a fallback
    (OffloadError("stopping", "shutdown", True), E.MAY_HAVE_RUN),
])
def test_ending_of_an_error(error, expected):
    """The error's ``started`` says never ran or may have run; ours (cancelled) apart."""
    assert ending(error) == expected


def test_texts_and_counts():
    """A refusal says it never ran and counts as a failure; a fallback counts as one."""
    fail, local = Decision(FAIL, "x (policy always)"), Decision(LOCAL, "x")
    assert fail.text == "x (policy always); it never ran" and fail.counted == "failures"
    assert local.text == "x" and local.counted == "fallbacks"


def _request(stdio, policy="auto", **caller) -> ShimRequest:
    """A request for ``cat`` whose stdio are duplicates of ``stdio``'s."""
    return ShimRequest("cat", [b"-n"], FakeCaller(**caller), policy, stdio.dup())


def test_a_local_decision_execs_the_local_command(stdio):
    """LOCAL: the shim execs what PATH finds after the mount; debug says why."""
    r = _request(stdio, debug=True)
    r.decide(decide("never"))
    assert r.next_line() == (b"x /bin/cat\n", True) and r.stdio is None
    assert stdio.read(stdio.err) == b"offloadfs: cat: running locally (policy never): /bin/cat\n"


def test_a_local_decision_without_a_local_command(stdio):
    """No local command: 127 and one line."""
    r = _request(stdio, local=None)
    r.decide(decide("auto", host=False))
    assert r.next_line() == (b"127\n", True)
    assert stdio.read(stdio.err) == (b"offloadfs: cat: no host offering it answers, and there "
                                     b"is no local cat on PATH\n")


def test_a_refusal_fails_closed(stdio):
    """FAIL: 255 and the refusal on the caller's stderr."""
    r = _request(stdio, policy="always")
    r.decide(decide("always", agent=False))
    assert r.decided and r.next_line() == (b"255\n", True)
    assert stdio.read(stdio.err) == (b"offloadfs: cat: the agent is not running (policy "
                                     b"always); it never ran\n")


def test_lines_before_the_outcome(stdio):
    """Emitted lines come first, then the outcome's status (or signal)."""
    r = _request(stdio)
    r.emit(b"t 500:5:bf:8a3b\n")
    r.decide_outcome(Outcome(0, "h1", signal=2))
    assert r.next_line() == (b"t 500:5:bf:8a3b\n", False)
    assert r.next_line() == (b"s INT\n", True)


@pytest.mark.parametrize("kind, started, execs", [
    ("nohost", False, True), ("nohost", True, False), ("cancelled", False, False)])
def test_offld_falls_back_only_when_the_job_never_ran(monkeypatch, kind, started, execs):
    """``offld --fallback`` execs the local command for a job that never ran, not for one that
    may have run, nor for one the caller gave up on (a Ctrl-C before its start)."""
    from offloadfs import offld
    calls = []
    monkeypatch.setattr(offld.os, "execv", lambda *a: calls.append(a))
    opts = types.SimpleNamespace(fallback="/bin/true")
    say = types.SimpleNamespace(debug=lambda text: None, error=lambda text: None)
    offld.fall_back(["true"], opts, OffloadError("x", kind, started), say)
    assert bool(calls) == execs
