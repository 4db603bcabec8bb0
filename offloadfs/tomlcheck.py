"""Unknown tables and keys in a TOML settings file, as one line naming the file, the line and
the nearest valid name.

A leaf of plain functions (``settings.load_toml`` calls :func:`first_error` with the parsed
data, the text and the reader's schema). A schema maps a table's dotted name to the keys it
takes: ``""`` is the top level (its keys are the sections), ``ANY`` takes any key (a table of
names: ``[commands]`` on a host, ``[tags]``), and ``"a.*"`` is the schema of each table under
``[a]`` (``[security.vms.NAME]``). A key whose own table is in the schema is a table; any other
key is a value, whatever it holds (``slot_env = { ... }``).

tomllib keeps no line numbers, so the line is found by reading the text again: each header and
each ``key =`` line defines a path of names, and an error's line is that of the longest defined
path it starts with.
"""
from __future__ import annotations

import re

ANY = frozenset({"*"})   # a table of free-form names
_BARE = r"[A-Za-z0-9_-]+"
_PART = rf'\s*(?:{_BARE}|"(?:[^"\\]|\\.)*"|\'[^\']*\')\s*'
_HEADER = re.compile(rf"^\s*\[\[?((?:{_PART}\.)*{_PART})\]\]?\s*(?:#.*)?$")
_KEY = re.compile(rf"^\s*((?:{_PART}\.)*{_PART})=")
_PARTS = re.compile(_PART)


def first_error(data: dict, text: str, schema: dict, path: str) -> str | None:
    """The first unknown table or key of ``data`` (parsed from ``text``, read from ``path``),
    in the order of the file, as one line; None if every name is known."""
    found = sorted(_unknown(data, (), schema))
    if not found:
        return None
    lines = defined_lines(text)
    names, valid, table = min(found, key=lambda item: (line_of(item[0], lines), item))
    return f"{path}:{line_of(names, lines)}: {describe(names, valid, table)}"


def _unknown(data: dict, at: tuple, schema: dict):
    """(path, valid names, is a table) of each unknown name under the table ``at``."""
    keys = _keys_of(at, schema)
    tables = _tables_under(at, schema)
    for key, value in data.items():
        here = at + (key,)
        if isinstance(value, dict) and (key in tables or "*" in tables):
            yield from _unknown(value, here, schema)
        elif key not in keys and keys is not ANY:
            yield here, tuple(sorted(keys | tables - {"*"})), isinstance(value, dict)


def _keys_of(at: tuple, schema: dict) -> frozenset:
    """The value keys the table ``at`` takes (ANY: any)."""
    keys = schema.get(".".join(at))
    if keys is None and at:
        keys = schema.get(".".join(at[:-1] + ("*",)))
    return ANY if keys is ANY else frozenset(keys or ())


def _tables_under(at: tuple, schema: dict) -> set[str]:
    """The names of the tables the schema has directly under ``at`` ("*": any name)."""
    prefix = ".".join(at) + "." if at else ""
    return {name[len(prefix):].split(".")[0] for name in schema
            if name.startswith(prefix) and name[len(prefix):]}


def describe(names: tuple, valid: tuple, table: bool = False) -> str:
    """"unknown section [x] (did you mean [y]?)" or "unknown key 'k' in [t] (valid: ...)"."""
    key, parent = names[-1], names[:-1]
    import difflib  # here: only a bad file needs it, and every client start reads this module
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not parent and not table:
        return f"key {key!r} outside any section (keys go under one: {', '.join(valid)})"
    if table:
        what, show = "section" if not parent else "table", lambda k: f"[{'.'.join(parent + (k,))}]"
        return f"unknown {what} {show(key)} ({_hint(close, valid, show)})"
    return f"unknown key {key!r} in [{'.'.join(parent)}] ({_hint(close, valid, repr)})"


def _hint(close: list, valid: tuple, show) -> str:
    """"did you mean X?" for a close name, else the valid names."""
    if close:
        return f"did you mean {show(close[0])}?"
    return "valid: " + ", ".join(valid) if valid else "it takes none"


def defined_lines(text: str) -> dict[tuple, int]:
    """Each path of names a header or a ``key =`` line defines, with its first line (1-based)."""
    lines: dict[tuple, int] = {}
    table: tuple = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault(table + split_key(key.group(1)), number)
    return lines


def split_key(text: str) -> tuple:
    """A dotted TOML key as its names: ``a."b.c".d`` is ("a", "b.c", "d")."""
    parts = []
    for part in _PARTS.findall(text):
        part = part.strip()
        parts.append(part[1:-1] if part[:1] in "\"'" else part)   # escapes kept as written
    return tuple(parts)


def line_of(names: tuple, lines: dict[tuple, int]) -> int:
    """The line defining the longest leading part of ``names`` (0 if none does)."""
    for end in range(len(names), 0, -1):
        if names[:end] in lines:
            return lines[names[:end]]
    return 0
