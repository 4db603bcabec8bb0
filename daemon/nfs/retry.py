"""The one retry rule of the NFS client: a call that failed because its context broke (a lost
connection, a timeout, lost NFSv4 state) is tried once more after a recovery step."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import TypeVar

from .binding import NfsError

T = TypeVar("T")


def once_more_if_broken(session: Callable[[], ContextManager], body: Callable[..., T],
                        recover: Callable[..., None]) -> T:
    """``body(ctx)`` on the context ``session()`` yields; if it raises NfsError and left ``ctx``
    broken, ``recover(ctx)`` and once more. Any other failure, or a second one, is raised.

    The callers differ only in ``session`` and ``recover`` (NfsFuse in ops.py):
    - path operations: a meta context from the pool, always given back; recover only logs (the
      next take() gives a new context, the broken one was closed by give());
    - an open file's calls: the handle's own context, locked; recover reopens the file by path
      on a fresh context (NfsFuse._reopen);
    - open/create: a file context from the pool, given back only on failure (on success the
      caller keeps it); recover does nothing.
    ``broken`` is read inside the session (its lock held, before it is given back), where no
    other thread can change it. A failure of ``session()`` itself (no context could be
    connected) is not retried."""
    for attempt in (1, 2):
        broke = False
        try:
            with session() as ctx:
                try:
                    return body(ctx)
                except NfsError:
                    broke = ctx.broken
                    raise
        except NfsError:
            if not broke or attempt == 2:
                raise
        recover(ctx)
    raise AssertionError("unreachable")
