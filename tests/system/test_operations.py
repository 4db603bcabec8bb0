"""Operations: the metrics a daemon and a broker serve, how they log, and what ``status`` shows.

Real daemons and brokers on loopback, real ``offld`` clients, the metrics scraped over HTTP as
Prometheus would. Each outcome label is made by a job that really ends that way.
"""
from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import urllib.request

from offloadfs import __version__
from offloadfs.status import fetch

from ..harness import OFFLD, OFFLOADD, OFFLOADFS, offld, offld_argv, wait_for

METRICS_AT = re.compile(r"metrics on http://(\S+)/metrics")


def scrape(address: str) -> str:
    """The text of a metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return reply.read().decode()


def jobs_counted(text: str, role: str = "daemon") -> dict[tuple[str, str], float]:
    """{(command, outcome): count} from a scrape."""
    found = re.findall(rf'^offload_{role}_jobs_total{{command="([^"]*)",outcome="([^"]*)"}} '
                       r"(\S+)$", text, re.M)
    return {(command, outcome): float(n) for command, outcome, n in found}


def started_line(proc: subprocess.Popen) -> None:
    """Wait (bounded) for a job's first line, ``started``."""
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready and proc.stdout.readline() == b"started\n", "the job did not start"


def end(*procs: subprocess.Popen) -> None:
    """Kill and reap whatever of ``procs`` still runs, close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(20)
        if proc.stdout:
            proc.stdout.close()


def test_metrics_count_every_outcome(start_daemon, work):
    """Each way a job ends has its own outcome label; no _created series; build_info; the
    address bound for port 0 is logged; status shows the host of each recent job."""
    d = start_daemon("--name", "h1", "--slots", "1", "--metrics", "127.0.0.1:0",
                     "--limit", "output=64K", "--client-timeout", "2")
    address = d.ready_log(METRICS_AT).group(1)
    assert not address.endswith(":0")
    for command, status in ((["sh", "-c", "exit 0"], 0), (["sh", "-c", "exit 3"], 3),
                            (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
                            (["sh", "-c", "head -c 1000000 /dev/zero"], 255), (["ls"], 255)):
        got = offld(d, *command, cwd=work)
        assert got.returncode == status, (command, got.stderr)
    holder = subprocess.Popen(offld_argv(d, "sh", "-c", "echo started; exec sleep 60"),
                              cwd=work, stdout=subprocess.PIPE)
    waiter = None
    try:
        started_line(holder)
        waiter = subprocess.Popen(offld_argv(d, "sleep", "60"), cwd=work,
                                  stdout=subprocess.PIPE)
        wait_for(lambda: fetch(d.endpoint, 5)["queued"] == 1, 20, "the second job to queue")
        waiter.send_signal(signal.SIGTERM)   # queued: its client cancels it
        waiter.wait(20)
        holder.kill()                        # running: its client is lost
        holder.wait(20)
        counted = wait_for(lambda: (c := jobs_counted(scrape(address))).get(("sh", "lost"))
                           and c, 20, "the lost job to be counted")
    finally:
        end(holder, *([waiter] if waiter else []))
    assert counted == {("sh", "done"): 1, ("sh", "failed"): 1, ("sh", "signal"): 1,
                       ("sh", "error"): 1, ("(other)", "refused"): 1,
                       ("sleep", "cancelled"): 1, ("sh", "lost"): 1}, counted
    text = scrape(address)
    assert "_created" not in text
    assert re.search(rf'^offload_daemon_build_info{{.*version="{re.escape(__version__)}".*}} '
                     r"1\.0$", text, re.M), text
    status = subprocess.run([OFFLOADD, "status", "-H", d.hostport], capture_output=True,
                            text=True, timeout=30)
    jobs = [line for line in status.stdout.splitlines() if " status " in line]
    assert status.returncode == 0 and len(jobs) == 6, status.stdout
    assert all(re.search(r" on (\S+)", line).group(1) == "h1" for line in jobs), status.stdout


def test_metrics_on_a_port_in_use_is_one_line(tmp_path):
    """--metrics on a taken port: one line saying so, exit 1, no traceback (not exit 2: the
    port may be free at the next start)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for role in (["serve", "--listen", "tcp://127.0.0.1:0"],
                     ["broker", "--clients", "tcp://127.0.0.1:0", "--workers",
                      "tcp://127.0.0.1:0"]):
            got = subprocess.run([OFFLOADD, *role, "--metrics", f"127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=30, cwd=tmp_path)
            assert got.returncode == 1 and got.stderr == (
                f"offloadd: cannot serve metrics on 127.0.0.1:{port}: address already in "
                "use\n"), got.stderr


def test_broker_metrics_and_status_name_the_host(start_broker, start_daemon, work):
    """A broker counts its jobs by outcome too, and its status lists them with their host."""
    broker = start_broker(args=["--metrics", "127.0.0.1:0"])
    address = broker.ready_log(METRICS_AT).group(1)
    start_daemon("--connect", broker.workers, "--name", "hb", listen=False)
    broker.wait_hosts(1)
    front = f"127.0.0.1:{broker.client_port}"
    for command, status in ((["sh", "-c", "exit 0"], 0), (["sh", "-c", "exit 3"], 3),
                            (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
                            (["nosuch"], 255)):
        got = subprocess.run([OFFLD, "-L", front, "--", *command], cwd=work,
                             capture_output=True, timeout=60)
        assert got.returncode == status, (command, got.stderr)
    assert jobs_counted(scrape(address), "broker") == {
        ("sh", "done"): 1, ("sh", "failed"): 1, ("sh", "signal"): 1,
        ("(other)", "refused"): 1}
    assert "_created" not in scrape(address)
    status = subprocess.run([OFFLOADD, "status", "-H", front], capture_output=True, text=True,
                            timeout=30)
    jobs = [line for line in status.stdout.splitlines() if " status " in line]
    assert [re.search(r" on (\S+)", line).group(1) for line in jobs] == ["hb", "hb", "hb", "-"], \
        status.stdout


def keygen(tmp_path) -> dict[str, str]:
    """A host's and a VM's key pairs (the real keygen commands), the VM's key authorized;
    the host's and the VM's config files."""
    keys = tmp_path / "keys"
    for prog, name in ((OFFLOADD, "host"), (OFFLOADFS, "vm1")):
        subprocess.run([prog, "keygen", str(keys), name], check=True, capture_output=True)
    (keys / "authorized").mkdir()
    (keys / "authorized" / "vm1.key").write_bytes((keys / "vm1.key").read_bytes())
    host, vm = tmp_path / "host.toml", tmp_path / "vm.toml"
    host.write_text(f'[serve]\nlisten = "tcp://127.0.0.1:0"\n[security]\n'
                    f'secret_key = "{keys}/host.key_secret"\n'
                    f'authorized_keys = "{keys}/authorized"\n')
    vm.write_text(f'[security]\nsecret_key = "{keys}/vm1.key_secret"\n'
                  f'server_key = "{keys}/host.key"\n')
    return {"host": str(host), "vm": str(vm)}


def test_a_refusal_is_a_warning_naming_the_vm_uid_and_address(start_daemon, tmp_path, work):
    """A refused job is logged at WARNING with the VM's key name, the uid and the address."""
    configs = keygen(tmp_path)
    d = start_daemon("-c", configs["host"], allow_root=False, listen=False)
    port = d.ready_log(re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)")).group(1)
    got = subprocess.run([OFFLD, "-c", configs["vm"], "-H", f"127.0.0.1:{port}", "--", "sh",
                          "-c", "exit 0"], cwd=work, capture_output=True, timeout=60)
    assert got.returncode == 255 and b"root" in got.stderr, got.stderr
    line = d.wait_until(lambda: re.search(r"^offloadd: WARNING refused job \S+ \(sh\) of "
                                          r"(.*)$", d.log(), re.M), "log the refusal")
    assert re.match(r"VM vm1, uid 0, at 127\.0\.0\.1: .*root", line.group(1)), line.group(0)


def test_mount_log_file_keeps_stamped_lines(start_mount, daemon, tmp_path):
    """offloadfs mount --log FILE: the log goes to the file, each line with its time."""
    log = tmp_path / "mount.log"
    mount = start_mount("--log", str(log), "-H", daemon.hostport, wait_for_shim="sh")
    mount.unmount()
    lines = log.read_text().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ offloadfs: INFO mounting ", lines[0])
    assert any(" offloadfs: INFO unmounted " in line for line in lines), lines
    assert "offloadfs: INFO" not in mount.log()
