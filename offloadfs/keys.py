"""CURVE keys: key files, keyed sockets, and the ring of authorized keys a ZAP handler checks.

Key files are ZeroMQ certificates exactly as ``zmq.auth`` writes them: ``DIR/NAME.key`` holds
the public key, ``DIR/NAME.key_secret`` both keys (mode 0600). A VM's *name* is the base name
of its public key file in the host's ``authorized_keys`` directory; ``[security.vms.NAME]``
entries refer to it.

Threads: a :class:`Keyring` is read by the ZAP handler's thread (``zmq.auth``'s
ThreadAuthenticator, one per daemon or broker, owned by a :class:`Gate`) and by the socket loop
thread; it swaps its whole table at once, under a lock, so readers never see half a scan.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import zmq

from .settings import ConfigError

log = logging.getLogger("offloadfs.keys")

RESCAN_EVERY = 2.0    # seconds: a key file edited in place is seen this late at most


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write DIR/NAME.key and DIR/NAME.key_secret (0600); never overwrite a key."""
    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r}: a key name is a plain file name")
    public, secret = (os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    for path in (public, secret):
        if os.path.exists(path):
            raise ConfigError(f"{path} exists; remove it first to make a new key")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    old = os.umask(0o077)       # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def keygen_command(directory: str, name: str) -> int:
    """``offloadd keygen`` and ``offloadfs keygen``: write the pair, print both paths."""
    public, secret = keygen(directory, name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private; mode 0600)")
    return 0


def load_public(path: str) -> bytes:
    """The public key (z85) in a key file, or ConfigError."""
    return _load(path)[0]


def load_pair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file, or ConfigError."""
    public, secret = _load(path)
    if not secret:
        raise ConfigError(f"{path}: no secret key in it (give the .key_secret file)")
    return public, secret


def _load(path: str) -> tuple[bytes, bytes | None]:
    """Both keys of a certificate file; ConfigError with one line on any failure.

    Read as zmq.auth.load_certificate does (``public-key = "..."`` lines), without importing
    zmq.auth: it pulls in asyncio, 5 ms of every offld's start-up."""
    try:
        with open(path, "rb") as f:
            lines = [line.strip() for line in f if not line.lstrip().startswith(b"#")]
    except OSError as exc:
        raise ConfigError(f"key file {path}: {exc.strerror or 'cannot read it'} (see [security]; "
                          f"keygen DIR NAME makes a pair)") from None
    found = {k.strip(): v.strip(b' \t\'"') for k, _, v in
             (line.partition(b"=") for line in lines)
             if k.strip() in (b"public-key", b"secret-key")}
    public, secret = found.get(b"public-key"), found.get(b"secret-key")
    if public is None:
        raise ConfigError(f"{path}: not a ZeroMQ key file (no public-key)")
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise ConfigError(f"{path}: not a ZeroMQ key file (bad key length)")
    return public, secret


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it talks to."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_path: str, server_path: str) -> ClientKeys:
        """Read the pair and the server's public key."""
        public, secret = load_pair(secret_path)
        return cls(public, secret, load_public(server_path))

    def for_endpoint(self, endpoint: str) -> ClientKeys:
        """These keys, whatever the endpoint (as :meth:`Keychain.for_endpoint`)."""
        return self

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


@dataclasses.dataclass(frozen=True)
class Keychain:
    """A VM's key pair and the public keys of the servers it talks to: ``server`` for any
    endpoint (may be None), ``servers`` per endpoint (tcp://HOST:PORT)."""

    public: bytes
    secret: bytes
    server: bytes | None
    servers: dict[str, bytes]

    @classmethod
    def load(cls, secret_path: str, server_path: str, per_endpoint: dict[str, str]):
        """Read the pair, the default server key (if a path is given) and the per-endpoint
        ones."""
        public, secret = load_pair(secret_path)
        return cls(public, secret, load_public(server_path) if server_path else None,
                   {e: load_public(p) for e, p in per_endpoint.items()})

    def for_endpoint(self, endpoint: str) -> ClientKeys:
        """The keys to talk to ``endpoint``, or ConfigError if no server key is known for it."""
        server = self.servers.get(endpoint, self.server)
        if server is None:
            raise ConfigError(f"no server key for {endpoint}: set [security] server_key or "
                              f"add it to [security.server_keys]")
        return ClientKeys(self.public, self.secret, server)


@dataclasses.dataclass(frozen=True)
class ServerKeys:
    """A daemon's or broker's key pair."""

    public: bytes
    secret: bytes

    @classmethod
    def load(cls, secret_path: str) -> ServerKeys:
        """Read the pair."""
        return cls(*load_pair(secret_path))

    def apply(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` a CURVE server whose peers the ZAP domain ``domain`` checks (before
        it binds)."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = domain.encode()

    def client(self, server: bytes) -> ClientKeys:
        """This pair as a client of ``server`` (a host connecting to its broker)."""
        return ClientKeys(self.public, self.secret, server)


class Keyring:
    """The public keys in a directory, by z85 key; rescanned when the directory changes."""

    def __init__(self, directory: str):
        """Scan ``directory`` now (it must exist)."""
        if not os.path.isdir(directory):
            raise ConfigError(f"{directory}: authorized_keys must be a directory of .key files")
        self.directory = directory
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = {}
        self._seen: tuple = ()
        self._scanned = 0.0
        self.refresh()

    def name_of(self, key: bytes | str | None) -> str | None:
        """The name of an authorized z85 key (after a rescan if due), else None."""
        if not key:
            return None
        self.refresh()
        return self._keys.get(key.encode() if isinstance(key, str) else key)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (on the authenticator's thread): may this key connect?"""
        allowed = self.name_of(key) is not None
        log.log(logging.DEBUG if allowed else logging.INFO, "%s key %s on %s",
                "accepted" if allowed else "refused unknown", key.decode(), domain)
        return allowed

    def names(self) -> list[str]:
        """The names of the authorized keys, sorted."""
        return sorted(self._keys.values())

    def refresh(self) -> None:
        """Rescan if the directory changed (a key added or removed) or a rescan is due."""
        with self._lock:
            try:
                stamp = os.stat(self.directory).st_mtime_ns
            except OSError:
                stamp = None
            now = time.monotonic()
            if stamp == self._seen and now - self._scanned < RESCAN_EVERY:
                return
            self._keys, self._seen, self._scanned = self._scan(), stamp, now

    def _scan(self) -> dict[bytes, str]:
        """Read every NAME.key file; files that cannot be read are logged and skipped."""
        keys = {}
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".key"))
        except OSError as exc:
            log.warning("cannot list %s: %s; no key is authorized", self.directory, exc.strerror)
            return {}
        for name in names:
            try:
                keys[load_public(os.path.join(self.directory, name))] = name[:-len(".key")]
            except ConfigError as exc:
                log.warning("skipping %s", exc)
        return keys


class Gate:
    """The ZAP handler of one process: a ``zmq.auth`` ThreadAuthenticator thread, named
    ``offloadfs-zap``, that asks each domain's :class:`Keyring` about every CURVE handshake.
    The socket loop thread creates and closes it."""

    def __init__(self, ctx: zmq.Context, rings: dict[str, Keyring]):
        """Start the authenticator and register a keyring per ZAP domain."""
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("offloadfs.zap"))
        self.auth.start()
        self.auth.thread.name = "offloadfs-zap"
        for domain, ring in rings.items():
            self.auth.configure_curve_callback(domain, ring)

    def close(self) -> None:
        """Stop the authenticator thread and close its socket."""
        self.auth.stop()
