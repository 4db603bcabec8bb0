"""The shims the mount shows: which commands, offered by which hosts, with which policy and
what happened to their jobs.

The agent thread calls :meth:`Registry.offer` and :meth:`Registry.withdraw` as hosts come and
go, and :meth:`Registry.record` when a job ends; FUSE threads read names, xattrs and policies.
One lock guards it all; nothing here does network I/O. Policies persist in a small JSON file.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading

from . import environ

POLICIES = ("auto", "always", "never")
XATTR_POLICY = "user.offload.policy"
XATTR_HOSTS = "user.offload.hosts"
XATTR_STATS = "user.offload.stats"
XATTRS = (XATTR_POLICY, XATTR_HOSTS, XATTR_STATS)
OUTCOMES = ("jobs", "failures", "fallbacks")


class BadValue(ValueError):
    """A value an xattr does not take (EINVAL)."""


class Stats:
    """Counts and mean stage times of one shim's jobs."""

    def __init__(self):
        """All zero."""
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.sums: dict[str, float] = {}
        self.timed = 0

    def add(self, outcome: str, timings: dict) -> None:
        """Count one job ("jobs", "failures" or "fallbacks") and its stage times."""
        self.counts[outcome] += 1
        if timings:
            self.timed += 1
            for stage, seconds in timings.items():
                self.sums[stage] = self.sums.get(stage, 0.0) + seconds

    def as_dict(self) -> dict:
        """Counts and mean stage times in ms."""
        means = {k: round(v * 1000 / self.timed, 3) for k, v in self.sums.items()}
        return dict(self.counts, mean_ms=means)


class Registry:
    """Commands offered by hosts, filtered by the VM's allow and deny lists."""

    def __init__(self, allow=("*",), deny=(), state_file: str | None = None):
        """An empty table; policies are loaded from ``state_file`` if it exists."""
        self.allow, self.deny = tuple(allow), tuple(deny)
        self.state_file = state_file
        self.lock = threading.Lock()
        self.offers: dict[str, set[str]] = {}      # host -> commands
        self.policies: dict[str, str] = self._load()
        self.stats: dict[str, Stats] = {}
        self._verdicts: dict[str, bool] = {}   # _allowed's answers (the lists never change)

    # --- hosts (agent thread) -----------------------------------------------------------------

    def offer(self, host: str, commands) -> None:
        """``host`` offers ``commands`` (replacing what it offered before)."""
        with self.lock:
            self.offers[host] = set(commands)

    def withdraw(self, host: str) -> None:
        """``host`` is gone: its commands go unless another host offers them."""
        with self.lock:
            self.offers.pop(host, None)

    # --- reading (FUSE threads) ---------------------------------------------------------------

    def names(self) -> list[str]:
        """The shims to show, sorted: what hosts offer, and every command whose policy is
        always (it must fail closed, never fall through to a local command)."""
        with self.lock:
            offered = set().union(*self.offers.values()) if self.offers else set()
            offered |= {n for n, p in self.policies.items() if p == "always"}
        return sorted(n for n in offered if self._allowed(n))

    def has(self, name: str) -> bool:
        """True if a shim ``name`` is shown (every FUSE lookup asks: no list is built)."""
        with self.lock:
            shown = self.policies.get(name) == "always" or \
                any(name in cmds for cmds in self.offers.values())
        return shown and self._allowed(name)

    def hosts(self, name: str) -> list[str]:
        """Hosts offering ``name``, sorted."""
        with self.lock:
            return sorted(h for h, cmds in self.offers.items() if name in cmds)

    def policy(self, name: str) -> str:
        """The policy of shim ``name`` (auto unless set)."""
        with self.lock:
            return self.policies.get(name, "auto")

    def xattr(self, name: str, attr: str) -> bytes:
        """The value of ``attr`` for shim ``name``; KeyError for an unknown attribute."""
        if attr == XATTR_POLICY:
            return self.policy(name).encode()
        if attr == XATTR_HOSTS:
            return ",".join(self.hosts(name)).encode()
        if attr == XATTR_STATS:
            with self.lock:
                stats = self.stats.get(name) or Stats()
                return json.dumps(stats.as_dict(), sort_keys=True).encode()
        raise KeyError(attr)

    # --- writing (FUSE threads, agent thread) -------------------------------------------------

    def set_policy(self, name: str, value: bytes) -> None:
        """Set the policy of shim ``name``; BadValue unless auto, always or never."""
        text = value.decode(errors="replace").strip()
        if text not in POLICIES:
            raise BadValue(f"policy must be one of {', '.join(POLICIES)}")
        with self.lock:
            self.policies[name] = text
            snapshot = dict(self.policies)
        self._save(snapshot)

    def reset_policy(self, name: str) -> None:
        """Forget the policy of ``name`` (back to auto)."""
        with self.lock:
            self.policies.pop(name, None)
            snapshot = dict(self.policies)
        self._save(snapshot)

    def record(self, name: str, outcome: str, timings: dict) -> None:
        """Count a job of shim ``name``."""
        with self.lock:
            self.stats.setdefault(name, Stats()).add(outcome, timings)

    # --- helpers ------------------------------------------------------------------------------

    def _allowed(self, name: str) -> bool:
        """True if the VM's config lets ``name`` be offloaded (asked only for names a host
        offers or a policy names, so the answers kept stay few)."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            verdict = environ.matches(name, self.allow) and not environ.matches(name, self.deny)
            self._verdicts[name] = verdict
        return verdict

    def _load(self) -> dict[str, str]:
        """Policies saved by an earlier mount (bad entries are ignored)."""
        try:
            with open(self.state_file or "", encoding="utf-8") as f:
                data = json.load(f).get("policies", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and v in POLICIES}

    def _save(self, policies: dict[str, str]) -> None:
        """Write the policies atomically (best effort: a read-only disk loses persistence only)."""
        if not self.state_file:
            return
        try:
            directory = os.path.dirname(self.state_file) or "."
            os.makedirs(directory, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=directory, delete=False) as f:
                json.dump({"policies": policies}, f, sort_keys=True)
            os.replace(f.name, self.state_file)
        except OSError:
            pass
