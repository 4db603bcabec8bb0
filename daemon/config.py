"""The host side's settings: /etc/offloadfs/offloadd.toml, overridden by ``offloadd`` flags.

:class:`ServeConfig` is what ``offloadd serve`` reads, :class:`BrokerConfig` what ``offloadd
broker`` reads; both share the [security] table (:class:`Security`).
"""
from __future__ import annotations

import dataclasses
import os
import re

from offloadfs.settings import ConfigError, load_toml, section, typed
from offloadfs.tomlcheck import ANY

from . import policy
from .mounts import CLIENTS, DEFAULT_MOUNT_OPTIONS

DAEMON_CONFIG = "/etc/offloadfs/offloadd.toml"
LIMITS = ("cpu", "memory", "open_files", "file_size", "processes", "output")   # [limits] keys
SIZES = ("memory", "file_size", "output")   # limits in bytes: a K, M or G suffix may follow
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DEFAULT_LISTEN = "tcp://0.0.0.0:7788"        # with keys
LOOPBACK_LISTEN = "tcp://127.0.0.1:7788"     # without keys, unless told otherwise
SCHEMA = {   # every table and key of offloadd.toml (tomlcheck), which serve and broker share
    "serve": {"listen", "connect", "slots", "allow_root", "tags", "heartbeat", "client_timeout",
              "suspend_limit", "name", "scratch", "state_dir", "slot_env", "metrics"},
    "commands": ANY,
    "mounts": {"client", "dir", "idle_unmount", "options", "path_map"},
    "env": {"pass"},
    "limits": set(LIMITS),
    "security": {"secret_key", "authorized_keys", "authorized_hosts", "broker_key",
                 "allow_root"},
    "security.vms.*": {"uids", "gids", "exports"},
    "broker": {"clients", "workers", "name", "metrics", "suspend_limit", "client_timeout"},
}


@dataclasses.dataclass
class Security:
    """The [security] table of a daemon's or broker's file: CURVE keys and what each VM may
    claim."""

    secret_key: str = ""
    authorized_keys: str = ""
    authorized_hosts: str = ""   # the broker's: hosts' public keys for its worker port
    broker_key: str = ""         # a host's: the public key of the brokers it connects to
    allow_root: bool = False
    vms: dict[str, policy.VmRule] = dataclasses.field(default_factory=dict)

    @property
    def on(self) -> bool:
        """True when CURVE is configured."""
        return bool(self.secret_key)

    @classmethod
    def from_toml(cls, data: dict) -> Security:
        """Read and check the [security] table."""
        table, sec = section(data, "security"), cls()
        for name in ("secret_key", "authorized_keys", "authorized_hosts", "broker_key"):
            setattr(sec, name, typed(table, name, str, ""))
        sec.allow_root = typed(table, "allow_root", bool, False)
        sec.vms = {str(name): _vm_rule(name, rule) for name, rule in
                   section(table, "vms").items()}
        return sec.check()

    def check(self) -> Security:
        """Keys come as a whole: a secret key and the keys it authorizes."""
        if bool(self.secret_key) != bool(self.authorized_keys):
            raise ConfigError("[security] needs both secret_key and authorized_keys (or neither)")
        if self.broker_key and not self.secret_key:
            raise ConfigError("[security] broker_key needs secret_key")
        return self


def _vm_rule(name: str, table) -> policy.VmRule:
    """One [security.vms.NAME] table as a rule."""
    if not isinstance(table, dict):
        raise ConfigError(f"[security.vms.{name}] must be a table")
    try:
        uids, gids = (policy.parse_ranges(typed(table, k, str, "")) if k in table else None
                      for k in ("uids", "gids"))
    except ValueError as exc:
        raise ConfigError(f"[security.vms.{name}] {exc}") from None
    exports = typed(table, "exports", list, None)
    return policy.VmRule(uids, gids, None if exports is None else tuple(map(str, exports)))


def is_loopback(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach (loopback or ipc)."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclasses.dataclass
class ServeConfig:
    """What ``offloadd serve`` needs; built from the file, then the flags."""

    listen: str = ""          # "" until apply_flags: depends on keys
    connect: list[str] = dataclasses.field(default_factory=list)
    slots: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allow_root: bool = False
    commands: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: list[str] = dataclasses.field(default_factory=list)
    env_pass: list[str] = dataclasses.field(default_factory=lambda: list(policy.DEFAULT_PASS))
    heartbeat: float = 1.0
    client_timeout: float = 5.0
    suspend_limit: float = 86400.0   # how long a client that stopped itself (Ctrl-Z) keeps its job
    name: str = ""
    scratch_dir: str = "/var/lib/offloadd/scratch"
    state_dir: str = "/run/offloadd/jobs"   # records of running jobs' process groups (warden)
    mounts_client: str = "kernel"
    mounts_dir: str = "/var/lib/offloadd/mnt"
    idle_unmount: float = 300.0
    mount_options: str = DEFAULT_MOUNT_OPTIONS
    path_map: dict[str, str] = dataclasses.field(default_factory=dict)
    slot_env: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: str = ""
    limits: dict[str, int] = dataclasses.field(default_factory=dict)
    security: Security = dataclasses.field(default_factory=Security)

    @classmethod
    def from_file(cls, path: str | None) -> ServeConfig:
        """Read the [serve], [commands], [env] and [limits] tables of ``path`` (or the system
        file)."""
        data = load_toml(path, DAEMON_CONFIG, SCHEMA)
        serve, cfg = section(data, "serve"), cls()
        cfg.listen = typed(serve, "listen", str, "")
        cfg.connect = [str(c) for c in typed(serve, "connect", list, [])]
        cfg.slots = typed(serve, "slots", int, cfg.slots)
        cfg.allow_root = typed(serve, "allow_root", bool, cfg.allow_root)
        cfg.tags = [str(t) for t in typed(serve, "tags", list, cfg.tags)]
        cfg.heartbeat = float(typed(serve, "heartbeat", (int, float), cfg.heartbeat))
        cfg.client_timeout = float(typed(serve, "client_timeout", (int, float), cfg.client_timeout))
        cfg.suspend_limit = float(typed(serve, "suspend_limit", (int, float), cfg.suspend_limit))
        cfg.name = typed(serve, "name", str, cfg.name)
        cfg.scratch_dir = typed(serve, "scratch", str, cfg.scratch_dir)
        cfg.state_dir = typed(serve, "state_dir", str, cfg.state_dir)
        cfg.slot_env = {str(k): str(v) for k, v in typed(serve, "slot_env", dict, {}).items()}
        cfg.metrics = typed(serve, "metrics", str, cfg.metrics)
        cfg.commands = {str(k): str(v) for k, v in section(data, "commands").items()}
        mounts = section(data, "mounts")
        cfg.mounts_client = typed(mounts, "client", str, cfg.mounts_client)
        cfg.mounts_dir = typed(mounts, "dir", str, cfg.mounts_dir)
        cfg.idle_unmount = float(typed(mounts, "idle_unmount", (int, float), cfg.idle_unmount))
        cfg.mount_options = typed(mounts, "options", str, cfg.mount_options)
        cfg.path_map = {str(k): str(v) for k, v in typed(mounts, "path_map", dict, {}).items()}
        cfg.env_pass += [str(x) for x in typed(section(data, "env"), "pass", list, [])]
        cfg.limits = dict(section(data, "limits"))
        cfg.security = Security.from_toml(data)
        cfg.allow_root = cfg.allow_root or cfg.security.allow_root
        return cfg

    def apply_flags(self, args) -> ServeConfig:
        """Override with the command-line flags that were given."""
        for name in ("listen", "slots", "name", "client_timeout", "metrics", "state_dir"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(self, name, value)
        self.connect += args.connect or []
        if not self.listen and not self.connect:   # a host with brokers listens only if told to
            self.listen = DEFAULT_LISTEN if self.security.on else LOOPBACK_LISTEN
        self.allow_root = self.allow_root or bool(args.allow_root)
        self.tags += args.tag or []
        self.commands.update(_pairs("--command", "NAME=/abs/path", args.command or []))
        self.limits.update(_pairs("--limit", "NAME=VALUE", getattr(args, "limit", None) or []))
        return self.check()

    def check(self) -> ServeConfig:
        """Refuse settings that cannot work, with one clear line."""
        if self.slots < 1:
            raise ConfigError(f"slots = {self.slots}: must be at least 1")
        if self.connect and self.security.on and not self.security.broker_key:
            raise ConfigError("--connect with keys needs [security] broker_key (the broker's "
                              "public key)")
        for endpoint in ([self.listen] if self.listen else []) + self.connect:
            if not endpoint.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"{endpoint}: expected tcp://ADDR:PORT")
        try:
            policy.Allowlist(self.commands)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.state_dir.startswith("/"):
            raise ConfigError(f"state_dir = {self.state_dir!r}: must be an absolute path")
        if self.mounts_client not in CLIENTS:
            raise ConfigError(f"[mounts] client = {self.mounts_client!r}: expected kernel or "
                              f"userspace")
        _mount_options(self.mount_options)
        if any(not (k.startswith("/") and v.startswith("/")) for k, v in self.path_map.items()):
            raise ConfigError("[mounts] path_map: both sides must be absolute paths")
        self.limits = {name: _limit(name, value) for name, value in self.limits.items()}
        return self


@dataclasses.dataclass
class BrokerConfig:
    """What ``offloadd broker`` needs; built from the file, then the flags."""

    clients: str = "tcp://0.0.0.0:7788"
    workers: str = "tcp://0.0.0.0:7789"
    heartbeat: float = 1.0
    liveness: float = 3.0
    client_timeout: float = 5.0
    suspend_limit: float = 86400.0   # how long a suspended client's silence is no death
    name: str = ""
    metrics: str = ""
    security: Security = dataclasses.field(default_factory=Security)

    @classmethod
    def from_file(cls, path: str | None) -> BrokerConfig:
        """Read the [broker] and [security] tables of ``path`` (or the system file)."""
        data = load_toml(path, DAEMON_CONFIG, SCHEMA)
        table = section(data, "broker")
        cfg = cls(security=Security.from_toml(data))
        cfg.check_security()
        cfg.clients = typed(table, "clients", str, cfg.default("clients"))
        cfg.workers = typed(table, "workers", str, cfg.default("workers"))
        cfg.name = typed(table, "name", str, cfg.name)
        cfg.metrics = typed(table, "metrics", str, cfg.metrics)
        cfg.suspend_limit = float(typed(table, "suspend_limit", (int, float), cfg.suspend_limit))
        cfg.client_timeout = float(typed(table, "client_timeout", (int, float),
                                         cfg.client_timeout))
        return cfg

    def apply_flags(self, args) -> BrokerConfig:
        """Override with the command-line flags that were given (and not empty)."""
        for name in ("clients", "workers", "name", "metrics"):
            value = getattr(args, name, None)
            if value:
                setattr(self, name, value)
        return self.check()

    def default(self, port: str) -> str:
        """The default endpoint of ``port`` (clients, workers): loopback only without keys."""
        endpoint = getattr(BrokerConfig, port)
        return endpoint if self.security.on else endpoint.replace("0.0.0.0", "127.0.0.1")

    def check_security(self) -> None:
        """With keys, the worker port needs the hosts' keys too."""
        if self.security.on and not self.security.authorized_hosts:
            raise ConfigError("[security] of a broker needs authorized_hosts (the hosts' "
                              "public keys) besides authorized_keys (the VMs')")

    def check(self) -> BrokerConfig:
        """Refuse settings that cannot work, with one clear line."""
        if self.suspend_limit < 0:
            raise ConfigError(f"suspend_limit = {self.suspend_limit}: expected seconds >= 0")
        return self


def _pairs(flag: str, form: str, items: list[str]) -> dict[str, str]:
    """NAME=VALUE flags (``flag``, documented as ``form``) as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {item}: expected {form}")
        out[name] = value
    return out


def _limit(name: str, value) -> int:
    """One [limits] (or --limit) value checked and in bytes, seconds or a count."""
    if name not in LIMITS:
        raise ConfigError(f"limit {name}: unknown (known: {', '.join(LIMITS)})")
    amount = _amount(value, name in SIZES)
    if amount is None:
        what = "a size in bytes like 4096, 64K, 512M or 2G" if name in SIZES else "a whole number"
        raise ConfigError(f"limit {name} = {value!r}: expected {what}, at least 1")
    return amount


def _amount(value, suffix: bool) -> int | None:
    """A positive int below 2**63 from an int or a string ("10", "512M" if ``suffix``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    found = re.fullmatch(r"(\d{1,19})([KMG]?)", str(value).strip().upper())
    if not found or (found.group(2) and not suffix):
        return None
    amount = int(found.group(1)) * _UNITS[found.group(2)]
    return amount if 0 < amount < 1 << 63 else None


def show_size(n: int) -> str:
    """``n`` bytes for people: "512 bytes", "1.0 MiB"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _mount_options(text: str) -> None:
    """Refuse ``[mounts] options`` that mount(8) would misread or that we set per export."""
    items = text.split(",")
    if not text or any(not item or item != item.strip() or " " in item for item in items):
        raise ConfigError(f"[mounts] options = {text!r}: expected a comma-separated list such "
                          f"as {DEFAULT_MOUNT_OPTIONS!r}")
    fixed = [item for item in items if item.partition("=")[0] in ("vers", "nfsvers", "port")]
    if fixed:
        raise ConfigError(f"[mounts] options: {fixed[0]!r} is set per export (NFSv4, the port "
                          "the VM's descriptor names)")
