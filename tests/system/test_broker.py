"""Many hosts: a real broker and real hosts on loopback, with clients through offld -L."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest
import zmq

from offloadfs import protocol

from ..harness import OFFLD, OFFLOADD, wait_for


@pytest.fixture
def cluster(start_broker, start_daemon):
    """A broker and three one-slot hosts; the third alone offers gpujob and the gpu tag."""
    broker = start_broker()
    hosts = []
    for n in (1, 2, 3):
        extra = ["--tag", "gpu"] if n == 3 else []
        gpu = {"gpujob": "/bin/echo"} if n == 3 else {}
        commands = {"sh": "/bin/sh", "cat": "/bin/cat"} | gpu
        hosts.append(start_daemon("--connect", broker.workers, "--slots", "1", "--name", f"h{n}",
                                  *extra, commands=commands))
    broker.wait_hosts(3)
    return broker, hosts


def offld(broker, *command, **kw) -> subprocess.CompletedProcess:
    """offld -L broker -- command (bounded)."""
    return subprocess.run([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--", *command],
                          capture_output=True, timeout=60, **kw)


def test_six_jobs_spread_over_three_one_slot_hosts(cluster, work):
    """Six one-second jobs use all three hosts, two each, never two at once on one host."""
    broker, hosts = cluster
    procs = [subprocess.Popen([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--", "sh", "-c",
                               "sleep 1; echo done"], cwd=work, stdout=subprocess.PIPE)
             for _ in range(6)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert outs == [b"done\n"] * 6 and all(p.returncode == 0 for p in procs)
    assert [h.log().count(" started") for h in hosts] == [2, 2, 2]


def test_a_command_only_one_host_offers_goes_there(cluster, work):
    """gpujob exists only on h3: every run lands there."""
    broker, hosts = cluster
    for _ in range(3):
        assert offld(broker, "gpujob", "hi", cwd=work).stdout == b"hi\n"
    assert [h.log().count("(gpujob) started") for h in hosts] == [0, 0, 3]


def test_a_command_no_host_offers_fails_with_one_line(cluster, work):
    """A command nobody offers: exit 255 and one line, at once."""
    broker, _ = cluster
    got = offld(broker, "convert", "x", cwd=work)
    assert got.returncode == 255 and got.stderr.count(b"\n") == 1


def test_killed_host_fails_its_running_job_and_the_queue_goes_elsewhere(cluster, work):
    """kill -9 of a host mid-run: its job exits 255 within 5 s, the queued ones finish."""
    broker, hosts = cluster
    procs = [subprocess.Popen([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--", "sh", "-c",
                               "sleep 2; echo ok"], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(6)]
    ended: dict[int, tuple[int, float]] = {}

    def all_ended() -> bool:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = (p.returncode, time.monotonic() - killed_at)
        return len(ended) == len(procs)

    try:
        wait_for(lambda: all(" started" in h.log() for h in hosts), 20, "every host's job")
        killed_at = time.monotonic()
        hosts[0].proc.kill()
        wait_for(all_ended, 60, "every job to end")
    finally:
        for p in procs:
            p.communicate(timeout=60)
    lost = [r for r in ended.values() if r[0] == 255]
    assert len(lost) == 1 and lost[0][1] < 5, ended
    assert sum(1 for r in ended.values() if r[0] == 0) == 5


def test_hosts_and_clients_survive_a_broker_restart(start_broker, start_daemon, tmp_path, work):
    """The broker restarts on the same ports: hosts reconnect, new jobs run."""
    first = start_broker()
    start_daemon("--connect", first.workers, "--slots", "1")
    wait_for(lambda: " ready: " in first.log(), 20, "the host to be ready")
    assert offld(first, "sh", "-c", "echo one", cwd=work).stdout == b"one\n"
    first.stop()
    second = start_broker(clients=first.clients, workers=first.workers)
    wait_for(lambda: " ready: " in second.log(), 60, "the host to reconnect")
    assert offld(second, "sh", "-c", "echo two", cwd=work).stdout == b"two\n"


def _scrape(address: str) -> str:
    """The text of a metrics endpoint."""
    import urllib.request
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_metrics_of_a_host(start_broker, start_daemon, tmp_path, work):
    """--metrics serves jobs by command and outcome, slots and stage times."""
    import socket
    ports = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    broker = start_broker()
    host = start_daemon("--connect", broker.workers, "--slots", "2",
                        "--metrics", f"127.0.0.1:{ports[0]}")
    wait_for(lambda: " ready: " in broker.log(), 20, "the host")
    assert offld(broker, "sh", "-c", "exit 0", cwd=work).returncode == 0
    text = wait_for(lambda: (t := _scrape(f"127.0.0.1:{ports[0]}")) and
                    'offload_daemon_jobs_total{command="sh",outcome="done"} 1.0' in t and t,
                    10, "the host's job metric")
    assert "offload_daemon_slots 2.0" in text
    assert 'offload_daemon_stage_seconds_count{stage="run"} 1.0' in text
    assert host.proc.poll() is None


def test_per_slot_environment(start_daemon, tmp_path, work):
    """slot_env gives each slot its own value, e.g. one GPU per slot."""
    cfg = tmp_path / "gpu.toml"
    cfg.write_text('[serve]\nslots = 2\nslot_env = { CUDA_VISIBLE_DEVICES = "{slot}" }\n')
    host = start_daemon("-c", str(cfg))
    procs = [subprocess.Popen([OFFLD, "-H", host.hostport, "--", "sh", "-c",
                               "sleep 0.5; echo $CUDA_VISIBLE_DEVICES"], cwd=work,
                              stdout=subprocess.PIPE) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0] for p in procs)
    assert outs == [b"0\n", b"1\n"]


def test_status_of_a_broker_lists_its_hosts(cluster):
    """offloadd status -H BROKER shows each live host with its slots and commands."""
    broker, _ = cluster
    got = subprocess.run([OFFLOADD, "status", "-H", f"127.0.0.1:{broker.client_port}"],
                         capture_output=True, text=True, timeout=30)
    assert got.returncode == 0
    hosts = [line for line in got.stdout.splitlines() if line.strip().startswith("host h")]
    assert len(hosts) == 3 and any("gpujob" in line and "gpu" in line for line in hosts)


def test_tags_from_the_vms_config_route_a_job(cluster, tmp_path, work):
    """[tags] sh = ["gpu"]: sh runs only on the host tagged gpu."""
    broker, hosts = cluster
    cfg = tmp_path / "tags.toml"
    cfg.write_text('[tags]\nsh = ["gpu"]\n')
    for _ in range(2):
        got = subprocess.run([OFFLD, "-c", str(cfg), "-L", f"127.0.0.1:{broker.client_port}",
                              "--", "sh", "-c", "exit 0"], cwd=work, capture_output=True,
                             timeout=60)
        assert got.returncode == 0, got.stderr
    assert [h.log().count("(sh) started") for h in hosts] == [0, 0, 2]


def test_queue_positions_through_the_broker(start_broker, start_daemon, work):
    """With one slot busy, later jobs learn their position at once and as it improves."""
    broker = start_broker()
    start_daemon("--connect", broker.workers, "--slots", "1")
    wait_for(lambda: " ready: " in broker.log(), 20, "the host")
    lb = f"127.0.0.1:{broker.client_port}"
    first = subprocess.Popen([OFFLD, "-L", lb, "--", "sh", "-c",
                              "touch started; while [ ! -e release ]; do sleep 0.02; done"],
                             cwd=work)
    wait_for(lambda: (work / "started").exists(), 20, "the first job")
    waiting = [subprocess.Popen([OFFLD, "-d", "-L", lb, "--", "sh", "-c", "sleep 0.3"],
                                cwd=work, stderr=subprocess.PIPE) for _ in range(2)]
    seen = [b"", b""]

    def both_queued() -> bool:
        for i, p in enumerate(waiting):
            if select.select([p.stderr], [], [], 0)[0]:
                seen[i] += os.read(p.stderr.fileno(), 4096)
        return all(b"queued at position" in s for s in seen)

    try:
        wait_for(both_queued, 20, "both jobs to be told their place")
        (work / "release").touch()
        assert first.wait(30) == 0
        errs = [(seen[i] + p.communicate(timeout=60)[1]).decode() for i, p in enumerate(waiting)]
    finally:
        for p in waiting:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in waiting)
    told = sorted(e.count("queued at position") for e in errs)
    assert told[0] >= 1 and "queued at position 2" in "".join(errs)


def test_the_mount_offloads_through_a_broker(cluster, start_mount, tmp_path, work):
    """offloadfs mount -L BROKER: the shims are the union of the hosts' commands, and run."""
    broker, hosts = cluster
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'[mount]\nstate_file = "{tmp_path}/state.json"\n')
    mount = start_mount("-L", f"127.0.0.1:{broker.client_port}", config=str(cfg),
                        wait_for_shim="gpujob")
    assert sorted(os.listdir(mount.path)) == ["cat", "gpujob", "sh"]
    got = subprocess.run([str(mount.path / "gpujob"), "via-broker"], cwd=work,
                         env=mount.env(OFFLOADFS_DEBUG="1"), capture_output=True, timeout=60)
    assert got.stdout == b"via-broker\n" and b"ran on h3" in got.stderr, got.stderr
    assert hosts[2].log().count("(gpujob) started") == 1


def test_one_host_serves_two_brokers(start_broker, start_daemon, work):
    """A host with two --connect takes jobs from both brokers."""
    brokers = [start_broker(), start_broker()]
    start_daemon("--connect", brokers[0].workers, "--connect", brokers[1].workers,
                 "--slots", "2")
    for b in brokers:
        wait_for(lambda b=b: " ready: " in b.log(), 20, "the host at each broker")
    for i, b in enumerate(brokers):
        assert offld(b, "sh", "-c", f"echo {i}", cwd=work).stdout == f"{i}\n".encode()


def test_a_vanished_client_has_its_job_killed_on_the_host(cluster, work):
    """kill -9 of offld mid-job through the broker: the host kills the job."""
    from ..harness import alive
    broker, _ = cluster
    proc = subprocess.Popen([OFFLD, "-L", f"127.0.0.1:{broker.client_port}", "--", "sh", "-c",
                             "echo $$ > pid; exec sleep 60"], cwd=work)
    pid = int(wait_for(lambda: (work / "pid").exists() and (work / "pid").read_text().strip(),
                       20, "the job's pid"))
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(pid), 15, "the job to be killed on its host")


# --- terminals through the broker: a fake host and a fake client on the wire ----------------

class Peer:
    """A DEALER speaking the protocol by hand (a fake host or client); it keeps what it gets
    and, unless ``quiet``, sends a ping at most every 0.3 s while it is pumped."""

    def __init__(self, ctx, endpoint: str, ping: dict):
        """Connect to ``endpoint``; ``ping`` holds the fields of this peer's heartbeat."""
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ping, self.quiet, self.beat = ping, False, 0.0
        self.got: list = []

    def send(self, kind: str, job: str | None = None, payload: bytes | None = None, **fields):
        """Send one message."""
        self.sock.send_multipart(protocol.encode(kind, job, payload, **fields))

    def pump(self) -> None:
        """Take in what waits; send a heartbeat when one is due."""
        while self.sock.poll(0, zmq.POLLIN):
            self.got.append(protocol.decode(self.sock.recv_multipart()))
        if not self.quiet and time.monotonic() >= self.beat + 0.3:
            self.send("ping", **self.ping)
            self.beat = time.monotonic()


class Wire:
    """Fake peers on one ZeroMQ context, and a way to wait on what they get."""

    def __init__(self):
        """No peers yet."""
        self.ctx = zmq.Context()
        self.peers: list[Peer] = []

    def peer(self, endpoint: str, **ping) -> Peer:
        """A new peer on ``endpoint`` whose heartbeat carries ``ping``."""
        self.peers.append(Peer(self.ctx, endpoint, ping))
        return self.peers[-1]

    def expect(self, peer: Peer, kind: str, job: str | None = None, timeout: float = 20):
        """The first message of ``kind`` (for ``job``) that ``peer`` gets, all peers pumped."""
        def found():
            for p in self.peers:
                p.pump()
            match = [m for m in peer.got if m.kind == kind and job in (None, m.job)]
            return match and peer.got.pop(peer.got.index(match[0]))
        return wait_for(found, timeout, f"{kind} {job or ''}")

    def close(self) -> None:
        """Close every peer and the context."""
        for p in self.peers:
            p.sock.close()
        self.ctx.term()


@pytest.fixture
def wire():
    """A Wire, closed at teardown."""
    w = Wire()
    yield w
    w.close()


TTY = {"fds": 7, "rows": 24, "cols": 80, "xpixel": 0, "ypixel": 0, "iflag": 0x500,
       "oflag": 5, "cflag": 0xbf, "lflag": 0x8a3b, "ispeed": 15, "ospeed": 15,
       "cc": bytes(range(32)), "foreground": True}


def _submit(client: Peer, job: str, **extra) -> None:
    """A fake client's submit of ``sh -c true`` for ``job``."""
    client.send("submit", job, argv=[b"sh", b"-c", b"true"], cwd=b"/", uid=0, gid=0,
                groups=[], env={b"TERM": b"xterm"}, window=1 << 20, **extra)


def _fake_host_and_client(broker, wire, jobs: list[str]):
    """A fake host with two slots at ``broker`` running ``jobs`` (submitted by one fake
    client, the first with a tty); returns (host, client, the broker's wire id per job)."""
    host = wire.peer(broker.workers)
    host.send("ready", host="fake", commands=["sh"], slots=2)
    wait_for(lambda: " ready: " in broker.log(), 20, "the fake host")
    client = wire.peer(broker.clients, jobs=jobs)
    ids = {}
    for n, job in enumerate(jobs):
        _submit(client, job, **({"tty": TTY} if n == 0 else {}))
        submit = wire.expect(host, "submit")
        ids[job] = submit.job
        host.send("started", submit.job, host="fake", pid=100 + n, window=1 << 20)
        assert wire.expect(client, "started", job)["pid"] == 100 + n
        if n == 0:
            assert submit["tty"] == TTY and submit["argv"] == [b"sh", b"-c", b"true"]
    return host, client, ids


def test_terminal_messages_pass_through_the_broker(start_broker, wire):
    """resize, suspend and resume reach the host under the broker's id for the job; stopped
    and tty come back to the client under its own; the submit's tty arrives whole."""
    broker = start_broker()
    host, client, ids = _fake_host_and_client(broker, wire, ["j1"])
    wid = ids["j1"]
    assert wid != "j1"
    client.send("resize", "j1", rows=50, cols=132, xpixel=1320, ypixel=1000)
    got = wire.expect(host, "resize", wid)
    assert got.fields == {"rows": 50, "cols": 132, "xpixel": 1320, "ypixel": 1000}
    client.send("suspend", "j1")
    wire.expect(host, "suspend", wid)
    host.send("stopped", wid, signal=int(signal.SIGTSTP))
    assert wire.expect(client, "stopped", "j1")["signal"] == signal.SIGTSTP
    client.send("resume", "j1", foreground=False)
    assert wire.expect(host, "resume", wid)["foreground"] is False
    host.send("tty", wid, b"\x1b[1mprompt$ \x1b[0m")
    assert bytes(wire.expect(client, "tty", "j1").payload) == b"\x1b[1mprompt$ \x1b[0m"
    host.send("exit", wid, status=0)
    assert wire.expect(client, "exit", "j1")["status"] == 0


def test_a_suspended_job_outlives_its_silent_client_until_suspend_limit(start_broker, wire,
                                                                       tmp_path):
    """[broker] suspend_limit = 7: the silent client's other job is cancelled after its
    timeout (5 s), the suspended one not before 7 s."""
    cfg = tmp_path / "broker.toml"
    cfg.write_text("[broker]\nsuspend_limit = 7\n")
    broker = start_broker(args=["-c", str(cfg)])
    host, client, ids = _fake_host_and_client(broker, wire, ["j1", "j2"])
    client.send("suspend", "j1")
    suspended = time.monotonic()
    client.quiet = True                                # stopped: it says nothing more
    wire.expect(host, "suspend", ids["j1"])
    wire.expect(host, "cancel", ids["j2"])
    assert not [m for m in host.got if m.kind == "cancel"]
    wire.expect(host, "cancel", ids["j1"])
    assert time.monotonic() - suspended >= 7
