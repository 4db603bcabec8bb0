"""The shim program's request and reply lines, without a mount."""
import re
import signal

import pytest

from offloadfs import shim


def test_request_with_arguments_and_an_early_signal():
    """Path, count, arguments (even empty ones), then caught signals."""
    args, early = shim.parse_request(b"/opt/offload/cat\x003\x00a b\x00\x00-n\x00INT\x00")
    assert args == [b"a b", b"", b"-n"] and early == [signal.SIGINT]


def test_request_without_arguments():
    """No arguments is no arguments, not one empty one."""
    assert shim.parse_request(b"/opt/offload/cat\x000\x00") == ([], [])


@pytest.mark.parametrize("data", [b"", b"/x\x00", b"/x\x00two\x00", b"/x\x002\x00a\x00",
                                  b"/x\x000\x00KILL\x00", b"/x\x000\x00a"])
def test_malformed_requests_are_refused(data):
    """Wrong counts, unknown signal names and unterminated fields raise BadRequest."""
    with pytest.raises(shim.BadRequest):
        shim.parse_request(data)


def test_replies():
    """Status, signal death (re-raised only when safe) and local runs."""
    assert shim.reply_status(3) == b"3\n" and shim.reply_status(256 + 7) == b"7\n"
    assert shim.reply_signal(signal.SIGINT) == b"s INT\n"
    assert shim.reply_signal(signal.SIGSEGV) == b"139\n"   # would dump the shell's core
    assert shim.reply_local("/usr/bin/convert") == b"x /usr/bin/convert\n"


def test_script_names_its_command_and_starts_with_a_shebang():
    """The shim is a /bin/sh script that resets its own variables before anything else."""
    text = shim.script("convert", "/opt/off load").decode()
    assert text.startswith("#!/bin/sh\n") and "shim for convert" in text
    assert "command exec 3<>'/opt/off load/.ctl/convert' || exit 255" in text
    assert text.splitlines()[2] == "s='' t=''"


def test_the_forwarded_signals_are_the_protocols():
    """The shim traps the protocol's forwarded signals; a job gets those and a stop (TSTP)."""
    from offloadfs import jobrun, protocol
    text = shim.script("cat", "/m").decode()
    for name in protocol.FORWARDED_SIGNALS:
        assert f"trap 's=${{s:-{name}}}' {name}\n" in text
    assert shim.parse_request(b"/m/cat\x000\x00WINCH\x00") == ([], [signal.SIGWINCH])
    names = [signal.Signals(s).name[3:] for s in jobrun.FORWARDED]   # plain ints (handoff)
    assert names == list(protocol.FORWARDED_SIGNALS) + ["TSTP"]


def test_the_commonest_reply_is_one_byte():
    """Exit status 0 is an empty line (dash reads a byte per FUSE request); the script's
    ``exit`` turns it into 0."""
    assert shim.reply_status(0) == b"\n" and shim.reply_status(256) == b"\n"
    assert 'exit "${st:-0}"' in shim.script("true", "/opt/offload").decode()


def test_the_programs_forwarded_signals_are_the_scripts():
    """The compiled shim (_shim.c) catches the same signals as the script's traps, in the
    same order, and a caught one's name is what parse_request takes."""
    from offloadfs import protocol
    source = shim.PROGRAM.with_name("_shim.c").read_text()
    listed = re.search(r"forwarded\[\] = \{([^}]*)\}", source).group(1)
    assert [n.strip().removeprefix("SIG") for n in listed.split(",")] == \
        list(protocol.FORWARDED_SIGNALS)
    for name in protocol.FORWARDED_SIGNALS:
        assert f'{{"{name}", SIG{name}}}' in source


def test_the_program_is_served_unless_unbuilt_or_the_script_is_asked_for(monkeypatch,
                                                                         tmp_path):
    """shim.program(): the built program's bytes; None when it is missing, or with
    OFFLOADFS_SHIM=script."""
    built = tmp_path / "_shim"
    built.write_bytes(b"\x7fELF...")
    monkeypatch.setattr(shim, "PROGRAM", built)
    monkeypatch.delenv(shim.CHOICE, raising=False)
    assert shim.program() == b"\x7fELF..."
    monkeypatch.setenv(shim.CHOICE, "script")
    assert shim.program() is None
    monkeypatch.delenv(shim.CHOICE)
    monkeypatch.setattr(shim, "PROGRAM", tmp_path / "absent")
    assert shim.program() is None
