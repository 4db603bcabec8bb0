"""The host side's settings: /etc/offloadfs/offloadd.toml, overridden by ``offloadd`` flags."""
from __future__ import annotations

import dataclasses
import os

from offloadfs.config import ConfigError, load_toml, section, typed

from . import policy

DAEMON_CONFIG = "/etc/offloadfs/offloadd.toml"
DEFAULT_LISTEN = "tcp://0.0.0.0:7788"


@dataclasses.dataclass
class ServeConfig:
    """What ``offloadd serve`` needs; built from the file, then the flags."""

    listen: str = DEFAULT_LISTEN
    connect: list[str] = dataclasses.field(default_factory=list)
    slots: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allow_root: bool = False
    commands: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: list[str] = dataclasses.field(default_factory=list)
    env_pass: list[str] = dataclasses.field(default_factory=lambda: list(policy.DEFAULT_PASS))
    heartbeat: float = 1.0
    client_timeout: float = 5.0
    name: str = ""
    scratch_dir: str = "/var/lib/offloadd/scratch"
    mounts_client: str = "kernel"
    mounts_dir: str = "/var/lib/offloadd/mnt"
    idle_unmount: float = 300.0
    path_map: dict[str, str] = dataclasses.field(default_factory=dict)
    slot_env: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: str = ""

    @classmethod
    def from_file(cls, path: str | None) -> "ServeConfig":
        """Read the [serve], [commands] and [env] tables of ``path`` (or the system file)."""
        data = load_toml(path, DAEMON_CONFIG)
        serve, cfg = section(data, "serve"), cls()
        cfg.listen = typed(serve, "listen", str, "")
        cfg.connect = [str(c) for c in typed(serve, "connect", list, [])]
        cfg.slots = typed(serve, "slots", int, cfg.slots)
        cfg.allow_root = typed(serve, "allow_root", bool, cfg.allow_root)
        cfg.tags = [str(t) for t in typed(serve, "tags", list, cfg.tags)]
        cfg.heartbeat = float(typed(serve, "heartbeat", (int, float), cfg.heartbeat))
        cfg.client_timeout = float(typed(serve, "client_timeout", (int, float), cfg.client_timeout))
        cfg.name = typed(serve, "name", str, cfg.name)
        cfg.scratch_dir = typed(serve, "scratch", str, cfg.scratch_dir)
        cfg.slot_env = {str(k): str(v) for k, v in typed(serve, "slot_env", dict, {}).items()}
        cfg.metrics = typed(serve, "metrics", str, cfg.metrics)
        cfg.commands = {str(k): str(v) for k, v in section(data, "commands").items()}
        mounts = section(data, "mounts")
        cfg.mounts_client = typed(mounts, "client", str, cfg.mounts_client)
        cfg.mounts_dir = typed(mounts, "dir", str, cfg.mounts_dir)
        cfg.idle_unmount = float(typed(mounts, "idle_unmount", (int, float), cfg.idle_unmount))
        cfg.path_map = {str(k): str(v) for k, v in typed(mounts, "path_map", dict, {}).items()}
        cfg.env_pass += [str(x) for x in typed(section(data, "env"), "pass", list, [])]
        return cfg

    def apply_flags(self, args) -> "ServeConfig":
        """Override with the command-line flags that were given."""
        for name in ("listen", "slots", "name", "client_timeout", "metrics"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(self, name, value)
        self.connect += args.connect or []
        if not self.listen and not self.connect:
            self.listen = DEFAULT_LISTEN   # a host with brokers listens only if told to
        self.allow_root = self.allow_root or bool(args.allow_root)
        self.tags += args.tag or []
        self.commands.update(_commands(args.command or []))
        return self.check()

    def check(self) -> "ServeConfig":
        """Refuse settings that cannot work, with one clear line."""
        if self.slots < 1:
            raise ConfigError(f"slots = {self.slots}: must be at least 1")
        for endpoint in ([self.listen] if self.listen else []) + self.connect:
            if not endpoint.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"{endpoint}: expected tcp://ADDR:PORT")
        try:
            policy.Allowlist(self.commands)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.mounts_client not in ("kernel", "userspace"):
            raise ConfigError(f"[mounts] client = {self.mounts_client!r}: expected kernel or "
                              f"userspace")
        if any(not (k.startswith("/") and v.startswith("/")) for k, v in self.path_map.items()):
            raise ConfigError("[mounts] path_map: both sides must be absolute paths")
        return self


def _commands(items: list[str]) -> dict[str, str]:
    """NAME=/abs/path flags as a dict."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--command {item}: expected NAME=/abs/path")
        out[name] = path
    return out
