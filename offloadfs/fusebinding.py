"""The one place that picks the Python FUSE binding and the libfuse under it.

mfusepy (maintained; libfuse 3 or 2) if it is installed, else fusepy (libfuse 2 only; Debian
packages only python3-fusepy). ``OFFLOADFS_FUSE=mfusepy|fusepy`` forces one. mfusepy gets
libfuse 3 if it is installed, else libfuse 2; mfusepy's own ``FUSE_LIBRARY_PATH`` /
``FUSE_LIBRARY_NAME`` override that. Every waiting shim holds a libfuse worker thread for its
whole job, and libfuse 3.12+ runs at most 10 unless told otherwise (libfuse 2: no limit), so
libfuse 3 is given ``max_threads`` (upstream 3.12.0-3.14.0 ignore it; Debian 12's 3.14.0-4 has
the fix backported, and 3.14.1/3.15 have it).

Everything FUSE comes from here: :func:`FUSE` (mounts, adapting the options to the libfuse),
``Operations``, ``FuseOSError``, ``fuse_get_context``, ``fuse_file_info`` and
:func:`loop_ended_probe`. ``BINDING`` and ``LIBFUSE`` ((major, minor)) say what was chosen.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import threading

from .settings import ConfigError

ENV = "OFFLOADFS_FUSE"
LIBFUSES = ("libfuse3.so.4", "libfuse3.so.3", "libfuse.so.2")  # 3.17+, 3.0-3.16, 2: first wins
MAX_THREADS = 100_000      # libfuse 3's maximum (its default is 10); libfuse 2 has no limit
# libfuse 3 has no big_writes (always on), its fuse_main takes no connection options (it asks
# the kernel for writes of up to 1 MiB by default; the read-ahead is the kernel's), and it
# refuses a max_read that init() did not also set in the connection ("requested different
# maximum read size"): without it the kernel's own limit applies (1 MiB with libfuse 3).
LIBFUSE2_ONLY = ("big_writes", "max_write", "max_readahead", "max_read")
LOOP_FAILED = 8            # libfuse 3's fuse_main: its loop returned an error (or a signal)


class FuseUnavailable(ConfigError):
    """No usable FUSE binding or libfuse; the text is one line for the user."""


def libfuse_version(lib) -> tuple[int, int]:
    """(major, minor) of a loaded libfuse (fuse_version() is 29 or 314)."""
    v = lib.fuse_version()
    return divmod(v, 100) if v >= 100 else divmod(v, 10)


def choose(requested: str, have_mfusepy: bool, lib_chosen_by_user: bool,
           first_loading) -> tuple[str, str | None]:
    """(the binding: mfusepy or fusepy; libfuse for mfusepy's FUSE_LIBRARY_PATH or None to
    leave it alone) from OFFLOADFS_FUSE, whether mfusepy is installed, whether the user set
    FUSE_LIBRARY_PATH/NAME, and ``first_loading(names)``: the first library of ``names`` that
    loads, or None (asked only for mfusepy); FuseUnavailable if impossible."""
    if requested not in ("", "auto", "mfusepy", "fusepy"):
        raise FuseUnavailable(f"{ENV} must be mfusepy or fusepy, not {requested!r}")
    if requested == "fusepy" or (requested != "mfusepy" and not have_mfusepy):
        return "fusepy", None
    if not have_mfusepy:
        raise FuseUnavailable(f"{ENV}=mfusepy, but mfusepy is not installed")
    return "mfusepy", None if lib_chosen_by_user else first_loading(LIBFUSES)


def _first_loading(names) -> str | None:
    """The first shared library of ``names`` that loads, or None."""
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


FUSEPY_MODULES = ("fuse", "fusepy")   # fusepy's module: fuse (PyPI), fusepy (Debian's package)


def _module_of(binding: str) -> str:
    """The module to import for ``binding``: fusepy's is named fuse or fusepy."""
    if binding != "fusepy":
        return binding
    found = [m for m in FUSEPY_MODULES if importlib.util.find_spec(m) is not None]
    return found[0] if found else FUSEPY_MODULES[0]


def _import():
    """The chosen binding module, imported (mfusepy with its libfuse picked)."""
    user_lib = bool(os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME"))
    module, lib = choose(os.environ.get(ENV, ""), importlib.util.find_spec("mfusepy") is not None,
                         user_lib, _first_loading)
    if lib is not None:
        os.environ["FUSE_LIBRARY_PATH"] = lib   # read by mfusepy at import, then dropped
    try:
        return importlib.import_module(_module_of(module))
    except (OSError, AttributeError) as exc:  # no libfuse, or one it cannot use
        raise FuseUnavailable(f"cannot use FUSE ({module}): {exc}") from None
    except ImportError:
        raise FuseUnavailable("no FUSE binding: install mfusepy (pip) or python3-fusepy "
                              "(Debian)") from None
    finally:
        if lib is not None:
            os.environ.pop("FUSE_LIBRARY_PATH", None)


_impl = _import()
BINDING = "fusepy" if _impl.__name__ in FUSEPY_MODULES else _impl.__name__
LIBFUSE = libfuse_version(_impl._libfuse)
Operations = _impl.Operations
FuseOSError = _impl.FuseOSError
fuse_get_context = _impl.fuse_get_context
fuse_file_info = _impl.fuse_file_info


def mount_options(options: dict, libfuse: tuple[int, int] = LIBFUSE) -> dict:
    """``options`` (as for libfuse 2) adapted to libfuse ``libfuse`` (major, minor)."""
    if libfuse[0] < 3:
        return dict(options)
    adapted = {k: v for k, v in options.items() if k not in LIBFUSE2_ONLY}
    if libfuse >= (3, 12) and not options.get("nothreads"):
        # no 10-thread cap; never reap idle threads (libfuse's default, said explicitly as
        # 3.12-3.14 print a bogus "Ignoring invalid max threads value" for that default)
        adapted.update(max_threads=MAX_THREADS, max_idle_threads=MAX_THREADS)
    return adapted


if BINDING == "mfusepy":
    class _Fuse(_impl.FUSE):
        """mfusepy's FUSE (mounts and serves in its constructor, on the calling thread), with
        each worker thread's Python state kept (``_wrapper``), reads into libfuse's buffer for
        operations that can (``read``), and two libfuse 3 differences undone: truncate of an
        open file gets its handle (mfusepy passes it to libfuse 2's ftruncate only), and a
        loop ended by SIGTERM/SIGINT/SIGHUP returns as under libfuse 2 (libfuse 3's handlers
        store the signal as the session's error, so fuse_main returns LOOP_FAILED, which
        mfusepy raises)."""

        def __init__(self, *args, **kwargs):
            """Mount and serve until unmounted; RuntimeError if libfuse fails."""
            self.served = False
            try:
                super().__init__(*args, **kwargs)
            except RuntimeError as exc:
                if not (self.served and exc.args == (LOOP_FAILED,)):
                    raise

        def _wrapper(self, func, *args, **kwargs):
            """Every callback: mfusepy's, on a thread whose Python state is kept."""
            _keep_thread_state()
            return super()._wrapper(func, *args, **kwargs)

        def init_fuse_3(self, conn, config):
            """The mount is being served."""
            self.served = True
            return super().init_fuse_3(conn, config)

        def truncate_fuse_3(self, path, length, fip):
            """ftruncate when libfuse gives a file, else truncate by path."""
            return self.ftruncate(path, length, fip)

        def read(self, path, buf, size, offset, fip):
            """Operations with ``reads_into_buffer`` read straight into libfuse's buffer:
            ``read(path, size, offset, fh, address)`` returns the byte count (no copy through
            a bytes object; fusepy calls their plain ``read(path, size, offset, fh)``)."""
            if not getattr(self.operations, "reads_into_buffer", False):
                return super().read(path, buf, size, offset, fip)
            fh = fip.contents if self.raw_fi else fip.contents.fh
            return self.operations.read(None if path is None else path.decode(self.encoding,
                                                                              self.errors),
                                        size, offset, fh, ctypes.cast(buf, ctypes.c_void_p).value)
else:
    _Fuse = _impl.FUSE


_kept: set[int] = set()   # libfuse threads whose Python thread state lives on


def _keep_thread_state() -> None:
    """Keep the calling libfuse worker thread's Python thread state from one callback to the
    next. ctypes wraps each callback of a thread Python did not start in PyGILState_Ensure and
    Release, which make and destroy a thread state (and its 16 KiB frame stack, mmap and
    munmap) every time; one Ensure more, never released, keeps it. Only where libfuse never
    ends its idle threads (3.12+, given max_idle_threads; libfuse 2 ends them past 10 idle,
    and a kept state would then leak)."""
    ident = threading.get_ident()
    if ident not in _kept and LIBFUSE >= (3, 12):
        _kept.add(ident)
        ctypes.pythonapi.PyGILState_Ensure()


def FUSE(operations, mountpoint: str, **options) -> None:  # noqa: N802 (the bindings' name)
    """Mount ``operations`` at ``mountpoint`` and serve until unmounted (as fusepy's FUSE)."""
    _Fuse(operations, mountpoint, **mount_options(options))


def loop_ended_probe():
    """A callable telling whether libfuse's loop was told to end (SIGTERM, SIGINT, SIGHUP,
    umount): libfuse waits for every callback before it returns and destroy() stops the
    mount's agent, so the agent must see it first and answer the shims still waiting. Only
    from a FUSE callback: it takes the filesystem's handle from the request's context."""
    lib = _impl._libfuse
    get_session, exited = lib["fuse_get_session"], lib["fuse_session_exited"]
    get_session.restype, get_session.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    exited.restype, exited.argtypes = ctypes.c_int, [ctypes.c_void_p]
    session = ctypes.c_void_p(get_session(ctypes.c_void_p(
        lib.fuse_get_context().contents.fuse)))
    return lambda: bool(exited(session))
