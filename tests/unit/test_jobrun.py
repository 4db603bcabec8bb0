"""A JobRun fed message sequences over a fake channel (no sockets, no processes)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from offloadfs import protocol
from offloadfs.channel import OffloadError
from offloadfs.client import ClientLoop
from offloadfs.jobrun import JobRun, JobSpec, Timing
from offloadfs.request import Ending, ending

from ..fakes import FakeChannel, stdio  # noqa: F401 (a fixture)


@pytest.fixture
def wake():
    """A wake-up pipe (the loop's), drained by nobody."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield w
    os.close(r)
    os.close(w)


@pytest.fixture
def run(stdio, wake):
    """Make and submit a JobRun on a fresh fake channel; every one made ends and is joined."""
    made = []

    def make(accepts=True, **kw):
        channel = FakeChannel("h1", accepts)
        spec = JobSpec(argv=[b"cat"], cwd=b"/", uid=0, gid=0, groups=[], env={})
        job = JobRun(channel, spec, stdio.fds, wake, **kw)
        made.append(job)
        job.submit()
        return job, channel

    yield make
    for job in made:
        if job.outcome is None:
            job.cancel()
            job.fail(OffloadError("test over", "cancelled", True))
        job.join()
        job.channel.close()


def feed(job: JobRun, channel: FakeChannel, kind: str, payload=None, /, **fields) -> None:
    """The host says ``kind`` about ``job``."""
    job.on_message(channel.feed(kind, job.id, payload, **fields))


def start(job, channel, window=100) -> None:
    """The host queues and starts the job."""
    feed(job, channel, "queued", position=1)
    feed(job, channel, "started", host="h1b", pid=42, window=window)


def test_a_normal_run(run, stdio):
    """submit, queued, started, output, exit: the status, the output, the host it ran on."""
    job, channel = run()
    assert channel.kinds() == ["submit"] and job.may_have_started()
    start(job, channel)
    feed(job, channel, "stdout", b"hello\n")
    feed(job, channel, "stderr", b"warn\n")
    feed(job, channel, "exit", status=3, signal=None, rusage={}, timings={"run": 0.5, "x": "?"})
    job.join()
    out = job.outcome
    assert (out.status, out.host, out.error, out.timings) == (3, "h1b", None, {"run": 0.5})
    assert stdio.read(stdio.out) == b"hello\n" and stdio.read(stdio.err) == b"warn\n"
    assert ending(out.error) == Ending.EXITED


@pytest.mark.parametrize("kind,payload,fields", [
    ("stdout", b"x", {}), ("tty", b"x", {}), ("stopped", None, {"signal": 20}),
    ("exit", None, {"status": 0, "signal": None, "rusage": {}, "timings": {}}),
])
def test_output_or_an_end_before_started_fails_that_job(run, kind, payload, fields):
    """Before ``started`` these break the protocol: cancelled, 255, may have run."""
    job, channel = run()
    feed(job, channel, "queued", position=1)
    feed(job, channel, kind, payload, **fields)
    error = job.outcome.error
    assert error.kind == "protocol" and error.started
    assert f"broke the protocol ({kind} before the job started)" in str(error)
    assert channel.kinds()[-1] == "cancel" and ending(error) == Ending.MAY_HAVE_RUN


def test_a_refusal_that_says_it_never_started(run):
    """error started=false before started: the job never ran (a fallback may run it)."""
    job, channel = run()
    feed(job, channel, "error", kind="busy", text="full", started=False)
    assert not job.outcome.error.started and ending(job.outcome.error) == Ending.NEVER_RAN
    assert str(job.outcome.error) == "h1: full; the job never ran"


@pytest.mark.parametrize("fields", [{"started": False}, {"started": True}, {}])
def test_an_error_after_started_may_have_run(run, fields):
    """After started nothing can say it never ran (started=false then is a lie)."""
    job, channel = run()
    start(job, channel)
    feed(job, channel, "error", kind="lost", text="died", **fields)
    assert job.outcome.error.started and ending(job.outcome.error) == Ending.MAY_HAVE_RUN


def test_an_error_without_the_field_may_have_run(run):
    """No ``started`` field: assume it may have run."""
    job, channel = run()
    feed(job, channel, "error", kind="x", text="y")
    assert job.outcome.error.started


def test_a_send_that_fails_never_ran(run):
    """ZeroMQ would not take the submit: nothing ran."""
    job, _ = run(accepts=False)
    assert job.outcome.error.kind == "no-host" and not job.outcome.error.started


def test_no_acknowledgement_never_ran_but_silence_after_one_may_have(run):
    """Silent past ack_timeout before any word: never ran; past liveness after: lost."""
    timing = Timing(heartbeat=100, liveness=20, ack_timeout=5)
    job, channel = run()
    channel.heard = 0.0
    job.tick(time.monotonic() + 10, timing)
    assert job.outcome.error.kind == "no-ack" and not job.outcome.error.started
    job2, channel2 = run()
    feed(job2, channel2, "queued", position=1)
    channel2.heard = 0.0
    job2.tick(time.monotonic() + 10, timing)
    assert job2.outcome is None
    job2.tick(time.monotonic() + 30, timing)
    assert job2.outcome.error.kind == "lost" and job2.outcome.error.started
    job3, channel3 = run()   # named in the host's pings: it may run, even before ``queued``
    job3.on_ping(channel3.feed("ping", jobs=[job3.id]))
    channel3.heard = 0.0
    job3.tick(time.monotonic() + 10, timing)
    assert job3.outcome is None


def test_stdin_spends_credit_and_credit_returns_it(run, stdio):
    """Stdin flows only while credit lasts; the host's credit message adds to it."""
    job, channel = run()
    start(job, channel, window=4)
    assert job.credit == 4
    os.write(stdio.stdin, b"abcdef")
    job.stdin_ready()
    assert channel.sent[-1].kind == "stdin" and bytes(channel.sent[-1].payload) == b"abcd"
    assert job.credit == 0
    feed(job, channel, "credit", n=10)
    job.stdin_ready()
    assert bytes(channel.sent[-1].payload) == b"ef" and job.credit == 8


def test_output_written_out_returns_credit_in_batches(run, stdio):
    """The caller's readers drained a batch: the host gets that much credit back."""
    job, channel = run()
    start(job, channel)
    chunk = b"x" * (protocol.CREDIT_BATCH // 2)
    sink = job.sinks["stdout"]
    for _ in range(2):
        assert "credit" not in channel.kinds()   # half a batch owed: nothing yet
        feed(job, channel, "stdout", chunk)
        got = b""
        while len(got) < len(chunk):
            got += stdio.read(stdio.out)
        deadline = time.monotonic() + 5
        while sink.written < len(chunk) and time.monotonic() < deadline:
            time.sleep(0.001)   # the sink counts a chunk just after writing it
        job.woken()
    assert [m["n"] for m in channel.sent if m.kind == "credit"] == [protocol.CREDIT_BATCH]
    assert not job.over_window()


def test_a_stop_by_a_signal_that_stops_nothing_breaks_the_protocol(run):
    """stopped by SIGINT: a protocol error, the job cancelled."""
    job, channel = run()
    start(job, channel)
    feed(job, channel, "stopped", signal=int(signal.SIGINT))
    assert "stopped by 2, which stops nothing" in str(job.outcome.error)
    assert channel.kinds()[-1] == "cancel"


def test_a_real_stop_suspends_and_continues(run):
    """stopped by SIGTSTP: suspend, the owner stops the caller; continued: resume."""
    job, channel = run()
    stops = []
    job.on_stop = stops.append
    start(job, channel)
    feed(job, channel, "stopped", signal=int(signal.SIGTSTP))
    assert stops == [signal.SIGTSTP] and channel.kinds()[-1] == "suspend"
    job.continued()
    assert channel.sent[-1].kind == "resume" and channel.sent[-1]["foreground"] is True
    assert job.outcome is None


def test_cancel_is_sent_once_the_job_is_over_no_more(run):
    """cancel tells the host until the job is final."""
    job, channel = run()
    job.cancel()
    assert channel.kinds() == ["submit", "cancel"]
    feed(job, channel, "error", kind="x", text="y", started=False)
    job.cancel()
    assert channel.kinds() == ["submit", "cancel"]


def test_an_ending_signal_before_the_start_cancels(run):
    """SIGINT while queued: cancel, and the caller dies of it as the job would have."""
    job, channel = run()
    feed(job, channel, "queued", position=1)
    job.signal(signal.SIGINT)
    assert channel.kinds()[-1] == "cancel"
    assert (job.outcome.status, job.outcome.signal, job.outcome.error) == (130, 2, None)


def test_a_second_ending_signal_gives_up(run):
    """SIGINT twice while running: forwarded once, then cancelled, outcome unknown."""
    job, channel = run()
    start(job, channel)
    job.signal(signal.SIGINT)
    assert channel.sent[-1].kind == "signal" and channel.sent[-1]["signum"] == 2
    job.signal(signal.SIGINT)
    assert job.outcome.error.kind == "cancelled" and job.outcome.error.started


def test_queued_after_started_fails_the_job(run):
    """A step the job's state does not allow breaks the protocol."""
    job, channel = run()
    start(job, channel)
    feed(job, channel, "queued", position=1)
    assert "queued" in str(job.outcome.error) and job.outcome.error.kind == "protocol"


def test_a_loop_round_routes_and_a_bad_frame_fails_the_channels_jobs(stdio, wake):
    """ClientLoop.step over fake channels: a bad frame ends that channel's job as one that
    may have run (it was submitted), the exit of the other's job is its outcome."""
    loop = ClientLoop(Timing())
    spec = JobSpec(argv=[b"cat"], cwd=b"/", uid=0, gid=0, groups=[], env={})
    bad, good = FakeChannel("bad"), FakeChannel("good")
    jobs = [JobRun(c, spec, stdio.fds, loop.wake_w) for c in (bad, good)]
    try:
        for job in jobs:
            job.submit()
            loop.add(job)
        finished = []
        loop.finished = finished.append
        bad.feed_garbage()
        good.feed("started", jobs[1].id, host="good", pid=1, window=0)
        good.feed("exit", jobs[1].id, status=0, signal=None, rusage={}, timings={})
        loop.step(0)
        assert finished == jobs and not loop.jobs
        assert jobs[0].outcome.error.started and "bad sent a bad message" in \
            str(jobs[0].outcome.error)
        assert jobs[1].outcome.status == 0 and jobs[1].outcome.error is None
    finally:
        for job in jobs:
            job.join()
        for c in (bad, good):
            c.close()
        loop.close()


@pytest.mark.parametrize("features,submitted,after_start", [
    ([protocol.STDIN_NULL], True, []),   # the daemon runs it on /dev/null: nothing to say
    ([], None, ["stdin-eof"]),           # an older daemon: its pipe is closed at the start
])
def test_a_stdin_of_dev_null_is_never_relayed(stdio, wake, features, submitted, after_start):
    """With /dev/null as stdin, the job's stdin is /dev/null on a host whose welcome offers
    ``stdin-null`` (no stdin-eof ever goes), else its end is said once, at the start."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    channel = FakeChannel("h1")
    channel.welcome = channel.feed("welcome", host="h1", commands=["cat"], slots=1,
                                   features=features)
    channel.incoming.clear()
    spec = JobSpec(argv=[b"cat"], cwd=b"/", uid=0, gid=0, groups=[], env={})
    job = JobRun(channel, spec, (null, stdio.fds[1], stdio.fds[2]), wake)
    try:
        job.submit()
        assert job.stdin_fd is None and channel.sent[0].get("stdin_null") is submitted
        start(job, channel)
        feed(job, channel, "exit", status=0, signal=None, rusage={}, timings={})
        assert channel.kinds()[1:] == after_start and job.outcome.status == 0
    finally:
        job.join()
        channel.close()
        os.close(null)
