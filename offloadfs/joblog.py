"""The job log: one JSON line per job, with host, command, status and stage timings."""
from __future__ import annotations

import os


def entry(command: list[str], outcome, cwd: str | None = None) -> dict:
    """The log record of one finished job run in ``cwd`` (default: ours)."""
    import datetime  # here: offld loads this module, and the line is made by the agent
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "host": outcome.host,
        "command": command,
        "cwd": os.getcwd() if cwd is None else cwd,
        "status": outcome.status,
        "error": str(outcome.error) if outcome.error else None,
        "timings": {k: round(v, 6) for k, v in outcome.timings.items()},
    }


def line(command: list[str], outcome, cwd: str | None = None) -> str:
    """The log line (without its newline) of one finished job: :func:`entry` as JSON."""
    import json
    return json.dumps(entry(command, outcome, cwd), ensure_ascii=False, default=str)


def append(path: str, command: list[str], outcome) -> None:
    """Append one record; a log that cannot be written never fails the job."""
    write(path, line(command, outcome))


def write(path: str, text: str) -> None:
    """Append the log line ``text`` to ``path``, making its directory; a log that cannot be
    written never fails the job. offld writes what the mount's agent made this way; a
    leading ~ is the caller's home (the config may say ``job_log = "~/jobs.jsonl"``)."""
    path = os.path.expanduser(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text + "\n")
    except OSError:
        pass


def read(path: str, last: int = 20) -> list[dict]:
    """The last ``last`` records of the log (unreadable lines are skipped)."""
    import json
    try:
        with open(os.path.expanduser(path), encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()[-last:]
    except OSError:
        return []
    out = []
    for text in lines:
        try:
            out.append(json.loads(text))
        except ValueError:
            continue
    return out
