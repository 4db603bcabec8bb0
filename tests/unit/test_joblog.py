"""The job log's rules without a job: its line, where it goes, what is read back."""
from __future__ import annotations

import json
import types

from offloadfs import joblog


def outcome(**kw):
    """What joblog reads of a job's outcome (or of an end frame)."""
    return types.SimpleNamespace(**{"host": "h1", "status": 0, "error": None,
                                    "timings": {"run": 0.0012345678}, **kw})


def test_a_line_is_one_json_record_with_the_callers_cwd():
    """The line names the command, the cwd given (the agent's view of the caller's), the
    status, the error and rounded timings; bytes that are not UTF-8 come back as they were."""
    line = joblog.line(["cat", "x\udcff"], outcome(status=3, error="boom"), "/w/d")
    record = json.loads(line)
    assert "\n" not in line
    assert (record["command"], record["cwd"], record["status"], record["error"]) == \
        (["cat", "x\udcff"], "/w/d", 3, "boom")
    assert record["timings"] == {"run": 0.001235} and record["host"] == "h1"


def test_a_tilde_is_the_callers_home_and_the_log_reads_back(tmp_path, monkeypatch):
    """``job_log = "~/..."`` writes under $HOME (not a directory named ~ in the cwd), and the
    same path reads the records back, newest last."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for status in (0, 1):
        joblog.append("~/state/jobs.jsonl", ["true"], outcome(status=status))
    assert not (tmp_path / "~").exists()
    assert (tmp_path / "home" / "state" / "jobs.jsonl").exists()
    assert [r["status"] for r in joblog.read("~/state/jobs.jsonl")] == [0, 1]


def test_a_log_that_cannot_be_written_is_no_error(tmp_path):
    """A job log under a file (not a directory) is skipped silently: the job's status stands."""
    (tmp_path / "file").write_text("")
    joblog.write(str(tmp_path / "file" / "jobs.jsonl"), "{}")
    assert joblog.read(str(tmp_path / "file" / "jobs.jsonl")) == []
