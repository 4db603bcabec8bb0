"""Stop signals for the daemon's and the broker's loops (their main thread only)."""
from __future__ import annotations

import contextlib
import logging
import signal

log = logging.getLogger("offloadd")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stopping_on_signals(stop, wake_fd: int):
    """While inside: SIGTERM, SIGINT and SIGHUP call ``stop()``, and any signal writes to
    ``wake_fd`` so that poll returns at once; the old handlers come back after."""
    def handler(signum, frame):
        log.info("stopping on %s", signal.Signals(signum).name)
        stop()

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    old_fd = signal.set_wakeup_fd(wake_fd)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
