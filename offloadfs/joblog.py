"""The job log: one JSON line per job, with host, command, status and stage timings."""
from __future__ import annotations

import datetime
import json
import os


def entry(command: list[str], outcome) -> dict:
    """The log record of one finished job."""
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "host": outcome.host,
        "command": command,
        "cwd": os.getcwd(),
        "status": outcome.status,
        "error": str(outcome.error) if outcome.error else None,
        "timings": {k: round(v, 6) for k, v in outcome.timings.items()},
    }


def append(path: str, command: list[str], outcome) -> None:
    """Append one record; a log that cannot be written never fails the job."""
    line = json.dumps(entry(command, outcome), ensure_ascii=False, default=str) + "\n"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(line)
    except OSError:
        pass


def read(path: str, last: int = 20) -> list[dict]:
    """The last ``last`` records of the log (unreadable lines are skipped)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()[-last:]
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
