#!/usr/bin/python3
"""The guest's end of the rig's control channel (a virtio-serial port): stdlib only.

The host writes one JSON request per line; each runs on its own thread and its answer is one
JSON line carrying the request's ``id``. Requests (``op``):

- ``ping``: ``{}``, to tell that the guest is up;
- ``run``: ``argv`` (never a shell), ``cwd``, ``env`` (over a plain PATH), ``uid``/``gid``,
  ``input`` (base64) and ``timeout``: ``rc``, ``out`` and ``err`` (base64);
- ``spawn``: the same without ``input``, in its own session, stdout and stderr to ``log``:
  ``pid``;
- ``kill``: ``pid``, ``signal``: ``{}``;
- ``poweroff``: sync and power off.

A request that fails answers ``error`` (one line). Nothing here is reachable from a network:
the port is a character device that only QEMU's host side opens.
"""
import base64
import glob
import json
import os
import signal
import subprocess
import sys
import threading

NAME = "org.offloadfs.control"
PATH = "/opt/offloadfs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def port_path() -> str:
    """The device node of the port QEMU named ``NAME``."""
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as f:
            if f.read().strip() == NAME:
                return "/dev/" + name_file.split("/")[-2]
    raise SystemExit(f"control: no virtio port named {NAME}")


def popen_args(req: dict) -> dict:
    """subprocess keyword arguments from a request's argv, cwd, env and user."""
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env.update(req.get("env") or {})
    kw = {"cwd": req.get("cwd") or "/", "env": env}
    if req.get("uid") is not None:
        kw.update(user=req["uid"], group=req.get("gid", req["uid"]), extra_groups=[])
    return kw


def run(req: dict) -> dict:
    """Run a command to its end."""
    done = subprocess.run(req["argv"], input=base64.b64decode(req.get("input", "")),
                          capture_output=True, timeout=req.get("timeout", 120), **popen_args(req))
    return {"rc": done.returncode, "out": base64.b64encode(done.stdout).decode(),
            "err": base64.b64encode(done.stderr).decode()}


def spawn(req: dict) -> dict:
    """Start a command in the background, its output to a log file."""
    with open(req["log"], "ab") as log:
        proc = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, **popen_args(req))
    threading.Thread(target=proc.wait, daemon=True).start()   # reaped when it ends
    return {"pid": proc.pid}


def kill(req: dict) -> dict:
    """Send a signal to a process."""
    os.kill(req["pid"], req.get("signal", signal.SIGTERM))
    return {}


def poweroff(req: dict) -> dict:
    """Flush and power off (QEMU then exits: -no-reboot)."""
    os.sync()
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")
    return {}


OPS = {"ping": lambda req: {}, "run": run, "spawn": spawn, "kill": kill, "poweroff": poweroff}


class Port:
    """The serial port: requests in, answers out (one writer at a time)."""

    def __init__(self, path: str):
        """Open the port both ways (a port opens once: one file for both)."""
        self.reader = self.writer = open(path, "r+b", buffering=0)
        self.lock = threading.Lock()

    def answer(self, req_id, body: dict) -> None:
        """Write one answer line."""
        line = json.dumps({"id": req_id, **body}).encode() + b"\n"
        with self.lock:
            view = memoryview(line)
            while view:   # an unbuffered write to the port may take part of the line
                view = view[self.writer.write(view):]

    def serve(self, req: dict) -> None:
        """One request, on its own thread."""
        try:
            body = OPS[req["op"]](req)
        except Exception as exc:   # the host gets the reason, in one line
            body = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        self.answer(req.get("id"), body)

    def loop(self) -> None:
        """Read request lines until the host side goes away for good."""
        buf = b""
        while True:
            chunk = self.reader.read(65536)
            if not chunk:   # no host connected: the port reads empty; wait for one
                threading.Event().wait(0.2)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                threading.Thread(target=self.serve, args=(req,), daemon=True).start()


if __name__ == "__main__":
    print("control: serving on", port_path(), file=sys.stderr, flush=True)
    Port(port_path()).loop()
