"""The VM's export settings and descriptors, and the host's path rules, without servers."""

import pytest
from offloadd import policy

from offloadfs import export
from offloadfs.settings import ConfigError


def cfg(**kw) -> export.ExportConfig:
    """An export config from [export] keys."""
    return export.ExportConfig.from_toml({"export": kw})


def test_config_defaults_to_shared_mode():
    """No [export]: nothing is exported, jobs carry no descriptor."""
    exp = export.make(export.ExportConfig.from_toml({}))
    assert type(exp) is export.Export and exp.descriptor("/home/u") is None


@pytest.mark.parametrize("bad", [{"backend": "samba"}, {"backend": "ganesha", "listen": "h:x"},
                                 {"root": 5}])
def test_bad_export_settings_are_one_line_errors(bad):
    """Unknown backends, bad ports and wrong types are refused."""
    with pytest.raises(ConfigError):
        cfg(**bad).address()


def test_exportfs_commands_name_each_client_only():
    """The kernel export is added for each listed client, with sync and no subtree check."""
    add = export.exportfs_command("10.0.0.0/24", "/home", add=True)
    assert add[:3] == ["exportfs", "-i", "-o"] and add[4] == "10.0.0.0/24:/home"
    assert {"rw", "sync", "no_subtree_check"} <= set(add[3].split(","))
    assert export.exportfs_command("10.0.0.0/24", "/home", add=False) == \
        ["exportfs", "-u", "10.0.0.0/24:/home"]


def test_the_kernels_export_is_up_when_etab_lists_every_client(tmp_path, monkeypatch):
    """offld alone leaves the kernel export alone (and does not remove it after its job) when
    the kernel's etab exports the root to each configured client; otherwise it adds its own."""
    etab = tmp_path / "etab"
    monkeypatch.setattr(export.KernelExport, "ETAB", str(etab))
    exp = export.make(cfg(backend="exportfs", root="/home", clients=["10.0.0.0/24", "h1"]))
    assert not exp.serving()   # no etab: no nfsd
    etab.write_text("/home\t10.0.0.0/24(rw,sync,wdelay)\n/srv\th1(rw)\n")
    assert not exp.serving()   # h1 gets /srv, not /home
    etab.write_text("/home\t10.0.0.0/24(rw,sync)\n/home\th1(rw,insecure)\n")
    assert exp.serving()


def test_ganesha_config_exports_the_root_to_the_clients_over_nfs4(tmp_path):
    """The generated config: NFSv4 only, the port, the root, the clients, no grace period."""
    text = export.ganesha_config(cfg(backend="ganesha", root=str(tmp_path),
                                     listen="127.0.0.1:20490", clients=["10.1.0.0/16"]))
    for line in ("NFS_Port = 20490;", "Bind_addr = 127.0.0.1;", "Protocols = 4;",
                 f'Path = "{tmp_path}";', "Clients = 10.1.0.0/16;", "Graceless = true;",
                 "Only_Numeric_Owners = true;"):
        assert line in text


def test_descriptor_and_nonce(tmp_path):
    """A cwd below the root: server, export, relative path and a nonce file, removed after."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    exp = export.make(cfg(backend="ganesha", root=str(tmp_path), listen="10.0.0.5:2049"))
    data = exp.descriptor(str(tmp_path / "a" / "b"))
    assert (data["server"], data["export"], data["path"]) == ("10.0.0.5:2049", str(tmp_path), "a/b")
    nonce = tmp_path / ".offloadfs" / data["nonce"]
    assert nonce.exists()
    exp.finish(data)
    assert not nonce.exists()
    assert exp.descriptor(str(tmp_path))["path"] == ""


def test_cwd_outside_the_root_has_no_descriptor(tmp_path):
    """Outside the exported tree (a sibling with the same prefix too) the job cannot go by NFS."""
    exp = export.make(cfg(backend="ganesha", root=str(tmp_path / "home")))
    for cwd in (str(tmp_path), str(tmp_path / "homeless")):
        with pytest.raises(KeyError):
            exp.descriptor(cwd)


def test_path_map_replaces_the_longest_prefix():
    """Shared mode: /home on the VM is /mnt/vm1/home on the host; unmapped paths stay."""
    pmap = {"/home": "/mnt/vm1/home", "/home/big": "/fast/big"}
    assert policy.map_path("/home/u/w", pmap) == "/mnt/vm1/home/u/w"
    assert policy.map_path("/home/big/x", pmap) == "/fast/big/x"
    assert policy.map_path("/home", pmap) == "/mnt/vm1/home"
    assert policy.map_path("/homeless", pmap) == "/homeless"
    assert policy.map_path("/srv/x", pmap) == "/srv/x"


@pytest.mark.parametrize("rel", ["../etc", "a/../../etc", "/etc", "a/\0b"])
def test_paths_that_escape_the_export_are_refused(rel):
    """A cwd below the export may not leave it."""
    with pytest.raises(policy.Refused):
        policy.below("/mnt/x", rel)


def test_paths_below_the_export_are_joined():
    """A plain relative path stays below the mount."""
    assert policy.below("/mnt/x", "a/b") == "/mnt/x/a/b" and policy.below("/mnt/x", "") == "/mnt/x"


def test_advertise_is_what_hosts_are_told_while_ganesha_binds_listen(tmp_path):
    """Behind NAT or a port forward the descriptor names ``advertise``; ganesha still binds
    ``listen``."""
    c = cfg(backend="ganesha", root=str(tmp_path), listen="127.0.0.1:20490",
            advertise="10.0.2.100")
    assert export.make(c).descriptor(str(tmp_path))["server"] == "10.0.2.100:2049"
    assert "Bind_addr = 127.0.0.1;" in export.ganesha_config(c)
    assert "NFS_Port = 20490;" in export.ganesha_config(c)


@pytest.mark.parametrize("bad", [":", ":2049", "h:x", "h:70000"])
def test_a_bad_advertise_is_a_one_line_error(bad):
    """An advertised address must name a host; a port must be a port."""
    with pytest.raises(ConfigError, match="advertise"):
        cfg(backend="ganesha", listen="127.0.0.1:1", advertise=bad).reach()
