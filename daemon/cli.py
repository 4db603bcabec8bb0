"""``offloadd``: the host side's command line (serve, status)."""
from __future__ import annotations

import argparse
import logging
import sys

from offloadfs.config import ConfigError

from .config import ServeConfig

log = logging.getLogger("offloadd")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``offloadd``."""
    p = argparse.ArgumentParser(prog="offloadd", description="Run offloaded jobs on this host.")
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
    k = sub.add_parser("keygen", help="write a CURVE key pair: DIR/NAME.key and "
                       "DIR/NAME.key_secret")
    k.add_argument("directory", metavar="DIR")
    k.add_argument("name", metavar="NAME", help="the key's name (the host's, or a broker's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``offloadd``."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        stream=sys.stderr,
                        format="offloadd: %(levelname)s %(message)s")
    try:
        return {"serve": serve, "status": status, "broker": broker,
                "keygen": keygen}[args.cmd](args)
    except ConfigError as exc:
        print(f"offloadd: {exc}", file=sys.stderr)
        return 2


def keygen(args) -> int:
    """``offloadd keygen DIR NAME``: write a key pair, say where."""
    from offloadfs.keys import keygen_command
    return keygen_command(args.directory, args.name)


def status(args) -> int:
    """``offloadd status``: print what the daemons (or brokers) report."""
    from offloadfs import status as st
    from offloadfs.config import ClientConfig, host_endpoint
    endpoints = [host_endpoint(h) for h in (args.host or ["127.0.0.1"])]
    keys = ClientConfig.load(args.config).keys if args.config else None
    lines, ok = st.report(endpoints, args.timeout, keys)
    print("\n".join(lines))
    return 0 if ok else 1


def broker(args) -> int:
    """``offloadd broker``: bind both ports and broker jobs until SIGTERM."""
    import zmq

    from offloadfs.config import load_toml, section, typed

    from .broker import Broker, BrokerConfig
    from .config import Security
    data = load_toml(args.config, "/etc/offloadfs/offloadd.toml")
    table = section(data, "broker")
    cfg = BrokerConfig(security=Security.from_toml(data))
    cfg.check_security()
    cfg.clients = args.clients or typed(table, "clients", str, cfg.default("clients"))
    cfg.workers = args.workers or typed(table, "workers", str, cfg.default("workers"))
    cfg.name = args.name or typed(table, "name", str, cfg.name)
    cfg.metrics = args.metrics or typed(table, "metrics", str, cfg.metrics)
    cfg.suspend_limit = float(typed(table, "suspend_limit", (int, float), cfg.suspend_limit))
    if cfg.suspend_limit < 0:
        raise ConfigError(f"suspend_limit = {cfg.suspend_limit}: expected seconds >= 0")
    try:
        server = Broker(cfg)
    except zmq.ZMQError as exc:
        print(f"offloadd: cannot bind the broker's ports: {exc}", file=sys.stderr)
        return 1
    server.run()
    return 0


def serve(args) -> int:
    """``offloadd serve``: bind and run jobs until SIGTERM."""
    import zmq

    from .server import Server
    config = ServeConfig.from_file(args.config).apply_flags(args)
    try:
        server = Server(config)
    except zmq.ZMQError as exc:
        print(f"offloadd: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 1
    server.run()
    return 0


def entry() -> None:
    """Console-script entry point of ``offloadd``."""
    sys.exit(main())
