"""Faults around the broker: a job that may have started is never run again, and whoever tells
a client so says it (``started``); hosts kill what a lost broker gave them; a restarted
broker's job ids never meet its previous life's on a host."""
from __future__ import annotations

import contextlib
import re
import select
import signal
import subprocess
import time

import pytest
import zmq
from offloadd.worker import BrokerLink

from offloadfs import protocol

from ..harness import OFFLD, alive, wait_for
from .test_broker import _submit, offld, wire  # noqa: F401 (fixtures)
from .test_operations import METRICS_AT, jobs_counted, scrape

MAY_HAVE_RUN = "the job may have run, its outcome is unknown"


def _fake_host(broker, wire, name="fake", slots=1):
    """A fake host announced at ``broker``."""
    host = wire.peer(broker.workers)
    host.send("ready", host=name, commands=["sh"], slots=slots)
    wait_for(lambda: f"host {name} ready: " in broker.log(), 20, "the fake host")
    return host


def _started(broker, wire, host, job: str):
    """A fake client whose ``job`` the fake ``host`` took and started: (client, its submit
    as the host got it)."""
    client = wire.peer(broker.clients, jobs=[job])
    _submit(client, job)
    submit = wire.expect(host, "submit")
    host.send("started", submit.job, host="fake", pid=100, window=1 << 20)
    wire.expect(client, "started", job)
    return client, submit


def _drop(wire, peer) -> None:
    """Close a fake peer at once: it dies without a word."""
    wire.peers.remove(peer)
    peer.sock.close(linger=0)


@pytest.mark.parametrize("how", ["closes its socket", "falls silent"])
def test_a_host_that_takes_a_job_and_dies_makes_the_error_say_started(start_broker, wire, how):
    """Like ../shared/acceptance/data/fakeworker.py: the host takes the job and dies before its
    ``started`` is sent; the client still believes the job queued, and must not run it
    locally: the broker's error says started, and why."""
    broker = start_broker()
    host = _fake_host(broker, wire)
    client = wire.peer(broker.clients, jobs=["j1"])
    _submit(client, "j1")
    wire.expect(host, "submit")
    if how == "closes its socket":
        _drop(wire, host)
    else:
        host.quiet = True
    begun = time.monotonic()
    error = wire.expect(client, "error", "j1")
    assert error["kind"] == "host-lost" and error["started"] is True
    assert "was sent to host fake, which was lost" in error["text"]
    assert MAY_HAVE_RUN in error["text"]
    assert time.monotonic() - begun < 6
    assert not [m for m in client.got if m.kind == "started"]


def test_a_job_no_host_offers_never_ran(start_broker, wire):
    """No host offers the command: the error says the job never ran (a local run is safe)."""
    broker = start_broker()
    _fake_host(broker, wire)
    client = wire.peer(broker.clients, jobs=["j1"])
    client.send("submit", "j1", argv=[b"convert", b"x"], cwd=b"/", uid=0, gid=0, groups=[],
                env={}, window=1 << 20)
    error = wire.expect(client, "error", "j1")
    assert error["kind"] == "no-host" and error["started"] is False
    assert "never ran" in error["text"]


def test_broker_stop_says_which_jobs_never_ran_and_cancels_the_others(start_broker, wire):
    """SIGTERM with one job on a host and one queued: the queued one never ran; the other may
    have, and its host is told to kill it."""
    broker = start_broker()
    host = _fake_host(broker, wire)
    client, submit = _started(broker, wire, host, "run")
    _submit(client, "wait")
    client.ping = {"jobs": ["run", "wait"]}
    wire.expect(client, "queued", "wait")
    broker.proc.send_signal(signal.SIGTERM)
    ran = wire.expect(client, "error", "run")
    waited = wire.expect(client, "error", "wait")
    assert ran["started"] is True and MAY_HAVE_RUN in ran["text"], ran.fields
    assert "sent to host fake" in ran["text"]
    assert waited["started"] is False and "never ran" in waited["text"], waited.fields
    wire.expect(host, "cancel", submit.job)
    assert broker.proc.wait(15) == 0


def test_a_restarted_broker_numbers_jobs_afresh_and_says_old_ones_may_have_run(
        start_broker, wire):
    """kill -9 of the broker, a new one on its ports: the host re-announces and gets wire ids
    unlike the old life's; the client's ping for its old job is told it may have run."""
    first = start_broker()
    host = _fake_host(first, wire)
    client, old = _started(first, wire, host, "old")
    first.proc.kill()
    first.proc.wait(15)
    second = start_broker(clients=first.clients, workers=first.workers)
    assert wire.expect(host, "error", timeout=30)["kind"] == "reannounce"
    host.send("ready", host="fake", commands=["sh"], slots=1)
    error = wire.expect(client, "error", "old", timeout=30)
    assert error["kind"] == "unknown-job" and error["started"] is True, error.fields
    assert f"the broker restarted; {MAY_HAVE_RUN}" in error["text"]
    client.ping = {"jobs": ["new"]}
    _submit(client, "new")
    new = wire.expect(host, "submit")
    assert new.job != old.job and len(new.job) <= protocol.JOB_ID_MAX
    assert new.job.split("-")[0] != old.job.split("-")[0]   # a per-life prefix
    assert " ready: " in second.log()


@contextlib.contextmanager
def _running_job(broker, start_daemon, tmp_path, work):
    """A host at ``broker`` running, for an ``offld -L`` client, a job that wrote its pid and
    sleeps long: yields (host, client process, job pid); the client is killed if still there
    at the end."""
    host = start_daemon("--connect", broker.workers, "--slots", "1")
    wait_for(lambda: " ready: " in broker.log(), 20, "the host to be ready")
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--", "sh", "-c",
                             f"echo $$ > {pidfile}; exec sleep 60"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
                           "the job to start"))
        yield host, proc, pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_job_running_across_a_broker_restart_ends_255_and_dies_on_its_host(
        start_broker, start_daemon, tmp_path, work, how):
    """The broker dies (or stops) under a running job and comes back on its ports: the
    client exits 255 with a line saying the job may have run, the host kills the job within a
    bound, and new jobs run through the new broker (no "already known")."""
    first = start_broker()
    with _running_job(first, start_daemon, tmp_path, work) as (host, proc, pid):
        if how == "kill -9":
            first.proc.kill()
        else:
            first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(15)
        second = start_broker(clients=first.clients, workers=first.workers)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255 and err.count(b"\n") == 1, err
    assert MAY_HAVE_RUN.encode() in err, err
    wait_for(lambda: not alive(pid), 10, "the job to be killed on its host")
    assert re.search(r"job \S+ \(sh\) killed: ", host.log()), host.log()
    wait_for(lambda: " ready: " in second.log(), 30, "the host to announce itself again")
    got = offld(second, "sh", "-c", "echo two", cwd=work)
    assert (got.returncode, got.stdout) == (0, b"two\n"), got.stderr
    assert b"already known" not in got.stderr and "already known" not in host.log()


def test_a_job_whose_broker_is_gone_for_good_dies_on_its_host(start_broker, start_daemon,
                                                              tmp_path, work):
    """kill -9 of the broker and no new one: the host kills the job once the broker has been
    silent past its liveness (3 heartbeats), and the client gives up with 255."""
    broker = start_broker()
    with _running_job(broker, start_daemon, tmp_path, work) as (_, proc, pid):
        broker.proc.kill()
        broker.proc.wait(15)
        killed = time.monotonic()
        wait_for(lambda: not alive(pid), 10, "the job to be killed on its host")
        assert time.monotonic() - killed < 8
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 255 and err.count(b"\n") == 1, err


# --- the host's link: what counts as a new broker life --------------------------------------

class FakeBroker:
    """A ROUTER a BrokerLink connects to; the test speaks for the broker by hand."""

    def __init__(self, ctx):
        """Bind an ephemeral loopback port."""
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer = None

    def got(self) -> list[str]:
        """The kinds of what has come from the link so far."""
        kinds = []
        while self.sock.poll(200, zmq.POLLIN):
            frames = self.sock.recv_multipart()
            self.peer = frames[0]
            kinds.append(protocol.decode(frames[1:]).kind)
        return kinds

    def say(self, what: str) -> None:
        """Send ``ping``, or ``reannounce`` (the error a broker that does not know us sends)."""
        frames = (protocol.encode("ping") if what == "ping" else
                  protocol.encode("error", kind="reannounce", text="who are you?"))
        self.sock.send_multipart([self.peer] + frames)


def _serve(link: BrokerLink) -> list[str]:
    """What the server does with what the link receives: take it in; answer a reannounce
    with the announcement. Returns the kinds taken in."""
    kinds = []
    while link.sock.poll(500, zmq.POLLIN):
        msg = protocol.decode(link.sock.recv_multipart())
        link.received()
        kinds.append(msg.kind)
        if msg.kind == "error" and msg["kind"] == "reannounce":
            link.send(READY)
    return kinds


READY = protocol.encode("ready", host="h", commands=["sh"], slots=1)


@pytest.fixture
def ctx():
    """A ZeroMQ context, ended at teardown."""
    c = zmq.Context()
    yield c
    c.term()


def test_the_link_reports_its_jobs_lost_when_the_broker_forgets_it(ctx):
    """A reannounce (the broker does not know us) holds the announcement until the next tick,
    which sends it and reports the jobs lost; a stale reannounce (an answer to what we sent
    before the broker heard our announcement) is ignored; after the broker spoke, a new
    reannounce counts again."""
    broker = FakeBroker(ctx)
    link = BrokerLink(ctx, broker.endpoint, liveness=3.0)
    try:
        link.send(READY)
        assert broker.got() == ["ready"]
        broker.say("ping")
        assert _serve(link) == ["ping"]
        assert link.tick(time.monotonic(), READY, ["1"]) is False
        assert broker.got() == ["ping"]
        broker.say("reannounce")                                # a new broker life
        broker.say("reannounce")
        assert _serve(link) == ["error", "error"]
        assert broker.got() == []                               # held until the tick
        assert link.tick(time.monotonic(), READY, ["1"]) is True
        assert broker.got() == ["ready"]
        broker.say("reannounce")                                # stale: before our ready
        _serve(link)
        assert broker.got() == []
        assert link.tick(time.monotonic(), READY, []) is False
        assert broker.got() == ["ping"]
        broker.say("ping")                                      # the broker knows us now
        broker.say("reannounce")                                # ... and forgot us again
        _serve(link)
        assert link.tick(time.monotonic(), READY, ["2"]) is True
        assert broker.got() == ["ready"]
    finally:
        link.close()
        broker.sock.close(linger=0)


def test_a_lost_clients_job_frees_its_hosts_slot_at_the_broker(start_broker, start_daemon,
                                                                  work):
    """A client killed mid-job: the broker has the host kill it, and once the host says it is
    gone the slot takes the next job (it used to stay busy for good); the broker counts it
    lost, once."""
    broker = start_broker(args=["--metrics", "127.0.0.1:0"])
    start_daemon("--connect", broker.workers, "--slots", "1", listen=False)
    broker.wait_hosts(1)
    front = f"127.0.0.1:{broker.client_port}"
    lost = subprocess.Popen([OFFLD, "-L", front, "--", "sh", "-c", "echo started; exec sleep 60"],
                            cwd=work, stdout=subprocess.PIPE)
    try:
        assert select.select([lost.stdout], [], [], 20)[0], "the job did not start"
        assert lost.stdout.readline() == b"started\n"
        lost.kill()
        lost.wait(20)
    finally:
        lost.stdout.close()
    got = subprocess.run([OFFLD, "-L", front, "--", "sh", "-c", "echo next"], cwd=work,
                         capture_output=True, timeout=60)
    assert got.returncode == 0 and got.stdout == b"next\n", got.stderr
    assert jobs_counted(scrape(broker.ready_log(METRICS_AT).group(1)), "broker") == {
        ("sh", "lost"): 1, ("sh", "done"): 1}
