"""The guest rig's rules, without booting: every forward stays on loopback here, the guest is
cut off from the rest, and its control agent drops root's groups when it runs as a user."""

import importlib.util
from pathlib import Path

from tests.guest import image, machine

CONTROL = Path(image.GUESTSIDE) / "control.py"


def control_module():
    """The guest-side agent, imported from its file (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("guest_control", CONTROL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forwards_bind_and_reach_loopback_only(tmp_path):
    """hostfwd listens on 127.0.0.1 only; guestfwd relays only to 127.0.0.1; restrict=on."""
    g = machine.Guest(image.Image(tmp_path / "d", tmp_path / "k", tmp_path / "i"),
                      hostfwd=[machine.HostForward(40001, 7788)],
                      guestfwd=[machine.GuestForward("10.0.2.100", 2049, 40002)], accel="tcg")
    g.dir = tmp_path
    net = g.argv()[g.argv().index("-netdev") + 1].split(",")
    assert "restrict=on" in net
    assert "hostfwd=tcp:127.0.0.1:40001-10.0.2.15:7788" in net
    assert "guestfwd=tcp:10.0.2.100:2049-cmd:socat - TCP:127.0.0.1:40002" in net
    assert [item for item in net if "fwd=" in item and "127.0.0.1" not in item] == []


def test_the_image_key_follows_the_sources_and_the_packages(monkeypatch, tmp_path):
    """A different package list gives another base; a changed guest-side file another image
    (and an unchanged tree the same one)."""
    base = image.base_key()
    side = tmp_path / "guestside"
    side.mkdir()
    for f in Path(image.GUESTSIDE).iterdir():
        (side / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(image, "GUESTSIDE", side)
    before = image.image_key(base)
    assert image.image_key(base) == before
    (side / "init").write_text((side / "init").read_text() + "# changed\n")
    assert image.image_key(base) != before
    monkeypatch.setattr(image, "PACKAGES", (*image.PACKAGES, "strace"))
    assert image.base_key() != base


def test_control_runs_as_the_user_without_roots_groups():
    """A run with a uid switches uid, gid and drops supplementary groups (root's 0 among
    them), and never goes through a shell."""
    control = control_module()
    kw = control.popen_args({"argv": ["id"], "uid": 2000, "env": {"X": "1"}})
    assert (kw["user"], kw["group"], kw["extra_groups"]) == (2000, 2000, [])
    assert kw["env"]["X"] == "1" and kw["env"]["PATH"].startswith("/opt/offloadfs/bin:")
    assert "shell" not in kw
    assert "user" not in control.popen_args({"argv": ["id"]})
