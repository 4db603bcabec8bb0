"""The VM side's settings (TOML) for its client.

:class:`ClientConfig` is what ``offld``, ``offloadfs run`` and the mount's agent read;
command-line flags override the file. The readers of files and fields it shares with the daemon
are in ``settings`` (``DEFAULT_PORT``, ``ConfigError`` and ``host_endpoint`` are still
imported from here too).
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from .export import ExportConfig
from .settings import (  # noqa: F401  (CLIENT_CONFIG, state_dir: imported from here too)
    CLIENT_CONFIG,
    DEFAULT_PORT,
    ConfigError,
    host_endpoint,
    job_log_of,
    load_toml,
    section,
    state_dir,
    typed,
)
from .tomlcheck import ANY

if TYPE_CHECKING:
    from .keys import Keychain

SCHEMA = {   # every table and key the VM's file may have (tomlcheck); ANY: names of one's own
    "client": {"hosts", "brokers", "connect_timeout", "heartbeat", "liveness", "job_log",
               "forget_after"},
    "env": {"pass"},
    "commands": {"allow", "deny"},
    "mount": {"state_file"},
    "tags": ANY,
    "staging": {"commands"},
    "export": {"backend", "root", "listen", "advertise", "clients"},
    "security": {"secret_key", "server_key"},
    "security.server_keys": ANY,
}


@dataclasses.dataclass
class ClientConfig:
    """Settings of the VM side's client: where to send jobs and how to behave."""

    hosts: list[str] = dataclasses.field(default_factory=lambda: [f"tcp://127.0.0.1:{DEFAULT_PORT}"])
    brokers: list[str] = dataclasses.field(default_factory=list)
    connect_timeout: float = 5.0
    heartbeat: float = 1.0
    liveness: float = 10.0
    env_pass: list[str] = dataclasses.field(default_factory=list)
    job_log: str = ""
    job_log_given: str = ""        # the file's own [client] job_log ("" when it names none)
    forget_after: float = 3600.0
    allow: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    deny: list[str] = dataclasses.field(default_factory=list)
    state_file: str = ""
    export: ExportConfig | None = None
    stage_commands: list[str] = dataclasses.field(default_factory=list)
    tags: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    keys: Keychain | None = None   # CURVE on every connection when set
    path: str = CLIENT_CONFIG      # the file read, or the one looked for
    configured: bool = False       # the file names hosts or brokers (else: the default host)

    def timing(self):
        """Heartbeat, liveness and acknowledgement limits for job runs."""
        from .jobrun import Timing
        return Timing(self.heartbeat, self.liveness, self.connect_timeout)

    @classmethod
    def load(cls, path: str | None) -> ClientConfig:
        """Read ``path`` (else $OFFLOADFS_CONFIG, else the system file if it exists)."""
        path = path or os.environ.get("OFFLOADFS_CONFIG") or None
        data = load_toml(path, CLIENT_CONFIG, SCHEMA)
        client = section(data, "client")
        cfg = cls(path=path or CLIENT_CONFIG)
        hosts = typed(client, "hosts", list, None)
        if hosts is not None:
            cfg.hosts = [host_endpoint(str(h)) for h in hosts]
        cfg.brokers = [host_endpoint(str(b)) for b in typed(client, "brokers", list, [])]
        cfg.configured = hosts is not None or bool(cfg.brokers)
        cfg.connect_timeout = float(typed(client, "connect_timeout", (int, float), 5.0))
        cfg.heartbeat = float(typed(client, "heartbeat", (int, float), 1.0))
        cfg.liveness = float(typed(client, "liveness", (int, float), 10.0))
        cfg.job_log = job_log_of(data)
        cfg.job_log_given = typed(client, "job_log", str, "")
        cfg.env_pass = [str(x) for x in typed(section(data, "env"), "pass", list, [])]
        cfg.forget_after = float(typed(client, "forget_after", (int, float), 3600.0))
        commands = section(data, "commands")
        cfg.allow = [str(x) for x in typed(commands, "allow", list, ["*"])]
        cfg.deny = [str(x) for x in typed(commands, "deny", list, [])]
        cfg.state_file = typed(section(data, "mount"), "state_file", str,
                               os.path.join(state_dir(), "state.json"))
        cfg.tags = {str(k): [str(t) for t in (v if isinstance(v, list) else [v])]
                    for k, v in section(data, "tags").items()}
        cfg.stage_commands = [str(x) for x in
                              typed(section(data, "staging"), "commands", list, [])]
        cfg.export = ExportConfig.from_toml(data)
        cfg.keys = client_keys(section(data, "security"))
        return cfg


def client_keys(security: dict) -> Keychain | None:
    """The [security] table's CURVE keys of a client, or None without keys:
    secret_key with server_key (any host) and/or [security.server_keys] (per host)."""
    secret = typed(security, "secret_key", str, "")
    server = typed(security, "server_key", str, "")
    per_host = {host_endpoint(str(k)): str(v) for k, v in
                section(security, "server_keys").items()}
    if not (secret or server or per_host):
        return None
    if not secret or not (server or per_host):
        raise ConfigError("[security] needs secret_key and server_key (or "
                          "[security.server_keys]), or none of them")
    from .keys import Keychain  # here: keys (and logging) only for a VM that has keys
    return Keychain.load(secret, server, per_host)
