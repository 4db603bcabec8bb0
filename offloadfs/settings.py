"""What every settings reader shares, on both sides: TOML files, typed fields and ``HOST[:PORT]``.

A leaf: it imports nothing from the package, so that ``config``, ``export``, ``keys`` and the
daemon's ``config`` can all build on it without an import cycle. Rules only, but for
:func:`load_toml`'s one read of the file.
"""
from __future__ import annotations

import os

DEFAULT_PORT = 7788
MAX_PORT = 65535
CLIENT_CONFIG = "/etc/offloadfs/offloadfs.toml"   # the VM side's file (config.ClientConfig)


def state_dir() -> str:
    """Where the VM side keeps its job log and state: $XDG_STATE_HOME/offloadfs."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "offloadfs")


def job_log_of(data: dict) -> str:
    """The job log a VM config names (``[client] job_log``), else $XDG_STATE_HOME's."""
    return typed(section(data, "client"), "job_log", str, "") or \
        os.path.join(state_dir(), "jobs.jsonl")


class ConfigError(Exception):
    """A configuration file or flag that cannot be used; the text is one line for the user."""


class Table(dict):
    """A table of a settings file as :func:`load_toml` read it: a dict that also knows its file
    (``path``), its names (``names``: ("serve",) for [serve]) and the file's lines of each
    name (``lines``, from tomlcheck), so :func:`typed` can say where a bad value is."""

    path, names, lines = "", (), {}

    def where(self, key: str = "") -> str:
        """"FILE:LINE: " of ``key`` in this table (of the table itself without one)."""
        from .tomlcheck import line_of
        line = line_of(self.names + ((key,) if key else ()), self.lines)
        return f"{self.path}:{line}: " if line else f"{self.path}: "

    def label(self, key: str) -> str:
        """``key`` with its table, as the file spells it: "[serve] slots"."""
        return f"[{'.'.join(self.names)}] {key}" if self.names else key


TYPE_WORDS = {int: "an integer", float: "a number", (int, float): "a number", str: "a string",
              list: "a list", bool: "true or false", dict: "a table"}


def load_toml(path: str | None, default: str | None = None, schema: dict | None = None) -> dict:
    """The TOML file at ``path`` (must exist), or ``default`` if it exists, or {}; with a
    ``schema`` (see ``tomlcheck``), an unknown table or key is an error naming its line."""
    chosen = path or default
    if chosen is None or (path is None and not os.path.exists(chosen)):
        return {}
    import tomllib  # only when there is a file: offld starts faster without one

    try:
        with open(chosen, "rb") as f:
            text = f.read().decode()
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{chosen}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{chosen}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: {exc}") from None
    if schema is not None:
        from .tomlcheck import first_error
        error = first_error(data, text, schema, chosen)
        if error:
            raise ConfigError(error)
    from .tomlcheck import defined_lines
    return _located(data, chosen, (), defined_lines(text))


def _located(data: dict, path: str, names: tuple, lines: dict) -> Table:
    """``data`` and every table in it as :class:`Table`s of ``path``."""
    table = Table({k: _located(v, path, names + (k,), lines) if isinstance(v, dict) else v
                   for k, v in data.items()})
    table.path, table.names, table.lines = path, names, lines
    return table


def section(data: dict, name: str) -> dict:
    """A table of the config, {} if absent; an error if it is not a table."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        where = data.where(name) if isinstance(data, Table) else ""
        raise ConfigError(f"{where}[{name}] must be a table")
    return value


def typed(table: dict, key: str, kind: type | tuple, default):
    """``table[key]`` checked to be of ``kind``, or ``default``."""
    value = table.get(key, default)
    wrong = not isinstance(value, kind) or (isinstance(value, bool) and bool not in
                                            (kind if isinstance(kind, tuple) else (kind,)))
    if value is not default and wrong:
        words = TYPE_WORDS.get(kind) or getattr(kind, "__name__", str(kind))
        import json  # here: offld's start loads this module, and json costs it ms
        shown = json.dumps(value, default=str)   # as TOML spells it: "x", true, [1, 2]
        if isinstance(table, Table):
            raise ConfigError(f"{table.where(key)}{table.label(key)} = {shown}: expected {words}")
        raise ConfigError(f"{key} = {shown}: expected {words}")
    return value


def host_port(text: str, default_port: int | None, bind: bool = False) -> tuple[str, int]:
    """``HOST[:PORT]`` as (host, port); ``default_port`` where none is written (None: a port
    must be). An IPv6 address is ``[ADDR]:PORT`` (its host keeps the brackets, as ZeroMQ and
    mount(8) want them) or bare, without a port: more than one colon is all host. A ``bind``
    address may leave out the host (the caller picks one) and ask for port 0 (any free one).
    ConfigError with one line if malformed."""
    host, sep, port = _split(text)
    low = 0 if bind else 1
    if not sep and default_port is not None:
        port = str(default_port)
    if (not bind and not host.strip("[]")) or not (port.isascii() and port.isdigit()) or \
            not low <= int(port) <= MAX_PORT:
        form = ("ADDR" if bind else "HOST") + (":PORT" if default_port is None else "[:PORT]")
        raise ConfigError(f"{text}: expected {form}")
    return host, int(port)


def _split(text: str) -> tuple[str, str, str]:
    """(host, ":", port) as written, or (text, "", "") without a port; ("", ":", "") (no
    host, no port) if a bracketed host is followed by anything but a port."""
    if text.startswith("[") and "]" in text:
        inside, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            return "", ":", ""
        return f"[{inside}]", rest[:1], rest[1:]
    if text.count(":") == 1:
        return text.partition(":")
    return text, "", ""


def host_endpoint(text: str, default_port: int = DEFAULT_PORT) -> str:
    """HOST[:PORT] or tcp://HOST:PORT as a ZeroMQ endpoint."""
    if text.startswith(("tcp://", "ipc://", "inproc://")):
        return text
    host, port = host_port(text, default_port)
    return f"tcp://{host}:{port}"
