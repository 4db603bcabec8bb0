"""Security: CURVE keys between VMs, hosts and brokers, what a VM's key may claim, root.

Real daemons, brokers and ``offld`` processes on loopback; keys made by the real ``keygen``
commands. Each refusal test also checks that nothing ran (the job would have made a file).
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from offloadfs import protocol
from offloadfs.channel import Channel
from offloadfs.config import ClientConfig

from ..harness import DATA, OFFLD, OFFLOADD, OFFLOADFS, Broker, test_user, wait_for


class Keys:
    """A directory of key pairs (host, broker, vm, stranger, other) and config files using
    them."""

    def __init__(self, root: Path):
        """Make the pairs with the real keygen commands; only vm is authorized."""
        self.dir, self.root = root / "keys", root
        for prog, name in ((OFFLOADD, "host"), (OFFLOADD, "broker"), (OFFLOADFS, "vm"),
                           (OFFLOADFS, "stranger"), (OFFLOADFS, "other")):
            subprocess.run([prog, "keygen", str(self.dir), name], check=True,
                           capture_output=True)
        self.authorized = self.dir / "authorized"
        self.authorized.mkdir()
        shutil.copy(self.dir / "vm.key", self.authorized)

    def host_toml(self, extra: str = "", name: str = "host") -> str:
        """A daemon's config with its keys, and ``extra`` lines."""
        return self._write(f"{name}.toml",
                           f'[security]\nsecret_key = "{self.dir}/{name}.key_secret"'
                           f'\nauthorized_keys = "{self.authorized}"\n{extra}')

    def vm_toml(self, name: str = "vm", server: str = "host") -> str:
        """A VM's config: its own key pair and the server's public key."""
        return self._write(f"vm-{name}-{server}.toml",
                           f'[security]\nsecret_key = "{self.dir}/{name}.key_secret"\n'
                           f'server_key = "{self.dir}/{server}.key"\n')

    def _write(self, name: str, text: str) -> str:
        """Write a config file (readable by test users) and return its path."""
        path = self.root / name
        path.write_text(text)
        path.chmod(0o644)
        return str(path)


@pytest.fixture
def keys(tmp_path) -> Keys:
    """Fresh keys for one test."""
    return Keys(tmp_path)


def run(host, *command, config=None, cwd, user=None, opts=()) -> subprocess.CompletedProcess:
    """``offld`` (as ``user`` if given) to ``host`` with ``config``; bounded."""
    argv = [OFFLD, *(["-c", config] if config else []), "-H", host, *opts, "--", *command]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=30)


def keyed_daemon(start_daemon, keys, extra="", **kw):
    """A daemon that requires keys; root refused unless ``allow_root``."""
    kw.setdefault("allow_root", False)
    return start_daemon("-c", keys.host_toml(extra), **kw)


@pytest.fixture
def user(traversable, keys) -> str:
    """A non-root test user who owns the VM's secret key (as a VM's user running offld)."""
    name, uid = test_user("offsec1")
    os.chown(keys.dir / "vm.key_secret", uid, -1)
    os.chmod(keys.dir, 0o755)
    return name


@pytest.fixture
def userwork(traversable, user) -> Path:
    """A working directory the test user owns."""
    path = traversable / "userwork"
    path.mkdir()
    shutil.chown(path, user)
    return path


# --- keygen ----------------------------------------------------------------------------------

def test_keygen_writes_zeromq_certificates(keys):
    """Public 0644, secret 0600, loadable by zmq.auth; a second keygen never overwrites."""
    import zmq.auth
    public, secret = zmq.auth.load_certificate(keys.dir / "vm.key_secret")
    assert zmq.auth.load_certificate(keys.dir / "vm.key") == (public, None)
    assert len(public) == len(secret) == 40
    assert (keys.dir / "vm.key_secret").stat().st_mode & 0o777 == 0o600
    assert (keys.dir / "vm.key").stat().st_mode & 0o777 == 0o644
    again = subprocess.run([OFFLOADFS, "keygen", str(keys.dir), "vm"], capture_output=True)
    assert again.returncode == 2 and again.stderr.count(b"\n") == 1 and b"exists" in again.stderr
    assert zmq.auth.load_certificate(keys.dir / "vm.key_secret") == (public, secret)


# --- who may connect -------------------------------------------------------------------------

def test_authorized_key_runs_the_job(start_daemon, keys, work):
    """The VM's key is in authorized_keys: the job runs on the host and its output comes
    back (as root here: allowed, and the VM's rule includes uid 0)."""
    d = keyed_daemon(start_daemon, keys, allow_root=True,
                     extra='[security.vms.vm]\nuids = "0-65535"\n')
    r = run(d.hostport, "sh", "-c", "echo ok; echo $OFFLOAD_SLOT > ran", config=keys.vm_toml(),
            cwd=work)
    assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr
    assert (work / "ran").read_text() == "0\n"


@pytest.mark.parametrize("case, expect", [
    ("stranger", b"not authorized"),
    ("no key", b"requires CURVE keys"),
    ("wrong server key", b"handshake failed"),
])
def test_refused_clients_fail_fast_with_one_line(start_daemon, keys, work, case, expect):
    """An unknown key, no key, or the wrong server key: exit 255 with one clear line, well
    within the 30 s bound (no waiting out a timeout), and the job never ran."""
    d = keyed_daemon(start_daemon, keys, allow_root=True)
    config = {"stranger": keys.vm_toml("stranger"), "no key": None,
              "wrong server key": keys.vm_toml("vm", server="broker")}[case]
    r = run(d.hostport, "sh", "-c", "touch ran", config=config, cwd=work)
    assert r.returncode == 255
    assert r.stderr.count(b"\n") == 1 and expect in r.stderr, r.stderr
    assert not (work / "ran").exists()


def test_a_keyed_client_is_told_when_the_host_uses_no_keys(start_daemon, keys, work):
    """Keys here, none there: one line saying so, not a hang."""
    d = start_daemon()
    r = run(d.hostport, "true", config=keys.vm_toml(), cwd=work)
    assert r.returncode == 255 and r.stderr.count(b"\n") == 1
    assert b"no keys" in r.stderr or b"handshake failed" in r.stderr, r.stderr


def test_keys_added_and_removed_at_run_time(start_daemon, keys, work):
    """Copying a public key into authorized_keys admits it at once; removing it shuts it
    out again, with no restart."""
    d = keyed_daemon(start_daemon, keys, allow_root=True,
                     extra='[security.vms.stranger]\nuids = "0-65535"\n')
    stranger = keys.vm_toml("stranger")
    assert run(d.hostport, "true", config=stranger, cwd=work).returncode == 255
    shutil.copy(keys.dir / "stranger.key", keys.authorized)
    r = run(d.hostport, "sh", "-c", "echo in", config=stranger, cwd=work)
    assert (r.returncode, r.stdout) == (0, b"in\n"), r.stderr
    (keys.authorized / "stranger.key").unlink()
    r = run(d.hostport, "sh", "-c", "touch ran", config=stranger, cwd=work)
    assert r.returncode == 255 and b"not authorized" in r.stderr
    assert not (work / "ran").exists()


def test_a_removed_key_cannot_submit_on_a_connection_it_already_has(start_daemon, keys, work):
    """A mount keeps its connection open: once its key is removed, its next job is refused
    although the CURVE handshake happened before."""
    d = keyed_daemon(start_daemon, keys, allow_root=True)
    ctx = zmq.Context()
    channel = Channel(ctx, f"tcp://{d.hostport}", ClientConfig.load(keys.vm_toml()).keys)
    try:
        channel.hello(10)
        (keys.authorized / "vm.key").unlink()
        channel.send(protocol.encode(
            "submit", "j1", argv=[b"sh", b"-c", b"touch ran"], cwd=os.fsencode(work), uid=0,
            gid=0, groups=[], env={}, window=1024))
        reply = channel.wait(10, {"error", "started"})
    finally:
        channel.close()
        ctx.term()
    assert reply is not None and reply.kind == "error" and reply["kind"] == "unauthorized"
    assert not (work / "ran").exists()


def test_traffic_is_encrypted(start_daemon, keys, work, tmp_path):
    """What crosses the network with keys carries neither the job's argv nor its output;
    without keys, both are in clear (which proves the tap sees the traffic)."""
    secret = "launch-codes-0451"
    seen = {}
    for mode in ("keys", "none"):
        d = keyed_daemon(start_daemon, keys, allow_root=True, extra="[security.vms.vm]\n"
                         "uids = \"0-65535\"\n") if mode == "keys" else start_daemon()
        capture = tmp_path / f"wire-{mode}"
        tap = subprocess.Popen([sys.executable, str(DATA / "tcp_tap.py"), str(d.port),
                                str(capture)], stdout=subprocess.PIPE, text=True)
        try:
            port = tap.stdout.readline().strip()
            r = run(f"127.0.0.1:{port}", "sh", "-c", 'printf "%s-%s\\n" "$1" done', "_",
                    secret, config=keys.vm_toml() if mode == "keys" else None, cwd=work)
        finally:
            tap.kill()
            tap.wait()
            tap.stdout.close()
        assert (r.returncode, r.stdout) == (0, f"{secret}-done\n".encode()), r.stderr
        seen[mode] = capture.read_bytes()
    output = f"{secret}-done".encode()   # one write (printf): one stdout message on the wire
    assert secret.encode() in seen["none"] and output in seen["none"]
    assert secret.encode() not in seen["keys"]   # neither argv nor output


# --- what a VM may claim ---------------------------------------------------------------------

def test_files_made_by_a_job_belong_to_the_caller(start_daemon, keys, user, userwork):
    """offld run by a non-root user: the job runs as that user on the host."""
    d = keyed_daemon(start_daemon, keys)
    r = run(d.hostport, "sh", "-c", "touch mine; echo $OFFLOAD_SLOT", config=keys.vm_toml(),
            cwd=userwork, user=user)
    assert (r.returncode, r.stdout) == (0, b"0\n"), r.stderr
    assert pwd.getpwuid((userwork / "mine").stat().st_uid).pw_name == user


def test_root_is_refused_by_default(start_daemon, keys, work):
    """offld as root to a keyed daemon without allow_root: refused, nothing ran."""
    d = keyed_daemon(start_daemon, keys)
    r = run(d.hostport, "sh", "-c", "touch ran", config=keys.vm_toml(), cwd=work)
    assert r.returncode == 255 and b"root" in r.stderr and r.stderr.count(b"\n") == 1
    assert not (work / "ran").exists()


def test_root_needs_a_rule_as_well_as_allow_root(start_daemon, keys, work):
    """allow_root alone does not let a keyed VM claim uid 0: its rule must include 0."""
    d = keyed_daemon(start_daemon, keys, allow_root=True)
    r = run(d.hostport, "sh", "-c", "touch ran", config=keys.vm_toml(), cwd=work)
    assert r.returncode == 255 and b"may not run jobs as root" in r.stderr
    assert not (work / "ran").exists()


def test_uid_outside_the_vms_range_is_refused(start_daemon, keys, user, userwork):
    """[security.vms.vm] uids excludes the caller: refused; a range with it: runs."""
    uid = pwd.getpwnam(user).pw_uid
    uids = f'[security.vms.vm]\nuids = "{uid + 1}-{uid + 100}"\n'
    d = keyed_daemon(start_daemon, keys, extra=uids)
    r = run(d.hostport, "sh", "-c", "touch ran", config=keys.vm_toml(), cwd=userwork, user=user)
    assert r.returncode == 255 and f"may not claim uid {uid}".encode() in r.stderr, r.stderr
    assert not (userwork / "ran").exists()
    d2 = keyed_daemon(start_daemon, keys, extra=f'[security.vms.vm]\nuids = "1,{uid}"\n')
    r = run(d2.hostport, "sh", "-c", "touch ran", config=keys.vm_toml(), cwd=userwork, user=user)
    assert r.returncode == 0 and (userwork / "ran").exists(), r.stderr


def test_a_claimed_group_outside_the_vms_range_is_refused(start_daemon, keys, work):
    """gids limits the primary and supplementary groups a VM may claim."""
    d = keyed_daemon(start_daemon, keys, allow_root=True,
                     extra='[security.vms.vm]\nuids = "0-65535"\ngids = "1000-2000"\n')
    r = run(d.hostport, "sh", "-c", "touch ran", config=keys.vm_toml(), cwd=work)
    assert r.returncode == 255 and b"may not claim group 0" in r.stderr, r.stderr
    assert not (work / "ran").exists()


# --- brokers ---------------------------------------------------------------------------------

@pytest.fixture
def keyed_cluster(tmp_path, keys, start_daemon):
    """A broker with keys and one host connected to it. The broker admits the VMs vm and
    stranger; the host authorizes vm only."""
    hosts, vms = tmp_path / "broker-hosts", tmp_path / "broker-vms"
    hosts.mkdir()
    vms.mkdir()
    shutil.copy(keys.dir / "host.key", hosts)
    for name in ("vm", "stranger"):
        shutil.copy(keys.dir / f"{name}.key", vms)
    config = keys._write("broker.toml", f'[security]\nsecret_key = "{keys.dir}/broker.key_secret"'
                         f'\nauthorized_keys = "{vms}"\nauthorized_hosts = "{hosts}"\n')
    broker = Broker(tmp_path, args=["-c", config])
    host_cfg = keys.host_toml(f'broker_key = "{keys.dir}/broker.key"\n[security.vms.vm]\n'
                              f'uids = "0-65535"\n')
    try:
        start_daemon("-c", host_cfg, "--connect", broker.workers, "--name", "h1",
                     allow_root=True)
        wait_for(lambda: " ready: " in broker.log(), 20, "the host to join the broker")
        yield broker
    finally:
        broker.stop()


def via(broker, *command, config, cwd):
    """offld -L broker with ``config``; bounded."""
    return subprocess.run([OFFLD, "-c", config, "-L", f"127.0.0.1:{broker.client_port}", "--",
                           *command], cwd=cwd, capture_output=True, timeout=30)


def test_broker_and_host_with_keys(keyed_cluster, keys, work):
    """VM -> broker -> host, every hop CURVE: the VM's job runs; a key the broker does not
    know is refused at the broker; nothing of it ran."""
    r = via(keyed_cluster, "sh", "-c", "echo via", config=keys.vm_toml(server="broker"),
            cwd=work)
    assert (r.returncode, r.stdout) == (0, b"via\n"), r.stderr
    r = via(keyed_cluster, "sh", "-c", "touch ran", config=keys.vm_toml("other", "broker"),
            cwd=work)
    assert r.returncode == 255 and b"not authorized" in r.stderr
    assert not (work / "ran").exists()


def test_a_host_checks_the_vm_behind_its_broker(keyed_cluster, keys, work):
    """The host applies its own authorized_keys to the VM the broker vouches for: a VM the
    broker admits but the host does not know is refused by the host."""
    r = via(keyed_cluster, "sh", "-c", "touch ran", config=keys.vm_toml("stranger", "broker"),
            cwd=work)
    assert r.returncode == 255 and b"not (or no longer) authorized on h1" in r.stderr, r.stderr
    assert not (work / "ran").exists()


def test_a_host_with_a_foreign_key_is_not_admitted_by_the_broker(tmp_path, keys, start_daemon):
    """A host whose key the broker does not know never joins, and the broker says why."""
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    config = keys._write("broker.toml", f'[security]\nsecret_key = "{keys.dir}/broker.key_secret"'
                         f'\nauthorized_keys = "{keys.authorized}"\n'
                         f'authorized_hosts = "{hosts}"\n')
    broker = Broker(tmp_path, args=["-c", config])
    try:
        start_daemon("-c", keys.host_toml(f'broker_key = "{keys.dir}/broker.key"\n'),
                     "--connect", broker.workers)
        wait_for(lambda: "refused unknown key" in broker.log(), 20, "the broker to refuse it")
        assert " ready: " not in broker.log()
    finally:
        broker.stop()


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("table, expect", [
    ('secret_key = "{d}/host.key_secret"', "both secret_key and authorized_keys"),
    ('secret_key = "{d}/nope.key_secret"\nauthorized_keys = "{d}"', "nope.key_secret"),
    ('secret_key = "{d}/host.key"\nauthorized_keys = "{d}"', "no secret key"),
    ('secret_key = "{d}/host.key_secret"\nauthorized_keys = "{d}/none"', "must be a directory"),
    ('[security.vms.x]\nuids = "10-1"', "expected ranges"),
])
def test_bad_security_config_is_one_line(tmp_path, keys, table, expect):
    """A broken [security] table: exit 2 (or 1) with one line naming the problem."""
    path = tmp_path / "bad.toml"
    path.write_text("[security]\n" + table.format(d=keys.dir) + "\n")
    r = subprocess.run([OFFLOADD, "serve", "-c", str(path), "--listen", "tcp://127.0.0.1:0"],
                       capture_output=True, timeout=30)
    assert r.returncode in (1, 2) and r.stderr.count(b"\n") == 1, r.stderr
    assert expect.encode() in r.stderr, r.stderr


def test_without_keys_a_daemon_on_all_interfaces_warns(tmp_path):
    """Told to listen beyond loopback without keys, the daemon says what that exposes."""
    log = tmp_path / "d.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([OFFLOADD, "serve", "--listen", "tcp://0.0.0.0:0"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "can run the allowlisted commands" in log.read_text(), 20,
                     "the warning")
        finally:
            proc.terminate()
            proc.wait(15)


def test_without_keys_the_default_is_loopback_only():
    """No keys and no --listen: loopback; with keys: every interface."""
    from offloadd.cli import parser
    from offloadd.config import Security, ServeConfig
    args = parser().parse_args(["serve"])
    assert ServeConfig().apply_flags(args).listen == "tcp://127.0.0.1:7788"
    keyed = ServeConfig(security=Security(secret_key="s", authorized_keys="a"))
    assert keyed.apply_flags(args).listen == "tcp://0.0.0.0:7788"


# --- the mount -------------------------------------------------------------------------------

def test_a_mount_with_keys_offloads_and_a_refused_one_says_why(start_daemon, start_mount, keys,
                                                               work):
    """The mount's agent uses the VM's keys: its shims run on the host. A mount whose key
    the host refuses logs the reason once and offers no shims of that host."""
    d = keyed_daemon(start_daemon, keys, allow_root=True,
                     extra='[security.vms.vm]\nuids = "0-65535"\n')
    m = start_mount(hosts=[d.hostport], config=keys.vm_toml(), wait_for_shim="sh")
    r = subprocess.run([str(m.path / "sh"), "-c", "echo $OFFLOAD_SLOT"], cwd=work,
                       capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"0\n"), r.stderr
    bad = start_mount(hosts=[d.hostport], config=keys.vm_toml("stranger"))
    wait_for(lambda: "is not authorized there" in bad.log(), 20, "the refusal in the log")
    assert not (bad.path / "sh").exists()
    assert bad.log().count("refused the connection") == 1


def test_hosts_with_their_own_keys(start_daemon, keys, tmp_path, work):
    """[security.server_keys] gives each host its own public key; a host with none (and no
    default server_key) is a one-line error, not an unencrypted connection."""
    subprocess.run([OFFLOADD, "keygen", str(keys.dir), "host2"], check=True, capture_output=True)
    rule = '[security.vms.vm]\nuids = "0-65535"\n'
    d1 = keyed_daemon(start_daemon, keys, rule, allow_root=True)
    d2 = start_daemon("-c", keys.host_toml(rule, name="host2"))
    config = keys._write("vm-per-host.toml", f'[security]\nsecret_key = "{keys.dir}/vm.key_secret"'
                         f'\n[security.server_keys]\n"{d1.hostport}" = "{keys.dir}/host.key"\n'
                         f'"tcp://{d2.hostport}" = "{keys.dir}/host2.key"\n')
    for d in (d1, d2):
        r = run(d.hostport, "sh", "-c", "echo $OFFLOAD_SLOT", config=config, cwd=work)
        assert (r.returncode, r.stdout) == (0, b"0\n"), r.stderr
    other = start_daemon()
    r = run(other.hostport, "sh", "-c", "touch ran", config=config, cwd=work)
    assert r.returncode == 255 and r.stderr.count(b"\n") == 1
    assert b"no server key for" in r.stderr and not (work / "ran").exists()
