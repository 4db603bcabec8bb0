"""The example configs the packages ship (hooks/etc/*.toml.example) hold only real keys, each
with its real default, as the real loaders read them.

A setting line is ``#key = value`` (no space after ``#``; prose comments have one). Uncommented
all together they must load, and the loader must read every key in them (a renamed or
misspelt key fails here, with unknown-key checks in the loaders or without). Uncommented without
the lines marked ``# example``, they must give exactly the defaults of no file at all.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from offloadd import config as daemon_config

from offloadfs import config as client_config
from offloadfs import keys

EXAMPLES = Path(__file__).resolve().parents[2] / "hooks" / "etc"
SETTING = re.compile(r"^#(?=\[|[A-Za-z_\"])")    # "#key = ..." or "#[table]", not "# prose"
EXAMPLE_MARK = re.compile(r"\s+# example$")
KEY_DIR = "/etc/offloadfs/keys"


def uncommented(path: Path, examples: bool) -> str:
    """The file with its setting lines uncommented (those marked ``# example`` too, or left
    out)."""
    out = []
    for line in path.read_text().splitlines():
        if not SETTING.match(line):
            out.append(line)
        elif examples or not EXAMPLE_MARK.search(line):
            out.append(EXAMPLE_MARK.sub("", line[1:]))
    return "\n".join(out) + "\n"


class Reads(dict):
    """A TOML table that records which of its keys a loader read (iterating reads them all)."""

    def __init__(self, data: dict, path: str, seen: set):
        """Wrap ``data`` (its sub-tables too); reads go into ``seen`` as dotted paths."""
        super().__init__({k: Reads(v, f"{path}{k}.", seen) if isinstance(v, dict) else v
                          for k, v in data.items()})
        self.path, self.seen = path, seen

    def _read(self, key) -> None:
        """Note ``key`` as read."""
        self.seen.add(self.path + str(key))

    def get(self, key, default=None):
        """dict.get, noted."""
        self._read(key)
        return super().get(key, default)

    def __getitem__(self, key):
        """d[key], noted."""
        self._read(key)
        return super().__getitem__(key)

    def _all(self) -> None:
        """Every key noted: the loader took the table whole."""
        for key in super().keys():
            self._read(key)

    def keys(self):
        """dict.keys, all noted."""
        self._all()
        return super().keys()

    def items(self):
        """dict.items, all noted."""
        self._all()
        return super().items()

    def values(self):
        """dict.values, all noted."""
        self._all()
        return super().values()

    def __iter__(self):
        """iter(d), all noted."""
        self._all()
        return super().__iter__()


def leaves(data: dict, path: str = "") -> set[str]:
    """The dotted paths of a TOML document's keys (tables' keys too)."""
    out = set()
    for key, value in data.items():
        out.add(path + key)
        if isinstance(value, dict):
            out |= leaves(value, f"{path}{key}.")
    return out


def load_recording(monkeypatch, module, text: str, load) -> set[str]:
    """Run ``load()`` with ``module.load_toml`` giving ``text`` as a recording table; the keys
    of ``text`` the loader never read."""
    import tomllib

    data = tomllib.loads(text)
    seen: set[str] = set()
    monkeypatch.setattr(module, "load_toml", lambda *_: Reads(data, "", seen))
    load()
    return leaves(data) - seen


@pytest.fixture
def key_dir(tmp_path) -> Path:
    """The key files the client example names (vm1, host, gpu1), made for real."""
    for name in ("vm1", "host", "gpu1"):
        keys.keygen(str(tmp_path), name)
    return tmp_path


def write(tmp_path: Path, name: str, text: str) -> str:
    """``text`` as the file ``tmp_path/name``; its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def settings(cfg: client_config.ClientConfig) -> client_config.ClientConfig:
    """The settings alone: where they were read from (path, configured) left out."""
    return dataclasses.replace(cfg, path="", configured=False)


def test_the_client_example_loads_and_every_key_is_read(tmp_path, key_dir, monkeypatch):
    """offloadfs.toml.example, all uncommented: ClientConfig loads it and reads every key."""
    text = uncommented(EXAMPLES / "offloadfs.toml.example", True).replace(KEY_DIR, str(key_dir))
    cfg = client_config.ClientConfig.load(write(tmp_path, "offloadfs.toml", text))
    assert cfg.keys is not None and cfg.tags == {"ffmpeg": ["gpu"]}
    unread = load_recording(monkeypatch, client_config, text,
                            lambda: client_config.ClientConfig.load("unused"))
    assert not unread, f"keys the loader does not know: {sorted(unread)}"


def test_the_client_examples_defaults_are_the_defaults(tmp_path, monkeypatch):
    """offloadfs.toml.example's "#key = default" lines give the config of no file at all."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    text = uncommented(EXAMPLES / "offloadfs.toml.example", False)
    given = client_config.ClientConfig.load(write(tmp_path, "offloadfs.toml", text))
    assert settings(given) == settings(
        client_config.ClientConfig.load(write(tmp_path, "empty.toml", "")))


def test_the_daemon_example_loads_and_every_key_is_read(tmp_path, monkeypatch):
    """offloadd.toml.example, all uncommented: ServeConfig and BrokerConfig load it and read
    every key between them."""
    path = write(tmp_path, "offloadd.toml", uncommented(EXAMPLES / "offloadd.toml.example", True))
    serve = daemon_config.ServeConfig.from_file(path).check()
    broker = daemon_config.BrokerConfig.from_file(path).check()
    assert serve.commands["convert"] == "/usr/bin/convert" and serve.limits["memory"] == 8 << 30
    assert serve.security.vms["vm1"].uids and broker.workers == "tcp://0.0.0.0:7789"
    text = Path(path).read_text()
    unread_serve = load_recording(monkeypatch, daemon_config, text,
                                  lambda: daemon_config.ServeConfig.from_file("unused"))
    unread_broker = load_recording(monkeypatch, daemon_config, text,
                                   lambda: daemon_config.BrokerConfig.from_file("unused"))
    unread = unread_serve & unread_broker
    assert not unread, f"keys neither loader knows: {sorted(unread)}"


def test_the_daemon_examples_defaults_are_the_defaults(tmp_path):
    """offloadd.toml.example's "#key = default" lines give the config of no file at all."""
    text = uncommented(EXAMPLES / "offloadd.toml.example", False)
    path, empty = write(tmp_path, "offloadd.toml", text), write(tmp_path, "empty.toml", "")
    for kind in (daemon_config.ServeConfig, daemon_config.BrokerConfig):
        assert kind.from_file(path) == kind.from_file(empty)


def test_the_examples_as_shipped_set_nothing(tmp_path):
    """Copied unchanged to /etc/offloadfs, each example loads and gives the defaults."""
    empty = write(tmp_path, "empty.toml", "")
    client = client_config.ClientConfig.load
    assert settings(client(str(EXAMPLES / "offloadfs.toml.example"))) == settings(client(empty))
    for kind in (daemon_config.ServeConfig, daemon_config.BrokerConfig):
        assert kind.from_file(str(EXAMPLES / "offloadd.toml.example")) == kind.from_file(empty)


def test_a_misspelt_key_is_caught_by_the_recording(monkeypatch):
    """The check above can fail: a key the loader does not read is reported."""
    unread = load_recording(monkeypatch, client_config, '[client]\nhost = ["a"]\n',
                            lambda: client_config.ClientConfig.load("unused"))
    assert unread == {"client.host"}

