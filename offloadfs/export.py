"""The VM's side of the data path: offering a tree to the compute hosts over NFS.

Backends: ``ganesha`` (nfs-ganesha run as our child, NFSv4 only, no rpcbind), ``exportfs`` (the
kernel's nfsd, an export added with ``exportfs -i`` and removed at the end) and ``none`` (the
hosts already see the same tree). The mount's agent thread starts and stops the export (a child
started there dies with the mount process: PR_SET_PDEATHSIG). :meth:`Export.descriptor` tells
each job where its cwd is: server, export, and the path below the export's root.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import TYPE_CHECKING

from . import protocol
from .settings import ConfigError, host_port, section, typed

BACKENDS = ("ganesha", "exportfs", "none")
DEFAULT_NFS_PORT = 2049
PR_SET_PDEATHSIG = 1
# The servers' tools (subprocess, shutil, tempfile, socket, ctypes) are imported where a server
# starts or stops: every offld reads this module for ExportConfig, and few ever run a server.
if TYPE_CHECKING:
    import subprocess


class ExportError(Exception):
    """The export could not be set up; one line for the user."""


@dataclasses.dataclass
class ExportConfig:
    """The [export] table of the VM's config."""

    backend: str = "none"
    root: str = "/home"
    listen: str = ""
    advertise: str = ""
    clients: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1"])

    @classmethod
    def from_toml(cls, data: dict) -> ExportConfig:
        """Read and check [export]."""
        table, cfg = section(data, "export"), cls()
        cfg.backend = typed(table, "backend", str, cfg.backend)
        if cfg.backend not in BACKENDS:
            raise ConfigError(f"export backend = {cfg.backend!r}: expected one of "
                              f"{', '.join(BACKENDS)}")
        cfg.root = os.path.realpath(typed(table, "root", str, cfg.root))
        cfg.listen = typed(table, "listen", str, cfg.listen)
        cfg.advertise = typed(table, "advertise", str, cfg.advertise)
        if cfg.advertise:
            cfg.reach()
        cfg.clients = [str(c) for c in typed(table, "clients", list, cfg.clients)]
        return cfg

    def address(self) -> tuple[str, int]:
        """(address, port) where the NFS server listens: ``listen``, this host's name where
        it names no address."""
        try:
            host, port = host_port(self.listen, DEFAULT_NFS_PORT, bind=True)
        except ConfigError:
            raise ConfigError(f"export listen = {self.listen!r}: expected ADDR[:PORT]") from None
        if host:
            return host, port
        import socket  # see the imports at the top
        return socket.gethostname(), port

    def reach(self) -> tuple[str, int]:
        """(host, port) the compute hosts are told to mount: ``advertise`` where the server is
        reached at another address than it listens on (NAT, a port forward), else
        :meth:`address`."""
        if not self.advertise:
            return self.address()
        try:
            return host_port(self.advertise, DEFAULT_NFS_PORT)
        except ConfigError:
            raise ConfigError(f"export advertise = {self.advertise!r}: expected "
                              "HOST[:PORT]") from None


class Export:
    """No export: the hosts see the same tree (``shared`` mode)."""

    def __init__(self, cfg: ExportConfig):
        """Remember the settings; nothing happens until :meth:`start`."""
        self.cfg = cfg

    def start(self) -> None:
        """Offer the tree."""

    def stop(self) -> None:
        """Stop offering it."""

    def descriptor(self, cwd: str) -> dict | None:
        """How a host finds ``cwd``: None means "the same path" (shared mode)."""
        return None

    def finish(self, data: dict | None) -> None:
        """The job that carried ``data`` is over."""

    def inside(self, cwd: str) -> bool:
        """True if ``cwd`` lies in the exported tree."""
        root = self.cfg.root.rstrip("/") + "/"
        return cwd == self.cfg.root or cwd.startswith(root)


class NfsExport(Export):
    """An NFS export of ``root``: jobs carry where their cwd is below it, and a nonce file the
    host must see there, so that a wrong mapping can never run a job in the wrong tree."""

    NONCES = ".offloadfs"

    def serving(self) -> bool:
        """True if this export is up already (started by the mount); each backend says how."""
        return False

    def descriptor(self, cwd: str) -> dict | None:
        """server, export, the cwd below the root and a fresh nonce (whose file this writes);
        KeyError if ``cwd`` is outside the root. :meth:`finish` removes the nonce file."""
        if not self.inside(cwd):
            raise KeyError(cwd)
        host, port = self.cfg.reach()
        rel = os.path.relpath(cwd, self.cfg.root)
        nonce = os.urandom(12).hex()
        directory = os.path.join(self.cfg.root, self.NONCES)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        with open(os.path.join(directory, nonce), "x"):
            pass
        return {"mode": protocol.DATA_NFS, "server": f"{host}:{port}", "export": self.cfg.root,
                "path": "" if rel == "." else rel, "nonce": nonce}

    def finish(self, data: dict | None) -> None:
        """Remove a descriptor's nonce file."""
        if data and data.get("nonce"):
            try:
                os.unlink(os.path.join(self.cfg.root, self.NONCES, data["nonce"]))
            except OSError:
                pass


class GaneshaExport(NfsExport):
    """nfs-ganesha serving ``root`` (NFSv4, VFS FSAL) as a child of the mount process."""

    def __init__(self, cfg: ExportConfig):
        """Prepare; :meth:`start` writes the config and runs ganesha.nfsd."""
        super().__init__(cfg)
        self.proc: subprocess.Popen | None = None
        self.dir = ""

    def start(self) -> None:
        """Write the config, start ganesha.nfsd, wait until it listens (or raise)."""
        import shutil  # see the imports at the top
        import subprocess
        import tempfile
        binary = shutil.which("ganesha.nfsd") or "/usr/bin/ganesha.nfsd"
        if not os.path.exists(binary):
            raise ExportError("ganesha.nfsd is not installed (Debian: nfs-ganesha "
                              "nfs-ganesha-vfs)")
        self.dir = tempfile.mkdtemp(prefix="offloadfs-ganesha-")
        conf = os.path.join(self.dir, "ganesha.conf")
        with open(conf, "w") as f:
            f.write(ganesha_config(self.cfg))
        self.proc = subprocess.Popen(
            [binary, "-F", "-L", self.log, "-f", conf, "-p", os.path.join(self.dir, "pid"),
             "-N", "NIV_EVENT"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self._wait_listening(20)

    @property
    def log(self) -> str:
        """Where ganesha logs."""
        return os.path.join(self.dir, "ganesha.log")

    def serving(self) -> bool:
        """True if a server accepts connections at the export's address already (the
        mount's ganesha: offld alone then uses it rather than start its own)."""
        import socket  # see the imports at the top
        try:
            socket.create_connection(self.cfg.address(), timeout=0.5).close()
        except OSError:
            return False
        return True

    def _wait_listening(self, timeout: float) -> None:
        """Return once the NFS port accepts connections; ExportError if ganesha dies first."""
        host, port = self.cfg.address()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ExportError(f"ganesha.nfsd exited {self.proc.returncode}: {self._tail()}")
            if self.serving():
                return
            time.sleep(0.05)
        self.stop()
        raise ExportError(f"ganesha.nfsd did not listen on {host}:{port} within {timeout:g}s")

    def _tail(self) -> str:
        """The last line of ganesha's log."""
        try:
            with open(self.log, errors="replace") as f:
                lines = f.read().strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def stop(self) -> None:
        """Stop ganesha (TERM, then KILL) and remove its files."""
        import shutil  # see the imports at the top
        import subprocess
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


class KernelExport(NfsExport):
    """The kernel's nfsd: ``exportfs -i`` adds the export for each client, removes it at stop."""

    OPTIONS = "rw,sync,no_subtree_check,no_root_squash,insecure"

    ETAB = "/var/lib/nfs/etab"   # the kernel's exports now: "PATH\tCLIENT(OPTIONS)" lines

    def serving(self) -> bool:
        """True if the kernel exports the root to every client already (the mount added it:
        offld alone then leaves it as it is, and does not remove it after its job)."""
        try:
            with open(self.ETAB, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            return False
        pairs = set()
        for line in lines:
            path, _, who = line.partition("\t")
            pairs.add((path, who.split("(")[0]))
        return bool(self.cfg.clients) and all((self.cfg.root, client) in pairs
                                              for client in self.cfg.clients)

    def start(self) -> None:
        """Add the export for every client."""
        for client in self.cfg.clients:
            _run(exportfs_command(client, self.cfg.root, add=True))

    def stop(self) -> None:
        """Remove the export for every client (best effort)."""
        for client in self.cfg.clients:
            try:
                _run(exportfs_command(client, self.cfg.root, add=False))
            except ExportError:
                pass


def exportfs_command(client: str, root: str, add: bool) -> list[str]:
    """The exportfs command line that adds (or removes) ``root`` for ``client``."""
    if add:
        return ["exportfs", "-i", "-o", KernelExport.OPTIONS, f"{client}:{root}"]
    return ["exportfs", "-u", f"{client}:{root}"]


def ganesha_config(cfg: ExportConfig) -> str:
    """An nfs-ganesha config exporting ``cfg.root`` over NFSv4 to ``cfg.clients`` only.

    Graceless: no 90 s grace period at start (we keep no state across restarts). Numeric
    owners: uids travel as numbers, so files belong to the caller on both sides. No attribute
    caching: the VM changes its files locally too, and the host must see that at once."""
    host, port = cfg.address()
    clients = ", ".join(cfg.clients)
    return f"""NFS_CORE_PARAM {{
    NFS_Port = {port};
    Bind_addr = {host};
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{
    Graceless = true;
    Only_Numeric_Owners = true;
    RecoveryBackend = fs;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT_DEFAULTS {{ Access_Type = None; }}
EXPORT {{
    Export_Id = 1;
    Path = "{cfg.root}";
    Pseudo = "{cfg.root}";
    Protocols = 4;
    Transports = TCP;
    SecType = sys;
    Squash = No_Root_Squash;
    Attr_Expiration_Time = 0;
    Access_Type = None;
    CLIENT {{ Clients = {clients}; Access_Type = RW; }}
    FSAL {{ Name = VFS; }}
}}
"""


def make(cfg: ExportConfig) -> Export:
    """The export for a config."""
    return {"ganesha": GaneshaExport, "exportfs": KernelExport, "none": Export}[cfg.backend](cfg)


def _run(argv: list[str]) -> None:
    """Run a command; ExportError with its last stderr line if it fails."""
    import subprocess  # see the imports at the top
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise ExportError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def die_with_parent() -> None:
    """In the child: get SIGTERM when the thread that started us dies."""
    import ctypes  # see the imports at the top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
