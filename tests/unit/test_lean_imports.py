"""offld starts lean (issue 16): ``import offloadfs.offld`` (the hand-off to a mount's agent)
loads the standard library and offld's few leaf modules only, no zmq; its direct path
(``offloadfs.direct``) pulls in no module that only some runs need; and the channel's own
monitor parsing reads what libzmq sends."""
import subprocess
import sys

import zmq

from offloadfs.channel import recv_monitor_event

# Each is a few ms of every offld's start-up, and offld -- true (no config, no mount, no
# export) needs none: asyncio and what it brings (pyzmq's zmq.utils.monitor imports
# zmq.asyncio), the NFS servers' tools (export), keys and logging (only with [security]),
# a failed connection's probe (socket), the mount's caller (ctypes), an error hint (difflib).
NOT_IMPORTED = ("asyncio", "zmq.asyncio", "zmq.utils.monitor", "ssl", "concurrent.futures",
                "subprocess", "shutil", "tempfile", "socket", "ctypes", "logging", "difflib",
                "offloadfs.keys", "offloadfs.caller")


# What offld's hand-off path may load of the package: offld itself and these leaves.
HANDOFF_PATH = {"offloadfs", "offloadfs.offld", "offloadfs.handoff", "offloadfs.mountinfo",
                "offloadfs.settings"}
# ... and of the standard library, none of these Python modules (their C halves, _json,
# _signal, _struct, _socket, serve it): enum alone, which re, signal and socket load, is
# ms of each start on a slow VM; the job log's line comes made from the agent.
HANDOFF_STDLIB_NOT = ("enum", "re", "json", "signal", "struct", "tomllib", "datetime",
                      "types", "functools", "collections")


def _loaded(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``module``."""
    done = subprocess.run([sys.executable, "-c", f"import {module}, sys; "
                           "print('\\n'.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


def test_importing_offld_loads_no_zmq_and_only_the_hand_offs_modules():
    """offld's start (the hand-off path) loads no zmq, no msgpack, no asyncio, no argparse
    (offld CMD without options needs no parser), of the package only HANDOFF_PATH, and none
    of HANDOFF_STDLIB_NOT."""
    loaded = _loaded("offloadfs.offld")
    ours = {m for m in loaded if m == "offloadfs" or m.startswith("offloadfs.")}
    assert ours == HANDOFF_PATH
    assert sorted(loaded.intersection({"zmq", "msgpack", "argparse", *NOT_IMPORTED,
                                       *HANDOFF_STDLIB_NOT})) == []


def test_importing_the_direct_path_imports_nothing_the_common_run_does_not_need():
    """A fresh interpreter that imports offld's direct path has none of NOT_IMPORTED loaded."""
    loaded = _loaded("offloadfs.direct")
    assert "offloadfs.direct" in loaded and "zmq" in loaded
    assert sorted(loaded.intersection(NOT_IMPORTED)) == []


def test_offloadfs_run_imports_neither_the_mount_nor_status():
    """``offloadfs run`` is offld: importing the command line loads no FUSE binding, mount or
    status module (they load for their own subcommands)."""
    done = subprocess.run([sys.executable, "-c", "import offloadfs.cli, sys; "
                           "print('\\n'.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, check=True)
    loaded = set(done.stdout.split())
    assert "offloadfs.offld" in loaded
    assert sorted(loaded.intersection({"offloadfs.mount", "offloadfs.status", "offloadfs.fs",
                                       "offloadfs.fusebinding", "offloadfs.agent"})) == []


def test_a_monitor_event_reads_its_event_value_and_endpoint():
    """A real connection's EVENT_CONNECTED comes back as pyzmq's dict: the event, the fd as
    its value, the endpoint."""
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    try:
        server.bind("tcp://127.0.0.1:*")
        endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
        monitor = client.get_monitor_socket(zmq.EVENT_CONNECTED)
        try:
            client.connect(endpoint)
            assert monitor.poll(10_000), "no monitor event within 10 s"
            event = recv_monitor_event(monitor)
        finally:
            client.disable_monitor()
            monitor.close(linger=0)
    finally:
        client.close(linger=0)
        server.close(linger=0)
        ctx.term()
    assert event["event"] == zmq.EVENT_CONNECTED and isinstance(event["event"], zmq.Event)
    assert event["value"] > 2   # the connection's fd: past stdin, stdout and stderr
    assert event["endpoint"] == endpoint.encode()
