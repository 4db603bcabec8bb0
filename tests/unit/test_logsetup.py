"""offloadfs.logsetup: the journal's priority prefixes, the plain format, and telling the
journal's stream from any other."""
from __future__ import annotations

import logging
import os
import sys

import pytest

from offloadfs import logsetup
from offloadfs.settings import ConfigError


def record(level: int, text: str, exc_info=None) -> logging.LogRecord:
    """A log record of the offloadd logger."""
    return logging.LogRecord("offloadd", level, __file__, 1, text, (), exc_info)


@pytest.mark.parametrize("level, prio", [(logging.CRITICAL, 2), (logging.ERROR, 3),
                                         (logging.WARNING, 4), (logging.INFO, 6),
                                         (logging.DEBUG, 7), (logging.WARNING + 5, 4),
                                         (5, 7)])
def test_priorities_are_sd_daemons(level, prio):
    """Each level has sd-daemon(3)'s priority; a level in between takes the lower one's."""
    assert logsetup.priority(level) == prio


def test_journal_lines_carry_the_priority_and_no_time_or_level_name():
    """On the journal: <4>message, nothing else."""
    fmt = logsetup.formatter("offloadd", journal=True, timestamps=True)
    assert fmt.format(record(logging.WARNING, "refused job 1")) == "<4>refused job 1"


def test_every_line_of_a_traceback_keeps_the_priority():
    """A traceback's lines are one record: each line is marked, or journald files them as
    info."""
    try:
        raise ValueError("boom")
    except ValueError:
        text = logsetup.formatter("offloadd", journal=True, timestamps=False).format(
            record(logging.ERROR, "internal error", sys.exc_info()))
    lines = text.splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>internal error" and lines[-1] == "<3>ValueError: boom"


def test_plain_lines_name_the_program_and_level():
    """Elsewhere: offloadd: LEVEL message, the time first only when asked."""
    plain = logsetup.formatter("offloadd", journal=False, timestamps=False)
    assert plain.format(record(logging.INFO, "listening")) == "offloadd: INFO listening"
    stamped = logsetup.formatter("offloadfs", journal=False, timestamps=True)
    assert stamped.format(record(logging.INFO, "up")).endswith(" offloadfs: INFO up")
    assert stamped.format(record(logging.INFO, "up"))[:4].isdigit()


def test_the_journal_is_the_stream_journal_stream_names():
    """$JOURNAL_STREAM names one stream by device and inode: that one only; garbage or
    nothing is no journal."""
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        st = os.fstat(w)
        named = f"{st.st_dev}:{st.st_ino}"
        assert logsetup.is_journal(w, named)
        assert not logsetup.is_journal(other_w, named)
        for value in (None, "", "garbage", f"{st.st_dev}", f"x:{st.st_ino}"):
            assert not logsetup.is_journal(w, value)
        assert not logsetup.is_journal(9999, named)   # not open
    finally:
        for fd in (r, w, other_r, other_w):
            os.close(fd)


def test_error_lines_are_marked_only_on_the_journal(monkeypatch):
    """A program's last one-line error gets <3> on the journal, and stays as it is elsewhere."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logsetup.error_line("offloadd: x: No such file") == "<3>offloadd: x: No such file"
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert logsetup.error_line("offloadd: x") == "offloadd: x"


def test_a_log_file_gets_stamped_lines_and_an_unusable_one_a_config_error(tmp_path):
    """--log FILE: lines with the time, whatever stderr is; a file that cannot be opened is a
    one-line ConfigError."""
    to_file = logsetup.handler("offloadfs", str(tmp_path / "m.log"))
    try:
        to_file.handle(record(logging.INFO, "mounted"))
    finally:
        to_file.close()
    text = (tmp_path / "m.log").read_text()
    assert text.endswith(" offloadfs: INFO mounted\n") and text[:4].isdigit()
    with pytest.raises(ConfigError, match="No such file or directory"):
        logsetup.handler("offloadfs", str(tmp_path / "no" / "m.log"))


def test_stderr_lines_follow_the_journal(monkeypatch):
    """On stderr: the journal's format when $JOURNAL_STREAM names stderr, else the plain one
    (timestamps only where asked and not on the journal)."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    on = logsetup.handler("nfsfuse", timestamps=True).format(record(logging.ERROR, "x"))
    monkeypatch.delenv("JOURNAL_STREAM")
    off = logsetup.handler("nfsfuse").format(record(logging.ERROR, "x"))
    assert (on, off) == ("<3>x", "nfsfuse: ERROR x")


def test_what_a_peer_sent_stays_on_one_line():
    """A newline or other control character in a peer's text cannot forge a log line."""
    assert logsetup.printable("ls\n<3>offloadd: ERROR forged\x1b[2J") == \
        "ls?<3>offloadd: ERROR forged?[2J"
    assert logsetup.printable("x" * 500, 80) == "x" * 80
