"""The protocol's tables against its docstring and against the code: who sends each kind
(ROUTES), each kind's schema (SCHEMA), and every error kind the code uses (ERROR_KINDS)."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

from offloadfs import protocol
from offloadfs.protocol import BROKER, CLIENT, HOST

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("daemon/**/*.py"), *ROOT.glob("offloadfs/*.py")])

# A docstring direction -> (who may send, who may receive, the pair that must exist).
DIRECTIONS = {
    "C->D": ({CLIENT, BROKER}, {HOST, BROKER}, (CLIENT, HOST)),
    "D->C": ({HOST, BROKER}, {CLIENT, BROKER}, (HOST, CLIENT)),
    "*->*": (protocol.ROLES, protocol.ROLES, (CLIENT, HOST)),
    "H->B": ({HOST}, {BROKER}, (HOST, BROKER)),
    "B->H": ({BROKER}, {HOST}, (BROKER, HOST)),
}


def documented() -> dict[str, set[str]]:
    """The docstring's message list: kind -> the directions it is listed with."""
    found: dict[str, set[str]] = {}
    for line in protocol.__doc__.splitlines():
        m = re.match(r"    (\S->\S) +([a-z-]+) ", line)
        if m:
            found.setdefault(m[2], set()).add(m[1])
    return found


def pairs(kind: str) -> set[tuple[str, str]]:
    """The (sender, receiver) pairs ROUTES allows for ``kind``."""
    return {(s, r) for s in protocol.SENDERS[kind] for r in protocol.RECEIVERS[kind] if s != r}


# --- ROUTES and the docstring ------------------------------------------------------------------

def test_docstring_lists_every_kind():
    """The docstring lists each kind of SCHEMA, in a direction it knows, and no other."""
    doc = documented()
    assert set(doc) == set(protocol.SCHEMA) == set(protocol.ROUTES)
    assert {d for ds in doc.values() for d in ds} <= set(DIRECTIONS)


@pytest.mark.parametrize("kind", sorted(protocol.ROUTES))
def test_routes_agree_with_docstring(kind):
    """Every pair ROUTES allows fits a direction the docstring lists the kind with, and each
    of those directions has its main pair."""
    directions = documented()[kind]
    allowed = {(s, r) for d in directions for s in DIRECTIONS[d][0] for r in DIRECTIONS[d][1]}
    assert pairs(kind) <= allowed
    assert {DIRECTIONS[d][2] for d in directions} <= pairs(kind)


@pytest.mark.parametrize("kind", sorted(protocol.ROUTES))
def test_every_kind_has_a_schema(kind):
    """Each routed kind is checked by decode_header: a SCHEMA entry of field checkers."""
    needs_job, required, optional = protocol.SCHEMA[kind]
    assert isinstance(needs_job, bool)
    assert all(callable(c) for c in (*required.values(), *optional.values()))
    assert protocol.SENDERS[kind] and protocol.RECEIVERS[kind] <= protocol.ROLES
    assert protocol.SENDERS[kind] <= protocol.ROLES


def test_every_role_sends_and_receives():
    """No role is mute or deaf, and each accepts from every other role something."""
    for role in protocol.ROLES:
        for other in protocol.ROLES - {role}:
            assert protocol.sent_by(role, other) == protocol.accepted_by(other, role)
        assert protocol.accepted_by(role) and protocol.sent_by(role)


def test_daemon_handler_table():
    """offloadd serve's handler table takes exactly the kinds a host receives."""
    from offloadd.server import Server
    handled = Server._handlers(Server.__new__(Server))   # the table, without sockets
    assert protocol.dispatch_check(HOST, handled) == (frozenset(), frozenset())


def test_broker_handler_tables():
    """The broker's table for clients takes exactly what a client sends it; for hosts, every
    kind it names is one a host sends (the rest is news of a job, relayed to its client)."""
    from offloadd.broker import Broker
    from_clients, from_hosts = Broker._handlers(Broker.__new__(Broker))
    assert protocol.dispatch_check(BROKER, from_clients, CLIENT) == (frozenset(), frozenset())
    assert protocol.dispatch_check(BROKER, from_hosts, HOST)[1] == frozenset()


def test_broker_relays_what_a_client_sends_about_a_running_job():
    """PASS_THROUGH: what the broker receives from clients, less what it answers itself."""
    from offloadd import broker
    own = {"hello", "status", "ping", "submit", "cancel"}
    assert broker.PASS_THROUGH == protocol.accepted_by(BROKER, CLIENT) - own
    assert broker.PASS_THROUGH <= protocol.sent_by(BROKER, HOST)


def test_jobrun_sets():
    """jobrun's sets, derived from the routing table, are what a client must accept about a job
    (a kind added to the table for the client shows up here)."""
    from offloadfs import jobrun
    assert jobrun.FROM_HOST == {"queued", "started", "stdout", "stderr", "tty", "file", "credit",
                                "exit", "error", "stopped"}
    assert jobrun.OUTPUT == {"stdout", "stderr", "tty", "file"}
    assert jobrun.BEFORE_START == jobrun.OUTPUT | {"stopped", "exit"}


# --- ERROR_KINDS and the code ------------------------------------------------------------------

KIND_WORD = re.compile(r"[a-z]+(-[a-z]+)*")
# Calls that take an error kind among their arguments (the rest of their strings are texts of
# more than one word), and where their arguments start to count.
KIND_TAKERS = {"_refuse": 0, "_fail": 0, "_job_error": 0, "_client_error": 0, "Refused": 0,
               "OffloadError": 1}


def _name(node: ast.AST) -> str:
    """The name a call's function or an attribute's owner goes by ('' if none)."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _words(nodes) -> set[str]:
    """The string constants among ``nodes`` (and in tuples, lists, sets) that look like kinds."""
    out = set()
    for node in nodes:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            out |= _words(node.elts)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and KIND_WORD.fullmatch(node.value):
            out.add(node.value)
    return out


def _is_error_kind(node: ast.AST) -> bool:
    """``x["kind"]`` or ``x.kind`` of anything but a message (``msg.kind`` is a message kind)."""
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
    return isinstance(node, ast.Attribute) and node.attr == "kind" and _name(node.value) != "msg"


def kinds_in(tree: ast.AST) -> set[str]:
    """Every error kind written as a literal: ``kind=...`` arguments and class keywords, the
    kind argument of the calls that take one, ``kind = ...`` in a class, the default of
    ``getattr(x, "kind", ...)`` and of a ``kind`` parameter, ``why`` in a failure's
    ``why, text = ...``, and what an error's kind is compared with."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Call, ast.ClassDef)):
            found |= _words(k.value for k in node.keywords if k.arg == "kind")
        if isinstance(node, ast.Call) and _name(node.func) in KIND_TAKERS:
            found |= _words(node.args[KIND_TAKERS[_name(node.func)]:])
        elif isinstance(node, ast.Call) and _name(node.func) == "getattr" and \
                _words(node.args[1:2]) == {"kind"}:
            found |= _words(node.args[2:])
        elif isinstance(node, ast.ClassDef):
            found |= {w for s in node.body if isinstance(s, ast.Assign)
                      and [_name(t) for t in s.targets] == ["kind"] for w in _words([s.value])}
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args   # defaults are for the last of these
            named = positional[len(positional) - len(node.defaults):]
            found |= _words(d for a, d in zip(named, node.defaults, strict=True) if a.arg == "kind")
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) and \
                _name(node.targets[0].elts[0]) in ("why", "kind") and \
                isinstance(node.value, ast.Tuple):
            found |= _words(node.value.elts[:1])
        elif isinstance(node, ast.Compare) and _is_error_kind(node.left):
            found |= _words(node.comparators)
    return found


def test_collector_finds_kinds():
    """The collector sees each way a kind is written, and would fail on an unknown one."""
    code = '''
class E(ProtocolError, kind="k-one"):
    kind = "k-two"
def f(text, kind="k-three"):
    self._refuse(peer, None, "k-four", "some text")
    raise OffloadError("text", "k-five", True)
    send(protocol.encode("error", kind="k-six", text="t"))
    why, text = "k-seven", "a text"
    if msg["kind"] == "k-eight" or error.kind not in ("k-nine",) or msg.kind == "hello":
        self._fail(job, getattr(exc, "kind", "k-ten"), "a text")
'''
    assert kinds_in(ast.parse(code)) == {f"k-{n}" for n in (
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_error_kind_in_the_code_is_in_the_table(path):
    """Each error kind a source file writes as a literal has an ERROR_KINDS entry."""
    unknown = kinds_in(ast.parse(path.read_text())) - set(protocol.ERROR_KINDS)
    assert not unknown, f"{path.name}: error kinds missing from ERROR_KINDS: {sorted(unknown)}"


def test_every_table_kind_is_used():
    """No ERROR_KINDS entry is dead: each kind appears in the code (ProtocolError's kinds
    included)."""
    used = set().union(*(kinds_in(ast.parse(p.read_text())) for p in SOURCES))
    assert set(protocol.ERROR_KINDS) <= used


def test_protocol_error_kinds_in_the_table():
    """Every ProtocolError class's kind is a wire kind of ERROR_KINDS, not about a job's run
    unless it can name a job."""
    classes, todo = [], [protocol.ProtocolError]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    kinds = {c.kind for c in classes if c.__module__ == protocol.__name__}
    assert kinds == {"protocol", "frame", "decode", "version", "kind", "field", "too-large"}
    assert all(protocol.ERROR_KINDS[k].wire for k in kinds)


def test_error_kinds_are_well_formed():
    """Each entry has a meaning, a known ``ran``, and a kind that fits the error field."""
    ran_values = {protocol.NEVER, protocol.MAY, protocol.EITHER, protocol.NA}
    for kind, entry in protocol.ERROR_KINDS.items():
        assert KIND_WORD.fullmatch(kind) and len(kind) <= 64
        assert entry.meaning and entry.ran in ran_values
        protocol.encode("error", None, None, kind=kind, text=entry.meaning)
