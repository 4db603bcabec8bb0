"""The mount's agent deciding ShimRequests, over a fake host link (no sockets, no processes).

The agent's own thread is never started: the test thread calls :meth:`Agent.step` (one round
of :class:`~offloadfs.client.ClientLoop`) as the agent thread would.
"""
from __future__ import annotations

import json
import signal
import time
import types

import pytest

from offloadfs import export
from offloadfs import fs as fsmod
from offloadfs.agent import Agent
from offloadfs.channel import OffloadError
from offloadfs.config import ClientConfig
from offloadfs.fs import ShimFS
from offloadfs.registry import Registry
from offloadfs.request import ShimRequest
from offloadfs.states import HostState

from ..fakes import FakeCaller, FakeChannel, FakeLink, Stdio, stdio  # noqa: F401 (a fixture)

EXIT = {"signal": None, "rusage": {}, "timings": {"run": 0.25}}


class OutsideExport(export.Export):
    """An export whose tree the caller's cwd is not in."""

    def descriptor(self, cwd):
        """Nowhere below the root."""
        raise KeyError(cwd)


@pytest.fixture
def agent():
    """An agent with one host link (``agent.channel``) that is up and offers cat."""
    a = Agent(ClientConfig(hosts=[]), Registry(), [])
    a.channel = FakeChannel("h1")
    a.links = [FakeLink(a.channel, commands=["cat"])]
    yield a
    for job in list(a.jobs.values()):   # a test that failed half-way: end what it left
        job.cancel()
        job.fail(OffloadError("test over", "cancelled", True))
    a._reap()
    for job in a.jobs.values():
        job.join()
    for link in a.links:
        link.close()
    a.close()


def submit(agent: Agent, stdio: Stdio, policy: str = "auto") -> ShimRequest:
    """A shim's request for ``cat``, handed to the agent, and one round."""
    request = ShimRequest("cat", [b"-n"], FakeCaller(), policy, stdio.dup())
    agent.submit(request)
    agent.step(0)
    return request


def reply(request: ShimRequest) -> bytes:
    """The shim's last reply line."""
    line, last = request.next_line()
    while not last:
        line, last = request.next_line()
    return line


def counts(agent: Agent) -> dict:
    """The registry's counts for cat."""
    stats = agent.registry.stats.get("cat")
    return {k: v for k, v in stats.counts.items() if v} if stats else {}


def test_a_job_runs_and_its_shim_gets_the_status(agent, stdio):
    """Submitted on the host's channel; its exit status is the shim's."""
    request = submit(agent, stdio)
    job = request.job
    assert agent.channel.kinds(job.id) == ["submit"] and agent.links[0].in_flight == 1
    agent.channel.feed("started", job.id, host="h1", pid=7, window=0)
    agent.channel.feed("stdout", job.id, b"out\n")
    agent.channel.feed("exit", job.id, status=4, **EXIT)
    agent.step(0)
    assert reply(request) == b"4\n" and stdio.read(stdio.out) == b"out\n"
    assert counts(agent) == {"jobs": 1} and agent.links[0].in_flight == 0
    assert agent.status()["jobs"][-1]["where"] == "h1"


def test_a_jobs_moments_are_in_the_status_in_order(agent, stdio):
    """The mount's status shows when each step of a shim's job happened (bench overhead's
    breakdown reads them): handed over, dispatched, sent, finished, decided, replied."""
    request = submit(agent, stdio)
    agent.channel.feed("started", request.job.id, host="h1", pid=7, window=0)
    agent.channel.feed("exit", request.job.id, status=0, **EXIT)
    agent.step(0)
    assert reply(request) == b"\n"
    stamps = agent.status()["jobs"][-1]["stamps"]
    order = ["submitted", "dispatch", "sent", "finished", "decided", "woke", "replied"]
    assert [stamps[k] for k in order] == sorted(stamps[k] for k in order)


def test_the_status_counts_the_fuse_callbacks(agent):
    """The root's status says how many FUSE callbacks of each kind the mount served."""
    fs = ShimFS(Registry(), agent)
    fs.getattr("/")
    fs.getattr("/.ctl")
    fs.readdir("/", 0)
    ops = json.loads(fs.getxattr("/", fsmod.XATTR_STATUS))["fuse_ops"]
    assert {op: v["calls"] for op, v in ops.items()} == {"getattr": 2, "readdir": 1}


@pytest.mark.parametrize("policy,line,err,count", [
    ("auto", b"x /bin/cat\n", b"", "fallbacks"),
    ("always", b"255\n", b"offloadfs: cat: no host offering it answers (policy always); it "
                         b"never ran\n", "failures"),
])
def test_no_host_runs_locally_or_fails_closed(agent, stdio, policy, line, err, count):
    """No usable host: local under auto, a refusal under always; nothing sent."""
    agent.links[0].commands = ["convert"]
    request = submit(agent, stdio, policy)
    assert request.job is None and agent.channel.kinds() == []
    assert reply(request) == line and stdio.read(stdio.err) == err
    assert counts(agent) == {count: 1}


@pytest.mark.parametrize("policy,line", [("auto", b"x /bin/cat\n"), ("always", b"255\n")])
def test_a_job_that_never_ran_falls_back_only_under_auto(agent, stdio, policy, line):
    """The host refused it before it started: run locally under auto; always fails closed
    and says it never ran."""
    request = submit(agent, stdio, policy)
    agent.channel.feed("error", request.job.id, kind="busy", text="full", started=False)
    agent.step(0)
    assert reply(request) == line
    assert stdio.read(stdio.err) == (b"" if policy == "auto" else
                                     b"offloadfs: cat: h1: full; the job never ran\n")


def test_a_job_that_may_have_run_is_never_run_locally(agent, stdio):
    """An error once started (even one saying started=false) is a 255, never a fallback."""
    request = submit(agent, stdio)
    agent.channel.feed("started", request.job.id, host="h1", pid=7, window=0)
    agent.channel.feed("error", request.job.id, kind="lost", text="died", started=False)
    agent.step(0)
    assert reply(request) == b"255\n" and counts(agent) == {"failures": 1}
    assert b"may have run" in stdio.read(stdio.err)


def test_garbage_from_the_host_after_the_submit_may_have_run(agent, stdio):
    """A bad frame fails the channel's jobs; submitted ones may have run: no fallback."""
    request = submit(agent, stdio)
    agent.channel.feed_garbage()
    agent.step(0)
    assert reply(request) == b"255\n"
    assert stdio.read(stdio.err) == (b"offloadfs: cat: h1 sent a bad message: garbage; the job "
                                     b"may have run, its outcome is unknown\n")


def test_a_cancelled_job_is_not_run_locally(agent, stdio):
    """Cancelled before it ran (the caller is going away): no fallback."""
    request = submit(agent, stdio)
    agent.channel.feed("error", request.job.id, kind="cancelled", text="gone", started=False)
    agent.step(0)
    assert reply(request) == b"255\n"


def test_a_cwd_outside_the_export_runs_locally(agent, stdio):
    """The export cannot carry the cwd: an obstacle, local under auto."""
    agent.export = OutsideExport(export.ExportConfig(root="/nowhere"))
    request = submit(agent, stdio)
    assert request.local == "/ is outside the exported tree /nowhere"
    assert reply(request) == b"x /bin/cat\n"
    assert agent.status()["jobs"][-1]["where"] == "local"


def test_a_bug_in_one_round_costs_that_round(agent, monkeypatch):
    """An exception in a round is logged and counted; the next round runs."""
    def broken(timeout):
        raise RuntimeError("a bug")
    monkeypatch.setattr(agent, "step", broken)
    monkeypatch.setattr("time.sleep", lambda s: None)
    agent._step_safely()
    agent._step_safely()
    assert agent._failures == 2
    monkeypatch.undo()
    agent._step_safely()
    assert agent._failures == 0


def test_a_bug_ending_a_job_still_answers_its_shim(agent, stdio, monkeypatch):
    """The books fail at the job's end: the shim gets the job's outcome all the same."""
    request = submit(agent, stdio)
    monkeypatch.setattr(agent.export, "finish", lambda data: 1 / 0)
    agent.channel.feed("started", request.job.id, host="h1", pid=7, window=0)
    agent.channel.feed("exit", request.job.id, status=0, **EXIT)
    agent.step(0)
    assert reply(request) == b"\n"


@pytest.mark.parametrize("policy,line,count", [
    ("auto", b"x /bin/cat\n", "fallbacks"), ("always", b"255\n", "failures"),
    ("never", b"x /bin/cat\n", "fallbacks")])
def test_the_filesystem_decides_when_there_is_no_agent(stdio, policy, line, count):
    """ShimFS without an agent: local, or a refusal under always (fail closed)."""
    registry = Registry()
    registry.policies["cat"] = policy
    fs = ShimFS(registry, None)
    session = types.SimpleNamespace(name="cat", caller=FakeCaller(), args=b"/m/cat\x000\x00",
                                    take_stdio=stdio.dup, stamps={})
    request = fs._start(session)
    assert reply(request) == line and registry.stats["cat"].counts[count] == 1
    if policy == "always":
        assert stdio.read(stdio.err) == (b"offloadfs: cat: the agent is not running (policy "
                                         b"always); it never ran\n")


@pytest.mark.parametrize("policy, local", [("auto", True), ("always", False)])
def test_a_request_left_waiting_when_the_mount_stops(agent, stdio, policy, local):
    """A request never sent when the mount stops runs locally under auto, fails closed under
    always (it never ran)."""
    request = ShimRequest("cat", [], FakeCaller(), policy, stdio.dup())
    agent.submit(request)
    agent._release_waiting()
    reply(request)   # the FUSE side: closes its fds
    assert (request.local, request.refusal) == (
        ("the offloadfs mount is stopping", None) if local else
        (None, "the offloadfs mount is stopping (policy always); it never ran"))


WELCOME = {"host": "h1", "commands": ["cat"], "slots": 1, "tags": [], "busy": 0, "queued": 0}


def test_a_request_waits_for_a_host_first_answer(agent, stdio):
    """Right after the mount starts (a persisted always policy lists the shim before any host
    answered), the request waits for the host's welcome and then runs there."""
    link = agent.links[0]
    link.state, link.commands = HostState.UNKNOWN, []
    request = submit(agent, stdio, "always")
    assert request.job is None and not request.decided and list(agent.waiting) == [request]
    agent.channel.feed("welcome", **WELCOME)
    agent.step(0)
    job = request.job
    assert job is not None and agent.channel.kinds(job.id) == ["submit"] and agent.waiting == {}
    agent.channel.feed("started", job.id, host="h1", pid=7, window=0)
    agent.channel.feed("exit", job.id, status=0, **EXIT)
    agent.step(0)
    assert reply(request) == b"\n"


@pytest.mark.parametrize("state, age", [(HostState.UNKNOWN, 6.0), (HostState.DEAD, 0.0)])
def test_a_request_gives_up_past_the_bound_or_on_a_refused_host(agent, stdio, state, age):
    """A host silent past the connect timeout, or whose first connection was refused:
    no host answers (always: 255, it never ran)."""
    link = agent.links[0]
    link.commands = []
    link.state, link.since = state, time.monotonic() - age
    request = submit(agent, stdio, "always")
    assert reply(request) == b"255\n" and agent.waiting == {}
    assert b"no host offering it answers" in stdio.read(stdio.err)


def test_a_waiting_request_gives_up_when_the_bound_passes(agent, stdio, monkeypatch):
    """Waiting, then the connect timeout passes without an answer: local under auto."""
    link = agent.links[0]
    link.state, link.commands = HostState.UNKNOWN, []
    request = submit(agent, stdio)
    assert list(agent.waiting) == [request]
    link.since -= agent.config.connect_timeout
    agent.step(0)
    assert reply(request) == b"x /bin/cat\n" and agent.waiting == {}


def test_the_mount_warns_once_when_no_host_answers(agent, caplog):
    """All hosts refused their first connection: one warning naming each and why."""
    link = agent.links[0]
    link.state, link.failure = HostState.DEAD, "connection refused"
    agent.step(0)
    agent.step(0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["no host reachable yet (tried h1:1: connection refused); jobs run "
                        "locally under auto, exit 255 under always"]


def test_a_caller_interrupted_while_waiting_ends_at_once(agent, stdio, monkeypatch):
    """Ctrl-C while the request waits for a host's first answer: it dies of SIGINT now,
    nothing sent, nothing run locally."""
    link = agent.links[0]
    link.state, link.commands = HostState.UNKNOWN, []
    request = submit(agent, stdio, "always")
    monkeypatch.setattr("offloadfs.agent.pending_signals", lambda pid: {signal.SIGINT})
    agent.step(0)
    assert reply(request) == b"s INT\n" and agent.waiting == {}
    assert agent.channel.kinds() == [] and request.local is None
