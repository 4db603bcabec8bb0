"""The shared settings readers: TOML files, typed fields and the one HOST[:PORT] parser."""

import subprocess
import sys

import pytest
from offloadd.config import BrokerConfig

from offloadfs import settings
from offloadfs.settings import ConfigError, host_endpoint, host_port


@pytest.mark.parametrize("text, endpoint", [
    ("h", "tcp://h:7788"),
    ("h:9", "tcp://h:9"),
    ("10.0.0.5:65535", "tcp://10.0.0.5:65535"),
    ("[::1]:7000", "tcp://[::1]:7000"),
    ("[fe80::1]", "tcp://[fe80::1]:7788"),
    ("::1", "tcp://::1:7788"),               # a bare IPv6 address: all host, the default port
    ("tcp://h:1", "tcp://h:1"),
    ("ipc:///run/x", "ipc:///run/x"),
])
def test_host_endpoint_good(text, endpoint):
    """A host with or without a port, IPv6 in brackets or bare; endpoints pass unchanged."""
    assert host_endpoint(text) == endpoint


@pytest.mark.parametrize("text", ["", ":80", "h:", "h:x", "h:0", "h:65536", "h:-1", "[]:80",
                                  "[::1]x", "[::1]:", "h:٣"])
def test_host_endpoint_bad_is_one_line(text):
    """No host, no port after the colon, a port that is no number of 1..65535: one line."""
    with pytest.raises(ConfigError) as caught:
        host_endpoint(text)
    assert str(caught.value) == f"{text}: expected HOST[:PORT]"
    assert "\n" not in str(caught.value)


def test_bind_addresses_may_leave_out_the_host_and_ask_for_any_port():
    """ADDR:PORT of a server: empty host (the caller picks one), port 0; port still required."""
    assert host_port(":0", None, bind=True) == ("", 0)
    assert host_port("127.0.0.1:9100", None, bind=True) == ("127.0.0.1", 9100)
    assert host_port("", 2049, bind=True) == ("", 2049)
    with pytest.raises(ConfigError, match=r"^9100: expected ADDR:PORT$"):
        host_port("9100", None, bind=True)
    with pytest.raises(ConfigError, match=r"^h:x: expected ADDR\[:PORT\]$"):
        host_port("h:x", 2049, bind=True)


def test_load_toml_bad_file_is_one_line(tmp_path):
    """A syntax error or a missing file named by the user: one line naming the file."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve\nslots = 2\n")
    with pytest.raises(ConfigError) as caught:
        settings.load_toml(str(bad))
    assert str(caught.value).startswith(f"{bad}: ") and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="No such file"):
        settings.load_toml(str(tmp_path / "absent.toml"))
    assert settings.load_toml(None, str(tmp_path / "absent.toml")) == {}


def test_section_and_typed_refuse_wrong_types():
    """A key that is not a table, a value of the wrong type: one line each."""
    with pytest.raises(ConfigError, match=r"^\[serve\] must be a table$"):
        settings.section({"serve": 3}, "serve")
    with pytest.raises(ConfigError, match=r'^slots = "x": expected an integer$'):
        settings.typed({"slots": "x"}, "slots", int, 1)
    assert settings.typed({}, "slots", int, 1) == 1


@pytest.mark.parametrize("module", ["offloadfs.settings", "offloadfs.keys", "offloadfs.export",
                                    "offloadfs.config", "offloadd.config"])
def test_each_settings_module_imports_alone(module):
    """No import cycle: each module imports first in a fresh interpreter."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_broker_config_file_then_flags(tmp_path):
    """[broker] values, loopback defaults without keys; non-empty flags win."""
    path = tmp_path / "offloadd.toml"
    path.write_text('[broker]\nworkers = "tcp://127.0.0.1:9"\nsuspend_limit = 5\n')
    cfg = BrokerConfig.from_file(str(path))
    assert (cfg.clients, cfg.workers, cfg.suspend_limit) == \
        ("tcp://127.0.0.1:7788", "tcp://127.0.0.1:9", 5.0)

    class Flags:
        clients, workers, name, metrics = "tcp://127.0.0.1:1", "", "b", None
    cfg.apply_flags(Flags)
    assert (cfg.clients, cfg.workers, cfg.name) == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:9", "b")
    path.write_text("[broker]\nsuspend_limit = -1\n")
    with pytest.raises(ConfigError, match="expected seconds >= 0"):
        BrokerConfig.from_file(str(path)).apply_flags(Flags)
