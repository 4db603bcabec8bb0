"""Unknown tables and keys in the settings files: one line with the file, the line and the
nearest valid name; every documented example still loads."""

import re
import tomllib
from pathlib import Path

import pytest
from offloadd import config as host_config

from offloadfs import config as vm_config
from offloadfs import settings, tomlcheck
from offloadfs.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VM, HOST = vm_config.SCHEMA, host_config.SCHEMA


def error(text: str, schema: dict) -> str | None:
    """The checker's line for ``text`` as a file named f.toml."""
    return tomlcheck.first_error(tomllib.loads(text), text, schema, "f.toml")


@pytest.mark.parametrize("text, schema, line", [
    ('[client]\nhost = ["h1"]\n', VM,
     "f.toml:2: unknown key 'host' in [client] (did you mean 'hosts'?)"),
    ('[client]\nhosts = ["h1"]\n\n[bogus]\nx = 1\n', VM,
     "f.toml:4: unknown section [bogus] (valid: client, commands, env, export, mount, "
     "security, staging, tags)"),
    ('[clent]\nhosts = ["h1"]\n', VM, "f.toml:1: unknown section [clent] (did you mean [client]?)"),
    ('hosts = ["h1"]\n[client]\n', VM, "f.toml:1: key 'hosts' outside any section (keys go "
     "under one: client, commands, env, export, mount, security, staging, tags)"),
    ('client.hots = ["h1"]\n', VM, "f.toml:1: unknown key 'hots' in [client] (did you mean "
     "'hosts'?)"),
    ('[security]\nsecret_key = "k"\n[security.srv_keys]\n', VM,
     "f.toml:3: unknown table [security.srv_keys] (did you mean [security.server_keys]?)"),
    ('[serve]\nslots = 2\n[limits]\n"cpus" = 3\n', HOST,
     "f.toml:4: unknown key 'cpus' in [limits] (did you mean 'cpu'?)"),
    ('[security.vms.vm1]\nuids = "1-2"\nuid = "3"\n', HOST,
     "f.toml:3: unknown key 'uid' in [security.vms.vm1] (did you mean 'uids'?)"),
    ('[security]\nvms = { vm1 = { uidz = "1" } }\n', HOST,
     "f.toml:2: unknown key 'uidz' in [security.vms.vm1] (did you mean 'uids'?)"),
    ('[serve]\nzzz = 1\n', HOST, "f.toml:2: unknown key 'zzz' in [serve] (valid: allow_root, "
     "client_timeout, connect, heartbeat, listen, metrics, name, scratch, slot_env, slots, "
     "state_dir, suspend_limit, tags)"),
])
def test_unknown_names_are_one_line_with_the_nearest_valid_one(text, schema, line):
    """A typo of a key or a section, a key outside any section, a dotted or quoted key, an
    inline table: the line that defines it and the closest name (or the valid ones)."""
    assert error(text, schema) == line


def test_the_first_error_in_the_file_is_the_one_said():
    """Two unknown names: the one nearer the top of the file."""
    text = '[serve]\nslots = 2\n[bogus]\n[mounts]\nclinet = "kernel"\n'
    assert error(text, HOST).startswith("f.toml:3: unknown section [bogus]")


def test_free_form_tables_take_any_name():
    """Command names, tags, per-host server keys, VM rules and inline tables of values."""
    assert error('[tags]\nffmpeg = ["gpu"]\n[security.server_keys]\n"h:1" = "k"\n', VM) is None
    assert error('[commands]\nmy-tool = "/bin/x"\n[serve]\nslot_env = { ANY = "{slot}" }\n'
                 '[mounts]\npath_map = { "/home" = "/m" }\n[security.vms.a]\nuids = "1"\n'
                 '[broker]\nclient_timeout = 1.0\n', HOST) is None


def toml_blocks(path: Path) -> list[str]:
    """The ```toml blocks of a document."""
    return re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment.md"])
def test_every_documented_example_passes(doc):
    """Each example file of the documentation is known to the VM's or the host's schema."""
    blocks = toml_blocks(ROOT / doc)
    assert blocks
    for text in blocks:
        assert error(text, VM) is None or error(text, HOST) is None, text


def test_loaders_refuse_unknown_names_naming_the_file(tmp_path):
    """offld's and offloadd's readers raise the checker's line; a good file still loads."""
    path = tmp_path / "vm.toml"
    path.write_text('[client]\nhost = ["10.0.0.1"]\n')
    with pytest.raises(ConfigError) as caught:
        vm_config.ClientConfig.load(str(path))
    assert str(caught.value) == f"{path}:2: unknown key 'host' in [client] (did you mean 'hosts'?)"
    path.write_text('[broker]\nclient_timeout = 1.5\n[serve]\nslots = 2\n')
    assert host_config.BrokerConfig.from_file(str(path)).client_timeout == 1.5
    assert host_config.ServeConfig.from_file(str(path)).slots == 2
    path.write_text("[serve]\nslots = 2\n[bogus]\n")
    with pytest.raises(ConfigError, match=r":3: unknown section \[bogus\]"):
        host_config.ServeConfig.from_file(str(path))


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    """Bytes that are no text: one line, not a traceback."""
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[client]\n")
    with pytest.raises(ConfigError, match=r"bin.toml: not UTF-8 text$"):
        settings.load_toml(str(path))


@pytest.mark.parametrize("text, line", [
    ('[serve]\nslots = "x"\n', '2: [serve] slots = "x": expected an integer'),
    ('[serve]\nname = "h"\n\n[serve.slot_env]\nA = "1"\n[mounts]\nidle_unmount = true\n',
     "7: [mounts] idle_unmount = true: expected a number"),
    ("[serve]\ntags = 'gpu'\n", '2: [serve] tags = "gpu": expected a list'),
])
def test_a_value_of_the_wrong_type_names_its_file_and_line(tmp_path, text, line):
    """Not only unknown names: a known key with a value of the wrong type says where it is."""
    path = tmp_path / "offloadd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        host_config.ServeConfig.from_file(str(path))
    assert str(caught.value) == f"{path}:{line}"
