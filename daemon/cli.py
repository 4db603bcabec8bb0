"""``offloadd``: the host side's command line (serve, status)."""
from __future__ import annotations

import argparse
import logging
import sys

from offloadfs import logsetup
from offloadfs.commandline import add_keygen, add_version, keygen, run

from .config import BrokerConfig, ServeConfig

log = logging.getLogger("offloadd")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``offloadd``."""
    p = argparse.ArgumentParser(prog="offloadd", description="Run offloaded jobs on this host.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="serve jobs from clients")
    s.add_argument("-c", "--config", help="TOML file (default /etc/offloadfs/offloadd.toml)")
    s.add_argument("--listen", help="ZeroMQ endpoint to bind (default tcp://0.0.0.0:7788 with "
                   "keys, tcp://127.0.0.1:7788 without)")
    s.add_argument("--connect", action="append", metavar="tcp://BROKER:PORT",
                   help="take jobs from this broker's worker port (repeatable); without "
                   "--listen, no client port is opened")
    s.add_argument("--slots", type=int, help="jobs run at once (default: number of CPUs)")
    s.add_argument("--tag", action="append", help="a tag this host offers (repeatable)")
    s.add_argument("--command", action="append", metavar="NAME=/abs/path",
                   help="allow a command (repeatable)")
    s.add_argument("--allow-root", action="store_true", help="run jobs that claim uid 0")
    s.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="a limit on each job, overriding the file's [limits] (repeatable): "
                   "cpu=SECONDS, memory=BYTES, open_files=N, file_size=BYTES, processes=N "
                   "(per user), output=BYTES; sizes take a K, M or G suffix")
    s.add_argument("--name", help="host name reported to clients")
    s.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics here")
    s.add_argument("--state-dir", metavar="DIR", help="where running jobs' process groups are "
                   "recorded, so that none outlives offloadd (default /run/offloadd/jobs)")
    s.add_argument("--client-timeout", type=float, help="seconds of client silence before "
                   "its jobs are killed (default 5)")
    s.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    b = sub.add_parser("broker", help="spread clients' jobs over hosts with free slots")
    b.add_argument("-c", "--config", help="TOML file (default /etc/offloadfs/offloadd.toml)")
    b.add_argument("--clients", help="endpoint for clients (default tcp://0.0.0.0:7788 with "
                   "keys, tcp://127.0.0.1:7788 without)")
    b.add_argument("--workers", help="endpoint for hosts (default tcp://0.0.0.0:7789 with "
                   "keys, tcp://127.0.0.1:7789 without)")
    b.add_argument("--name", help="broker name reported to clients")
    b.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics here")
    b.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    st = sub.add_parser("status", help="show a host's slots, queue and recent jobs")
    st.add_argument("-H", "--host", action="append", metavar="HOST[:PORT]",
                    help="the daemon or broker to ask (default 127.0.0.1:7788; repeatable)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    st.add_argument("-c", "--config", metavar="FILE", help="a client's TOML file whose "
                    "[security] keys to ask with (secret_key, server_key)")
    st.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_keygen(sub, "the host's, or a broker's")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``offloadd``."""
    args = parser().parse_args(argv)
    logsetup.setup("offloadd", getattr(args, "verbose", False))
    return run("offloadd", {"serve": serve, "status": status, "broker": broker,
                            "keygen": keygen}, args)


def status(args) -> int:
    """``offloadd status``: print what the daemons (or brokers) report."""
    from offloadfs import reach
    from offloadfs import status as st
    from offloadfs.config import ClientConfig
    from offloadfs.settings import host_endpoint
    endpoints = {host_endpoint(h): "" for h in args.host or []} or \
        {host_endpoint("127.0.0.1"): reach.origin("default")}
    keys = ClientConfig.load(args.config).keys if args.config else None
    lines, errors = st.report(endpoints, args.timeout, keys)
    for error in errors:
        print(f"offloadd status: {error}", file=sys.stderr)
    if lines:
        print("\n".join(lines))
    return 1 if errors else 0


def broker(args) -> int:
    """``offloadd broker``: bind both ports and broker jobs until SIGTERM."""
    from .broker import Broker
    config = BrokerConfig.from_file(args.config).apply_flags(args)
    return _run_server(Broker, config, "cannot bind the broker's ports")


def serve(args) -> int:
    """``offloadd serve``: bind and run jobs until SIGTERM."""
    from .server import Server
    config = ServeConfig.from_file(args.config).apply_flags(args)
    return _run_server(Server, config, f"cannot listen on {config.listen}")


def _run_server(make, config, failure: str) -> int:
    """Build a server or broker with ``make(config)`` (it binds its ports) and run it until
    SIGTERM; 1 with one line if it cannot bind (``failure`` says what) or serve its metrics."""
    import zmq

    from .metrics import MetricsError

    try:
        server = make(config)
    except zmq.ZMQError as exc:
        print(logsetup.error_line(f"offloadd: {failure}: {exc}"), file=sys.stderr)
        return 1
    except MetricsError as exc:
        print(logsetup.error_line(f"offloadd: {exc}"), file=sys.stderr)
        return 1
    server.run()
    return 0


def entry() -> None:
    """Console-script entry point of ``offloadd``."""
    sys.exit(main())
