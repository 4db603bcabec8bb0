"""Faults of the host: what a client is told when its job is refused, killed or stopped with
the daemon (whether the job may have started: a job that may have started is never run again
anywhere), and that kill -9 of offloadd leaves no job running unsupervised, nor a restarted
daemon running more than its slots beside leftovers.

Jobs are hand-made submits over a raw DEALER socket, so that the replies can be read as sent.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import zmq
from offloadd import warden

from offloadfs import protocol

from ..harness import OFFLD, alive, offld, state_of, wait_for

TTY = {"fds": 7, "rows": 24, "cols": 80, "xpixel": 0, "ypixel": 0, "iflag": 0x500,
       "oflag": 5, "cflag": 0xbf, "lflag": 0x8a3b, "ispeed": 15, "ospeed": 15,
       "cc": bytes(range(32)), "foreground": True}
LEAVES_A_CHILD = [b"sh", b"-c", b"sleep 60 & sleep 60"]   # the background sleep: a grandchild


class Wire:
    """A raw client: a DEALER socket connected to a daemon."""

    def __init__(self, daemon):
        """Connect to ``daemon``."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(daemon.endpoint)
        self.kept: list[protocol.Message] = []

    def submit(self, job: str, argv: list[bytes], cwd: Path, env=None, **extra) -> None:
        """Submit ``argv`` as root in ``cwd``."""
        self.sock.send_multipart(protocol.encode(
            "submit", job, argv=argv, cwd=os.fsencode(cwd), uid=0, gid=0, groups=[],
            env=env or {}, window=1 << 20, **extra))

    def queued(self) -> int:
        """How many jobs wait in the daemon's queue (a status round trip)."""
        self.sock.send_multipart(protocol.encode("status"))
        while True:
            assert self.sock.poll(20000), "no status-reply"
            msg = protocol.decode(self.sock.recv_multipart())
            if msg.kind == "status-reply":
                return msg["queued"]
            self.kept.append(msg)

    def until(self, job: str, *kinds: str, timeout: float = 20) -> protocol.Message:
        """The first message about ``job`` of one of ``kinds`` not taken yet (the others
        are kept for later calls)."""
        for i, msg in enumerate(self.kept):
            if msg.job == job and msg.kind in kinds:
                return self.kept.pop(i)
        while True:
            assert self.sock.poll(timeout * 1000), f"no {kinds} for {job} within {timeout}s"
            msg = protocol.decode(self.sock.recv_multipart())
            if msg.job == job and msg.kind in kinds:
                return msg
            self.kept.append(msg)

    def close(self) -> None:
        """Close the socket and its context."""
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def wire_to():
    """Factory for raw clients, closed at teardown."""
    wires: list[Wire] = []

    def connect(daemon) -> Wire:
        wires.append(Wire(daemon))
        return wires[-1]

    yield connect
    for w in wires:
        w.close()


@pytest.fixture
def state(tmp_path) -> Path:
    """The daemon's state directory (job records)."""
    return tmp_path / "state-jobs"


def processes_in(cwd: Path) -> dict[int, str]:
    """Processes (not zombies) whose working directory is ``cwd``: the jobs' processes."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not alive(int(entry)):
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") != str(cwd):
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found[int(entry)] = cmd.decode(errors="replace").strip()
    return found


def sleeps_in(cwd: Path) -> list[int]:
    """Pids of the ``sleep 60`` processes running in ``cwd``."""
    return [pid for pid, cmd in processes_in(cwd).items() if cmd == "sleep 60"]


def children_of(pid: int) -> dict[int, str]:
    """The children of ``pid`` and their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if entry.isdigit() and int(stat[1]) == pid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return found


def warden_of(daemon) -> int:
    """The pid of the daemon's warden (waits for it: it starts beside the loop)."""
    return wait_for(lambda: next((p for p, c in children_of(daemon.proc.pid).items()
                                  if "warden.py" in c), None), 10, "the warden")


def freeze_and_kill(daemon, kill_warden: bool) -> None:
    """kill -9 the daemon (with ``kill_warden``, its warden first: the daemon is stopped
    meanwhile, so that it cannot start another)."""
    if kill_warden:
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        pid = warden_of(daemon)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10, "the warden to die")
    daemon.proc.kill()
    daemon.proc.wait(10)


# --- (i) refused and killed jobs --------------------------------------------------------------

def test_a_refused_submit_says_the_job_never_started(start_daemon, wire_to, work):
    """A command not on the allowlist and a cwd missing on the host are refused before any
    spawn: started is False (the client may run it elsewhere)."""
    daemon = start_daemon("--client-timeout", "60")
    wire = wire_to(daemon)
    wire.submit("j1", [b"rm", b"-rf", b"x"], work)
    err = wire.until("j1", "error", "exit")
    assert err.kind == "error" and err["started"] is False, err
    wire.submit("j2", [b"true"], work / "nowhere")
    err = wire.until("j2", "error", "exit")
    assert (err.kind, err["kind"], err["started"]) == ("error", "cwd", False), err
    assert "no such directory" in err["text"]


def test_a_job_killed_past_a_limit_says_it_started(start_daemon, wire_to, work):
    """Output past the host's limit kills the job: an error of kind limit, started True."""
    daemon = start_daemon("--client-timeout", "60", "--limit", "output=1K")
    wire = wire_to(daemon)
    wire.submit("j1", [b"head", b"-c", b"1M", b"/dev/zero"], work)
    err = wire.until("j1", "error", "exit")
    assert (err.kind, err["kind"], err["started"]) == ("error", "limit", True), err


def test_a_duplicate_and_an_unknown_job_may_have_started(start_daemon, wire_to, work):
    """A second submit of a running job's id names that job, which runs: started True; so
    does a ping for a job the host does not know (it may have run and ended)."""
    daemon = start_daemon("--client-timeout", "60")
    wire = wire_to(daemon)
    wire.submit("j1", [b"sleep", b"60"], work)
    wire.until("j1", "started")
    wire.submit("j1", [b"sleep", b"60"], work)
    err = wire.until("j1", "error")
    assert (err["kind"], err["started"]) == ("duplicate", True), err
    wire.sock.send_multipart(protocol.encode("ping", jobs=["gone"]))
    err = wire.until("gone", "error")
    assert (err["kind"], err["started"]) == ("unknown-job", True), err
    wire.sock.send_multipart(protocol.encode("cancel", "j1"))
    wait_for(lambda: not processes_in(work), 10, "the job to be killed")


# --- (ii) SIGTERM of the daemon ---------------------------------------------------------------

def test_sigterm_tells_a_queued_job_it_never_ran_and_a_running_one_it_was_killed(
        start_daemon, wire_to, work):
    """One slot, one job running, one queued; SIGTERM: the queued one gets "never ran" with
    started False, the running one "was killed" with started True, and nothing is left."""
    daemon = start_daemon("--client-timeout", "60", "--slots", "1")
    wire = wire_to(daemon)
    wire.submit("run", [b"sleep", b"60"], work)
    wire.until("run", "started")
    wire.submit("wait", [b"sleep", b"60"], work)
    wire.until("wait", "queued")
    daemon.proc.send_signal(signal.SIGTERM)
    queued, running = wire.until("wait", "error"), wire.until("run", "error")
    assert (queued["kind"], queued["started"]) == ("shutdown", False), queued
    assert queued["text"].endswith("stopped; the job never ran"), queued
    assert (running["kind"], running["started"]) == ("shutdown", True), running
    assert running["text"].endswith("stopped; the job was killed"), running
    assert daemon.proc.wait(15) == 0
    assert not processes_in(work)


def test_offld_says_a_queued_job_never_ran(start_daemon, wire_to, work):
    """The same through offld: its job queued behind another, the daemon stops; offld
    exits 255 with one line saying the job never ran."""
    daemon = start_daemon("--slots", "1", "--client-timeout", "60")
    wire = wire_to(daemon)
    wire.submit("run", [b"sleep", b"60"], work)
    wire.until("run", "started")
    client = subprocess.Popen([OFFLD, "-H", daemon.hostport, "--", "true"], cwd=work,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: wire.queued() == 1, 20, "the offld job to be queued")
        daemon.proc.send_signal(signal.SIGTERM)
        _, err = client.communicate(timeout=20)
        assert daemon.proc.wait(15) == 0
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 255 and err.count(b"\n") == 1, err
    assert b"the job never ran" in err, err


# --- (iii) kill -9 of the daemon --------------------------------------------------------------

def test_kill_9_leaves_no_process_of_a_job(start_daemon, wire_to, work, state):
    """kill -9 of offloadd while a job and its background child run: the job dies with it
    (parent death signal), the child with the warden's kill of the group, within seconds;
    the warden says so in the daemon's log and removes the record."""
    daemon = start_daemon("--client-timeout", "60", "--state-dir", str(state))
    wire = wire_to(daemon)
    wire.submit("j1", LEAVES_A_CHILD, work)
    wire.until("j1", "started")
    wait_for(lambda: len(sleeps_in(work)) == 2, 10, "both sleeps")
    assert len(os.listdir(state)) == 1
    freeze_and_kill(daemon, kill_warden=False)
    wait_for(lambda: not processes_in(work), 5, "the job's processes to die")
    wait_for(lambda: "killed process group" in daemon.log(), 5, "the warden's line")
    assert os.listdir(state) == []


@pytest.mark.parametrize("foreground", [True, False])
def test_kill_9_leaves_no_process_of_a_terminal_job(start_daemon, wire_to, work, state,
                                                    foreground):
    """The same with a terminal, and without the warden: the session leader (ptyleader.py)
    kills the job's group when offloadd dies (in the background of its pty too, where the
    kernel's SIGHUP for the foreground group at the leader's end would not reach it)."""
    daemon = start_daemon("--client-timeout", "60", "--state-dir", str(state))
    wire = wire_to(daemon)
    wire.submit("j1", LEAVES_A_CHILD, work, tty=TTY | {"foreground": foreground},
                env={b"TERM": b"xterm"})
    wire.until("j1", "started")
    wait_for(lambda: len(sleeps_in(work)) == 2, 10, "both sleeps")
    freeze_and_kill(daemon, kill_warden=True)
    wait_for(lambda: not processes_in(work), 5, "the job's processes to die")


def test_the_record_of_a_job_is_removed_when_it_ends(start_daemon, wire_to, work, state):
    """A job's record lives while it runs; jobs that ended leave none (with a terminal too,
    whose record names its job's group as well), and a daemon that stops leaves no file."""
    daemon = start_daemon("--state-dir", str(state))
    got = offld(daemon, "sh", "-c", f"grep -c '^group ' {state}/*", cwd=work)
    assert got.stdout == b"1\n", got.stderr
    wire = wire_to(daemon)
    wait_two = f"for i in $(seq 100); do [ $(cat {state}/* | grep -c group) = 2 ] && break; " \
               f"sleep 0.05; done; cat {state}/*"   # the leader's report of the job's pid
    wire.submit("t1", [b"sh", b"-c", wait_two.encode()], work, tty=TTY)
    screen = b""
    while (msg := wire.until("t1", "tty", "exit", "error")).kind == "tty":
        screen += msg.payload
    assert msg.kind == "exit" and msg["status"] == 0, msg
    assert screen.count(b"group ") == 2, screen
    assert [warden.records_in(f.read_text()) for f in state.iterdir()] == [[]]
    daemon.stop()
    assert os.listdir(state) == []


# --- (iv) a restart after kill -9 ---------------------------------------------------------------

def test_a_restarted_daemon_kills_leftovers_first_and_keeps_to_its_slots(
        start_daemon, wire_to, work, state):
    """The warden killed along with offloadd: the job's shell dies of its parent death
    signal but its background sleeps live on. A daemon started on the same state directory
    kills them before it listens (one log line per group), then runs one job at a time."""
    first = start_daemon("--client-timeout", "60", "--state-dir", str(state))
    wire = wire_to(first)
    wire.submit("j1", LEAVES_A_CHILD, work)
    leader = wire.until("j1", "started")["pid"]
    wait_for(lambda: len(sleeps_in(work)) == 2, 10, "both sleeps")
    freeze_and_kill(first, kill_warden=True)
    wait_for(lambda: not alive(leader), 5, "the job's shell to die with offloadd")
    left = sleeps_in(work)
    assert len(left) == 2, "the sleeps should have outlived their shell"
    assert len(os.listdir(state)) == 1
    second = start_daemon("--state-dir", str(state), "--slots", "1")
    assert not any(map(alive, left)), "leftovers still run when the new daemon listens"
    assert second.log().count(f"at start: killed process group {leader} of job j1 (sh)") == 1
    assert os.listdir(state) == []
    lock = work / "lock"
    jobs = [subprocess.Popen([OFFLD, "-H", second.hostport, "--", "sh", "-c",
                              f"mkdir {lock} || exit 9; sleep 0.3; rmdir {lock}"], cwd=work)
            for _ in range(3)]
    assert [j.wait(30) for j in jobs] == [0, 0, 0]


def test_the_sweep_spares_live_daemons_and_reused_pids(tmp_path):
    """Records of a daemon that still runs are kept; a group whose leader's pid runs with
    another start time (a reused pid) is not killed; a group whose leader is gone but which
    still has members is."""
    state = tmp_path / "records"
    state.mkdir(mode=0o700)
    me = (os.getpid(), warden.start_time(os.getpid()))
    mine = f"{me[0]}.{me[1]}.1.1"
    (state / mine).write_text(f"boot {warden.boot_id()}\njob m z\ngroup {os.getpid()} 1\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, boot = f"{gone.pid}.1", warden.boot_id()   # a daemon that no longer runs
    alive_leader = subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 61"],
                                    start_new_session=True, cwd=tmp_path)
    dead_leader = subprocess.Popen(["sh", "-c", "sleep 63 &"], start_new_session=True,
                                   cwd=tmp_path)
    other = subprocess.Popen(["sleep", "62"], start_new_session=True, cwd=tmp_path)
    groups = [alive_leader.pid, dead_leader.pid, other.pid]
    try:
        dead_leader.wait(10)
        wait_for(lambda: len(warden.members({alive_leader.pid})) == 2, 10, "the group's sleeps")
        assert len(warden.members({dead_leader.pid})) == 1
        start = warden.start_time(alive_leader.pid)
        for pgid, pstart, job in ((alive_leader.pid, start, "a"), (dead_leader.pid, 5, "b"),
                                  (other.pid, 1, "c")):   # other: its pid, another start time
            (state / f"{dead}.{pgid}.{pstart}").write_text(
                f"boot {boot}\njob {job} (x)\ngroup {pgid} {pstart}\n")
        said: list[str] = []
        killed = warden.sweep(str(state), warden.owner_runs, said.append)
        assert sorted(killed) == sorted(groups[:2]) and len(said) == 2, said
        assert warden.wait_gone(killed, 5) == []
        assert other.poll() is None, "a reused pid's process was killed"
        assert os.listdir(state) == [mine]
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (alive_leader, other):
            p.wait()


def test_the_sweep_kills_the_jobs_of_a_slot_file_and_no_ended_one(tmp_path):
    """A daemon's records are slots of one file: the sweep of a dead daemon's file kills the
    group of a job still recorded and spares one whose record was removed (a free slot), even
    if that group runs (its pid may be another's by now), then removes the file."""
    state = tmp_path / "records"
    state.mkdir(mode=0o700)
    said: list[str] = []
    records = warden.Records(str(state), said.append)
    groups = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3)]
    try:
        names = [records.add(f"job j{i} (sleep)", [(g.pid, warden.start_time(g.pid))])
                 for i, g in enumerate(groups)]
        records.remove(names[1])
        records.add_group(names[2], groups[1].pid + 10**6, 1)   # a group that is gone
        assert len(os.listdir(state)) == 1 and not said
        killed = warden.sweep(str(state), lambda owner: False, said.append)
        assert killed == [groups[0].pid, groups[2].pid], said
        assert [g.wait(5) for g in (groups[0], groups[2])] == [-signal.SIGKILL] * 2
        assert groups[1].poll() is None, "the group of a removed record was killed"
        assert os.listdir(state) == []
    finally:
        records.close()
        for g in groups:
            g.kill()
            g.wait()


# --- (v) the end of a job: stdin on /dev/null, the client's messages that cross the exit ------

def test_a_job_on_dev_null_and_the_late_words_of_its_client(start_daemon, wire_to, work):
    """The welcome offers stdin-null; a submit with it runs the job on /dev/null (cat ends at
    once, with no stdin-eof sent), started comes before its output; messages the client
    sends about it after its exit (a stdin-eof, a credit, a signal, a ping naming it) get
    no error, while a job never known still does."""
    daemon = start_daemon()
    wire = wire_to(daemon)
    wire.sock.send_multipart(protocol.encode("hello"))
    assert protocol.STDIN_NULL in wire.until(None, "welcome")["features"]
    wire.submit("j", [b"sh", b"-c", b"cat; echo done"], work, stdin_null=True)
    out = wire.until("j", "stdout")
    assert out.payload == b"done\n" and [m.kind for m in wire.kept] == ["started"]
    assert wire.until("j", "exit")["status"] == 0
    for kind, fields in (("stdin-eof", {}), ("credit", {"n": 5}), ("signal", {"signum": 2})):
        wire.sock.send_multipart(protocol.encode(kind, "j", **fields))
    wire.sock.send_multipart(protocol.encode("ping", jobs=["j", "never"]))
    err = wire.until("never", "error")
    assert (err["kind"], err["started"]) == ("unknown-job", True), err
    assert not [m for m in wire.kept if m.kind == "error"], wire.kept


def test_a_submit_cancelled_while_the_daemon_was_stopped_never_starts(start_daemon, wire_to,
                                                                      work):
    """A daemon stopped past the client's ack_timeout (SIGSTOP here): the client cancels and
    may run the job elsewhere, so when the daemon comes back to the submit with its cancel
    behind it, it starts nothing (no run counted, none listed, no error for the cancel) and
    goes on serving: a later job runs, once."""
    daemon = start_daemon()
    wire = wire_to(daemon)
    assert wire.queued() == 0   # connected: what follows waits in the daemon's socket
    job = [b"sh", b"-c", b"echo ran >> runs"]
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state_of(daemon.proc.pid) == "T", 10, "the daemon to stop")
        wire.submit("j1", job, work)
        wire.sock.send_multipart(protocol.encode("cancel", "j1"))
        wire.sock.send_multipart(protocol.encode("status"))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    reply = wire.until(None, "status-reply")
    assert (reply["done"], reply["failed"]) == (0, 0), reply
    assert not [j for j in reply["jobs"] if j.get("job") == "j1"], reply["jobs"]
    wire.submit("j2", job, work)
    assert wire.until("j2", "exit")["status"] == 0
    assert (work / "runs").read_text() == "ran\n"
    assert not [m for m in wire.kept if m.kind == "error"], wire.kept
