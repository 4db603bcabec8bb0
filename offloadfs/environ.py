"""Which environment variables travel with a job; shared by client and daemon, no I/O."""
from __future__ import annotations

import fnmatch
import functools
import os

DEFAULT_PASS = ("LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "COLUMNS", "LINES", "NO_COLOR",
                "OMP_NUM_THREADS", "MAGICK_*")
# Variables that change how an interpreter or the loader behaves would let a caller run code
# beyond the allowlisted command; they never pass, whatever a pass list says.
NEVER_PASS = ("PATH", "LD_*", "PYTHON*", "IFS", "ENV", "BASH_ENV", "BASH_FUNC_*", "SHELLOPTS",
              "BASHOPTS", "PS4", "CDPATH", "HOME", "USER", "LOGNAME", "SHELL", "MAIL", "TMPDIR",
              "GCONV_PATH", "GLIBC_TUNABLES", "HOSTALIASES", "LOCPATH", "MALLOC_*", "NLSPATH",
              "RESOLV_*", "PERL5*", "PERLLIB", "PERL_*", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS",
              "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "OFFLOAD*",
              "MAGICK_CONFIGURE_PATH", "MAGICK_CODER_MODULE_PATH", "MAGICK_FILTER_MODULE_PATH")


def matches(name: str, patterns) -> bool:
    """True when ``name`` matches one of the glob ``patterns``."""
    return any(_match(name, p) for p in patterns)


def _match(name: str, pattern: str) -> bool:
    """One glob match; exact names and PREFIX* need no regex (offld starts faster)."""
    if not any(c in pattern for c in "*?["):
        return name == pattern
    if pattern.endswith("*") and not any(c in pattern[:-1] for c in "*?["):
        return name.startswith(pattern[:-1])
    return fnmatch.fnmatchcase(name, pattern)


def passing(env: dict[bytes, bytes], patterns) -> dict[bytes, bytes]:
    """The variables of ``env`` on the pass list and not on NEVER_PASS."""
    patterns = tuple(patterns)
    return {k: v for k, v in env.items() if _passes(k, patterns)}


@functools.lru_cache(maxsize=4096)
def _passes(name: bytes, patterns: tuple[str, ...]) -> bool:
    """Whether a variable named ``name`` passes (remembered: the mount's callers share their
    names, and some fifty glob matches per variable cost 2 ms per job)."""
    text = os.fsdecode(name)
    return matches(text, patterns) and not matches(text, NEVER_PASS)
