"""Why a host could not be reached, in words: the one place that turns a failed connection
into the line ``offld``, ``offloadfs``/``offloadd status`` and the mount's log show.

ZeroMQ says only that a connection attempt failed (``EVENT_CONNECT_RETRIED``, no errno) or that
a handshake did (``EVENT_HANDSHAKE_FAILED_*``). :func:`probe` learns the reason the way the
connection would have met it: it resolves the name and makes one plain TCP connection (on the
caller's thread, only after a failure). The rest are plain functions of what was seen.
Each text says what failed and the likely fix; ``Channel.ask`` puts the host in front, with
where it came from (:func:`origin`: ``-H``, the config file, the default).
"""
from __future__ import annotations

import errno
import select

import zmq

# socket is imported in the functions that probe: only after a failure (every offld reads this
# module, and a connection that works never needs it).

NOW_MS = 10    # what probe_now waits for an answer, in ms
MECHANISM_MISMATCH = 0x11000002     # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
KEYS_FIX = "set [security] secret_key and server_key"
GREETING_START = b"\xff" + bytes(8) + b"\x7f\x03"   # ZMTP 3: signature, major version
GREETING_MECHANISM = slice(12, 32)                  # where a greeting names its mechanism
REASONS = {   # errno: what it means here, and what to do
    errno.ECONNREFUSED: "connection refused (is offloadd running there, on that port?)",
    errno.ENETUNREACH: "network is unreachable (check the address, and this machine's routes)",
    errno.EINVAL: "no way to that address from here (a blackhole route? check the address)",
    errno.EHOSTUNREACH: "no route to host (is it up, and is the address right?)",
    errno.ETIMEDOUT: "no answer to the connection (is the host up? a firewall dropping it?)",
    errno.ECONNRESET: "the connection was reset (is that offloadd's port?)",
}


def shown(endpoint: str) -> str:
    """An endpoint as the user wrote it: ``tcp://h:7788`` is ``h:7788``."""
    return endpoint.removeprefix("tcp://")


def named(endpoint: str, origin: str = "") -> str:
    """The host and where it came from: ``h:7788 (from -H)``."""
    return f"{shown(endpoint)} ({origin})" if origin else shown(endpoint)


def address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// endpoint (an IPv6 host without brackets), else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


def probe(endpoint: str, timeout: float) -> tuple[str, object] | None:
    """Resolve ``endpoint`` and connect to it once, as ZeroMQ would (IPv4 for a name): None
    if that works now, else ("resolve", (EAI code, its text)) or ("connect", errno or None
    on a timeout)."""
    target = address(endpoint)
    if target is None:
        return ("connect", errno.ECONNREFUSED)
    import socket  # see the imports at the top
    host, port = target
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return ("resolve", (exc.errno, exc.strerror))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(max(timeout, 0.05))
        try:
            s.connect(found[0][4])
        except TimeoutError:
            return ("connect", None)
        except OSError as exc:
            return ("connect", exc.errno)
    return None


def probe_now(endpoint: str) -> tuple[str, object] | None:
    """:func:`probe` for a caller that must not block (the mount's agent): a numeric address
    only, one non-blocking connect given ``NOW_MS`` to answer (a refusal on a near host does);
    ("untold", None) where it cannot know by then (a name to resolve, a connection still
    under way), else as :func:`probe`."""
    target = address(endpoint)
    if target is None:
        return ("connect", errno.ECONNREFUSED)
    import socket  # see the imports at the top
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    try:
        socket.inet_pton(family, target[0])
    except OSError:
        return ("untold", None)
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        code = s.connect_ex(target)
        if code == errno.EINPROGRESS:
            waiting = select.poll()
            waiting.register(s, select.POLLOUT)
            if not waiting.poll(NOW_MS):
                return ("untold", None)
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return None if code == 0 else ("connect", code)


def unreachable(endpoint: str, seen: tuple[str, object]) -> str:
    """Why the connection failed, from what :func:`probe` saw."""
    step, detail = seen
    if step == "untold":
        return ("cannot connect (ZeroMQ gives no reason; `offloadfs status` tries once and "
                "says why)")
    if step == "resolve":
        host = (address(endpoint) or (shown(endpoint), 0))[0]
        code, said = detail
        import socket  # see the imports at the top
        fix = "no name server answered: check /etc/resolv.conf and the network" \
            if code == socket.EAI_AGAIN else "check the name"
        return f"cannot resolve host {host!r}: {said} ({fix}, or give an address)"
    return REASONS.get(errno.ETIMEDOUT if detail is None else detail) or _strerror(detail)


def _strerror(code: int) -> str:
    """An errno as words, lower case."""
    import os
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def silent(timeout: float, stage: str) -> str:
    """Why no welcome came within ``timeout``: ``stage`` is how far the connection got
    ("" not at all, "connected": TCP only, "handshake": ZeroMQ too)."""
    if not stage:
        return f"no answer to the connection within {timeout:g}s (is the host up? a firewall?)"
    if stage == "connected":
        return (f"no answer within {timeout:g}s: it took the connection but speaks no ZeroMQ "
                f"(is that offloadd's port?)")
    return f"no answer within {timeout:g}s (is offloadd there stopped or overloaded?)"


def greeting(endpoint: str, timeout: float) -> str:
    """The security mechanism ("NULL", "CURVE") that the peer at ``endpoint`` names in its
    ZeroMQ greeting; "" if it sends none. Only our greeting's first 11 bytes go out, so the
    peer never sees a mechanism to refuse (libzmq answers those with the rest of its own)."""
    import socket  # see the imports at the top
    target = address(endpoint)
    data = b""
    try:
        with socket.create_connection(target or ("", 0), timeout=max(timeout, 0.05)) as s:
            s.sendall(GREETING_START)
            while len(data) < GREETING_MECHANISM.stop:
                chunk = s.recv(GREETING_MECHANISM.stop - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:
        return ""
    if len(data) < GREETING_MECHANISM.stop or data[0] != 0xFF or data[9] != 0x7F:
        return ""
    return data[GREETING_MECHANISM].rstrip(b"\0").decode("ascii", "replace")


def handshake(event: int, value: int, keyed: bool, peer: str | None = None) -> tuple[str, str]:
    """(why, text) of a failed ZeroMQ handshake: ``event`` and its ``value`` from the
    monitor, ``keyed`` if this side uses CURVE keys, ``peer`` the mechanism the peer's
    greeting names (:func:`greeting`; None: not asked). A peer that drops the connection
    at once may leave us only NO_DETAIL (EPIPE) where it saw a mismatch."""
    ours = "CURVE" if keyed else "NULL"
    mismatch = (event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == MECHANISM_MISMATCH) \
        or (peer not in (None, "", ours))
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        why, text = "unauthorized", ("this VM's key is not authorized there (its public key "
                                     "must be in the host's authorized_keys)")
    elif mismatch and not keyed:
        why, text = "unauthorized", f"the host requires CURVE keys: {KEYS_FIX}"
    elif mismatch:
        why, text = "handshake", "the host uses no keys, but [security] sets keys here"
    elif peer == "":
        why, text = "handshake", ("the connection closed during the ZeroMQ handshake, and the "
                                  "peer sends no ZeroMQ greeting (is that offloadd's port? a "
                                  "proxy or firewall in the way?)")
    elif keyed and peer == "CURVE":
        why, text = "handshake", ("the secure handshake failed: [security] server_key is not "
                                  "the host's public key")
    elif keyed:
        why, text = "handshake", ("the secure handshake failed: [security] server_key is not "
                                  "the host's public key, or the host uses no keys")
    else:
        why, text = "handshake", (f"the connection closed during the handshake (does the host "
                                  f"require CURVE keys? {KEYS_FIX}; or is it no offloadd?)")
    return why, text


def origin(kind: str, config: str = "") -> str:
    """Where a host came from, for the lines above: ``-H``, ``-L``, ``file`` (``config``) or
    ``default`` (then the fix: name one with -H, or in ``config`` if there is one)."""
    if kind in ("-H", "-L"):
        return f"from {kind}"
    if kind == "file":
        return f"from {config}"
    return f"the default; name a host with -H or [client] hosts in {config}" if config else \
        "the default; name a host with -H"
