"""What a job may do on this host: the command allowlist, the caller's identity, the job's
environment. Plain rules, no I/O; the server's loop thread calls them for every submit.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re

from offloadfs.environ import DEFAULT_PASS, passing  # noqa: F401 (re-exported)

HOST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
NO_ID = 2**32 - 1     # (uid_t)-1: setresuid(-1) and setresgid(-1) mean "keep the current id"


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


def check_identity(uid: int, gid: int, allow_root: bool, daemon_uid: int,
                   groups: list[int] = ()) -> None:
    """Refuse root (uid, gid or a group 0) unless allowed, and identities this daemon cannot
    take."""
    if NO_ID in (uid, gid) or NO_ID in groups:   # the job would keep the daemon's (root) ids
        raise Refused("identity", f"{NO_ID} is not a user or group id")
    if (uid == 0 or gid == 0 or 0 in groups) and not allow_root:
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


Ranges = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class VmRule:
    """What one VM (by its key's name) may claim: uid and gid ranges, exports; None = any."""

    uids: Ranges | None = None
    gids: Ranges | None = None
    exports: tuple[str, ...] | None = None


def parse_ranges(text: str) -> Ranges:
    """"1000-60000,65534" as ((1000, 60000), (65534, 65534)), or ValueError."""
    out = []
    for part in text.replace(" ", "").split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        lo, hi = (int(found[1]), int(found[2] or found[1])) if found else (1, 0)
        if lo > hi:
            raise ValueError(f"{text!r}: expected ranges like \"1000-60000,65534\"")
        out.append((lo, hi))
    return tuple(out)


def _within(value: int, ranges: Ranges) -> bool:
    """True if ``value`` lies in one of ``ranges``."""
    return any(lo <= value <= hi for lo, hi in ranges)


def check_claim(vm: str, rule: VmRule | None, uid: int, gid: int, groups: list[int],
                export: str | None) -> None:
    """Refuse a keyed VM's job that claims an identity or export outside its rule. Without a
    rule a VM may claim any uid but 0 (root also needs a rule whose uids include 0)."""
    if rule is None or rule.uids is None:
        if uid == 0:
            raise Refused("identity", f"VM {vm} may not run jobs as root: no "
                                      f"[security.vms.{vm}] uids range includes 0")
    elif not _within(uid, rule.uids):
        raise Refused("identity", f"VM {vm} may not claim uid {uid} on this host")
    bad = [g for g in [gid, *groups] if rule and rule.gids and not _within(g, rule.gids)]
    if bad:
        raise Refused("identity", f"VM {vm} may not claim group {bad[0]} on this host")
    if export is not None and rule and rule.exports is not None and \
            not any(fnmatch.fnmatchcase(export, p) for p in rule.exports):
        raise Refused("identity", f"VM {vm} may not attach export {export} on this host")
