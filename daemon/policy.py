"""What a job may do on this host: the command allowlist, the caller's identity, the job's
environment. Plain rules, no I/O; the server's loop thread calls them for every submit.
"""
from __future__ import annotations

import os

from offloadfs.environ import DEFAULT_PASS, passing  # noqa: F401 (re-exported)

HOST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class Refused(Exception):
    """A job this host will not run; ``kind`` goes into the ``error`` reply."""

    def __init__(self, kind: str, text: str):
        """Keep the error kind beside the one-line text."""
        super().__init__(text)
        self.kind = kind


class Allowlist:
    """Maps command names to absolute paths on this host; nothing else runs."""

    def __init__(self, commands: dict[str, str]):
        """Check that every entry is a plain name mapped to an absolute path."""
        for name, path in commands.items():
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"command name {name!r} must be a plain file name")
            if not os.path.isabs(path):
                raise ValueError(f"command {name!r}: {path!r} is not an absolute path")
        self.commands = dict(commands)

    def names(self) -> list[str]:
        """The command names offered, sorted."""
        return sorted(self.commands)

    def resolve(self, argv0: bytes) -> str:
        """The absolute path to run for ``argv0``, or Refused."""
        name = os.fsdecode(argv0)
        if "/" in name:
            if name in self.commands.values():
                return name
            raise Refused("not-allowed", f"{name}: a path is allowed only as its allowlisted path")
        if name not in self.commands:
            raise Refused("not-allowed", f"{name}: not an allowlisted command on this host")
        return self.commands[name]


def check_identity(uid: int, gid: int, allow_root: bool, daemon_uid: int) -> None:
    """Refuse root unless allowed, and identities this daemon cannot take."""
    if (uid == 0 or gid == 0) and not allow_root:
        raise Refused("root", "jobs as root are refused on this host (offloadd --allow-root)")
    if daemon_uid != 0 and uid != daemon_uid:
        raise Refused("identity", f"this daemon runs as uid {daemon_uid} and cannot run jobs "
                                  f"as uid {uid}")


def job_env(caller: dict[bytes, bytes], patterns, base: dict[str, str]) -> dict[bytes, bytes]:
    """The job's environment: ``base`` plus the caller's variables that may pass."""
    env = {os.fsencode(k): os.fsencode(v) for k, v in base.items()}
    return env | passing(caller, patterns)


def base_env(home: str, user: str) -> dict[str, str]:
    """The host's part of every job's environment."""
    return {"PATH": HOST_PATH, "HOME": home, "USER": user, "LOGNAME": user}


def map_path(cwd: str, path_map: dict[str, str]) -> str:
    """The host's path for a caller's ``cwd`` in shared mode: the longest matching prefix of
    ``path_map`` (VM prefix -> host prefix) is replaced; unmapped paths stay as they are."""
    for prefix in sorted(path_map, key=len, reverse=True):
        base = prefix.rstrip("/")
        if cwd == base or cwd.startswith(base + "/") or base == "":
            return path_map[prefix].rstrip("/") + cwd[len(base):] or "/"
    return cwd


def below(root: str, rel: str) -> str:
    """``root``/``rel`` if it stays inside ``root`` (no absolute path, no ``..`` escape), or
    Refused."""
    if rel.startswith("/") or "\0" in rel:
        raise Refused("cwd", f"{rel!r}: not a path below the export")
    path = os.path.normpath(os.path.join(root, rel))
    if path != root and not path.startswith(root.rstrip("/") + "/"):
        raise Refused("cwd", f"{rel!r} escapes the export")
    return path
