"""The hand-off's rules without sockets: frames, their checks, the mount's address, which
mount, and which offld runs may go through a mount's agent."""
from __future__ import annotations

import json
import math
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offloadfs import handoff, offld
from offloadfs.handoff import Decoder, End, HandoffError, Job


def test_frames_round_trip_whatever_the_cut():
    """A stream of frames cut at every byte decodes to the same frames, in order."""
    frames = [Job.frame(["sh", "-c", "echo \udcff"], "auto", False),
              handoff.encode(handoff.CONTINUED),
              End.frame(3, None, "h1", "exited", "", {"run": 0.5})]
    stream = b"".join(frames)
    decoder, got = Decoder(), []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert [kind for kind, _ in got] == [handoff.JOB, handoff.CONTINUED, handoff.END]
    assert Job(got[0][1], 3).argv == [b"sh", b"-c", b"echo \xff"]
    assert End(got[2][1]).timings == {"run": 0.5} and decoder.buffer == bytearray()


@pytest.mark.parametrize("data, said", [
    (b"\x00\x00\x00\x00", "a frame of 0 bytes"),
    (b"\x01\x00\x00\x01J", "a frame of 16777217 bytes"),
    (b"\x00\x00\x00\x01Q", "unknown frame kind"),
    (b"\x00\x00\x00\x03J{x", "not JSON"),
    (b"\x00\x00\x00\x03J[]", "not an object"),
    (b"\x00\x00\x00\x02J\xff", "not JSON"),
])
def test_bad_frames_are_one_line_errors(data, said):
    """Each malformed frame raises a HandoffError that says what was wrong."""
    with pytest.raises(HandoffError, match=said) as err:
        Decoder().feed(data)
    assert "\n" not in str(err.value)


GOOD = {"v": handoff.VERSION, "argv": ["cc", "-c", "x.c"], "tty": "never", "quiet": True}


@pytest.mark.parametrize("change, nfds, said", [
    ({"v": 2}, 3, "version 2"),
    ({"v": None}, 3, "version None"),
    ({"argv": []}, 3, "argv"),
    ({"argv": "cc"}, 3, "argv"),
    ({"argv": ["/usr/bin/cc"]}, 3, "argv"),
    ({"argv": ["cc", 1]}, 3, "argv"),
    ({"argv": ["cc", "a\0b"]}, 3, "argv"),
    ({"argv": [""]}, 3, "argv"),
    ({"tty": "maybe"}, 3, "tty 'maybe'"),
    ({"tty": 1}, 3, "'tty'"),
    ({"quiet": 1}, 3, "'quiet'"),
    ({}, 2, "2 fds"),
    ({}, 4, "4 fds"),
])
def test_bad_jobs_are_refused(change, nfds, said):
    """A job frame with a bad field or the wrong number of fds is refused, saying which."""
    with pytest.raises(HandoffError, match=said):
        Job({**GOOD, **change}, nfds)


def test_a_job_carries_no_identity():
    """Fields a peer adds (uid, gid, pid, cwd) are not part of a Job: identity comes from the
    kernel only."""
    job = Job({**GOOD, "uid": 0, "gid": 0, "pid": 1, "cwd": "/"}, 3)
    assert set(vars(job)) == {"argv", "tty", "quiet"}


@pytest.mark.parametrize("change, said", [
    ({"status": "0"}, "'status'"),
    ({"status": True}, "'status'"),
    ({"signal": "TERM"}, "signal"),
    ({"ending": "maybe"}, "ending 'maybe'"),
    ({"timings": []}, "'timings'"),
])
def test_bad_ends_are_refused(change, said):
    """offld refuses an end frame it cannot act on (it then exits 255, may have run)."""
    good = {"status": 0, "signal": None, "host": "h", "ending": "exited", "error": "",
            "timings": {}}
    with pytest.raises(HandoffError, match=said):
        End({**good, **change})


def test_an_end_says_its_error_and_drops_odd_timings():
    """str() of an end is its error line; timings keep numbers only."""
    end = End({"status": 255, "signal": None, "host": "h", "ending": "never ran",
               "error": "no host; it never ran", "timings": {"run": 1, "x": "y", "b": True}})
    assert (str(end), end.timings) == ("no host; it never ran", {"run": 1})


def test_a_stop_frame_names_a_signal():
    """The stop's signal is a signal number."""
    assert handoff.stop_signal({"signal": 20}) == 20
    for bad in ({"signal": 0}, {"signal": 99}, {"signal": "TSTP"}, {}):
        with pytest.raises(HandoffError):
            handoff.stop_signal(bad)


def test_the_address_is_abstract_short_and_one_per_mount():
    """Each mount point has its own abstract name, within sun_path even for a long path."""
    a, b = handoff.address("/opt/offload"), handoff.address("/opt/offload2")
    long = handoff.address("/x" * 200)
    assert a != b and a.startswith(b"\0") and b"/opt/offload" in a
    assert len(long) <= handoff.MAX_ADDRESS and long != handoff.address("/y" * 200)


def test_the_mount_on_path_is_chosen_first():
    """The first offloadfs mount on PATH, else the first mount; none without mounts."""
    mounts = {"/mnt/a": 0, "/opt/offload": 0}
    assert handoff.choose_mount("/usr/bin:/opt/offload/:/mnt/a", mounts, 1000) == "/opt/offload"
    assert handoff.choose_mount("/usr/bin:/bin", mounts, 1000) == "/mnt/a"
    assert handoff.choose_mount("::/usr/bin", {}, 1000) is None


def test_only_roots_and_the_callers_own_mounts_are_asked():
    """Another user's mount (its agent could not read our /proc) is passed over, on PATH
    or not; so is a mount whose owner mountinfo does not say."""
    mounts = {"/home/b/offload": 1001, "/mnt/unknown": None, "/home/a/offload": 1000,
              "/opt/offload": 0}
    path = "/home/b/offload:/mnt/unknown:/home/a/offload:/opt/offload"
    assert handoff.choose_mount(path, mounts, 1000) == "/home/a/offload"
    assert handoff.choose_mount(path, mounts, 1002) == "/opt/offload"
    assert handoff.choose_mount("/usr/bin", {"/home/b/offload": 1001}, 1000) is None


def _opts(**given):
    """offld's parsed options with ``given`` set."""
    return offld.parser().parse_args([*given.get("argv", []), "--", "true"])


@pytest.mark.parametrize("argv, why", [
    ([], None),
    (["-o", "f", "-Q", "-q", "-t", "--fallback", "/bin/true"], None),
    (["-T"], None),
    (["-c", "f.toml"], "a config of its own"),
    (["-H", "h"], "hosts of its own"),
    (["-L", "b"], "hosts of its own"),
    (["-n"], "staging (-n)"),
    (["-p"], "-p or -d"),
    (["-d"], "-p or -d"),
])
def test_which_runs_go_through_the_agent(argv, why, monkeypatch):
    """-o, -Q, -q, -t, -T and --fallback go through the mount's agent; -c, -H, -L, -n, -p
    and -d make offld take its own path."""
    monkeypatch.delenv("OFFLOADFS_CONFIG", raising=False)
    monkeypatch.delenv("OFFLOADFS_DEBUG", raising=False)
    assert handoff.reason_not(_opts(argv=argv), ["true"]) == why


def test_a_config_in_the_environment_or_a_command_path_is_not_handed_off(monkeypatch):
    """$OFFLOADFS_CONFIG and a command given by its path take offld's own path too."""
    monkeypatch.delenv("OFFLOADFS_DEBUG", raising=False)
    monkeypatch.setenv("OFFLOADFS_CONFIG", "/etc/x.toml")
    assert handoff.reason_not(_opts(), ["true"]) == "a config of its own"
    monkeypatch.delenv("OFFLOADFS_CONFIG")
    assert handoff.reason_not(_opts(), ["/bin/true"]) == "a command given by its path"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12)


@given(JSON)
def test_the_codec_is_jsons(value):
    """handoff.dumps and loads (json's C halves, no json module at offld's start) write and
    read exactly what json.dumps and json.loads do, lone surrogates (surrogateescape) too."""
    text = json.dumps(value, separators=(",", ":"))
    assert handoff.dumps(value) == text
    assert handoff.loads(text) == json.loads(text)
    spaced = json.dumps(value, indent=1)
    assert handoff.loads(f" {spaced}\n") == json.loads(f" {spaced}\n")


@given(st.text(max_size=12) | st.sampled_from(["", " ", "{", "[1] 2", "\ufeff{}", "{\"a\":}",
                                                 "NaN", "[Infinity]", "01", "\"\\x\"", "{} {}"]))
def test_the_codec_refuses_what_json_refuses(text):
    """Any text: loads gives json.loads's value, or a ValueError where json.loads raises."""
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            handoff.loads(text)
        return
    got = handoff.loads(text)
    assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected))


def test_an_end_carries_the_job_logs_line():
    """The agent's end frame may carry the job log's line and file; offld reads them, and an
    end without them (an older agent, a refusal) still reads."""
    frame = End.frame(0, None, "h1", "exited", "", {}, log='{"host":"h1"}', job_log="/l")
    (_, fields), = Decoder().feed(frame)
    end = End(fields)
    assert (end.log, end.job_log) == ('{"host":"h1"}', "/l")
    (_, fields), = Decoder().feed(End.frame(0, None, "h1", "exited", "", {}))
    assert (End(fields).log, End(fields).job_log) == (None, "")
    with pytest.raises(HandoffError, match="'log'"):
        End({**fields, "log": 3})


def test_the_hand_offs_endings_are_the_requests():
    """An ``E`` frame's endings are exactly request.Ending's values, in its order."""
    from offloadfs.request import Ending
    assert handoff.ENDINGS == tuple(e.value for e in Ending)


def test_fallback_after_a_hand_off_follows_its_ending(monkeypatch):
    """--fallback runs the command here only if the agent says the job never ran."""
    calls = []
    monkeypatch.setattr(offld.os, "execv", lambda *a: calls.append(a))
    say = offld.Reporter("offld", True, False)
    opts = types.SimpleNamespace(fallback="/bin/true")
    for ending in handoff.ENDINGS:
        end = End({"status": 255, "host": "h", "ending": ending, "error": "x",
                   "timings": {}})
        offld.fall_back(["true", "a"], opts, end, say)
    assert calls == [("/bin/true", ["true", "a"])]


@pytest.mark.parametrize("argv", [["--", "true"], ["make", "-j8", "--", "x"], ["--"],
                                  ["cc", "-o", "x"]])
def test_an_argv_without_options_parses_as_the_parser_would(argv):
    """offld's start without argparse (no option given) yields what the parser yields: every
    option's default (offld.DEFAULTS, the parser's too) and the command."""
    assert vars(offld.parse(argv)) == vars(offld.parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["-q", "true"], ["-Q", "--", "true"], ["--quiet", "-T", "cc", "-q"], ["-t", "-Q", "-q", "x"],
    ["--no-logging", "--", "--"], ["-T", "-Q", "--quiet", "--", "a", "-t"]])
def test_leading_flags_parse_as_the_parser_would(argv):
    """offld's start without argparse also reads its value-less flags (offld.FLAGS), as the
    parser does."""
    fast = offld.parse(argv)
    assert type(fast).__name__ == "SimpleNamespace"
    assert vars(fast) == vars(offld.parser().parse_args(argv))


@pytest.mark.parametrize("argv", [["-q", "-q", "x"], ["-t", "-T", "x"], ["-q"], ["-qQ", "x"],
                                  ["--qui", "x"], ["-q", "-H", "h", "x"], ["-Q", "-"]])
def test_other_flag_uses_are_the_parsers(argv):
    """A flag given twice, combined, abbreviated, followed by another option or by no
    command is the parser's to read (its errors and all)."""
    try:
        expected = vars(offld.parser().parse_args(argv))
    except SystemExit:
        expected = SystemExit
    try:
        got = offld.parse(argv)
    except SystemExit:
        got = SystemExit
    else:
        assert type(got).__name__ == "Namespace"
        got = vars(got)
    assert got == expected


def test_options_still_go_through_the_parser():
    """An argv with an option is the parser's, errors and all."""
    opts = offld.parse(["-q", "-t", "--", "true"])
    assert (opts.quiet, opts.tty, opts.command) == (True, "force", ["--", "true"])
    with pytest.raises(SystemExit):
        offld.parse(["-t", "-T", "true"])
