"""``offloadfs status`` and ``offloadd status``: ask hosts for slots, queue and recent jobs.

Runs on the caller's thread with its own short-lived ZeroMQ context.
"""
from __future__ import annotations

import json
import os

import zmq

from . import mountinfo, protocol
from .channel import Channel, OffloadError
from .protocol import Message


def fetch(endpoint: str, timeout: float, keys=None, origin: str = "") -> Message:
    """The status-reply of the daemon or broker at ``endpoint`` (which came from ``origin``,
    see ``reach.origin``), or OffloadError."""
    ctx = zmq.Context()
    channel = Channel(ctx, endpoint, keys, origin)
    try:
        return channel.ask(protocol.encode("status"), "status-reply", timeout)
    finally:
        channel.close()
        ctx.term()


def host_lines(endpoint: str, msg: Message) -> list[str]:
    """A host's summary: address, slots in use, queue, counts, commands, tags."""
    tags = ",".join(msg.get("tags", [])) or "-"
    return [f"{msg['host']} ({endpoint}): {msg['busy']}/{msg['slots']} slots busy, "
            f"{msg['queued']} queued, {msg.get('done', 0)} done, {msg.get('failed', 0)} failed, "
            f"tags {tags}",
            "  commands: " + (" ".join(msg.get("commands", [])) or "(none)")]


def job_lines(jobs: list[dict], last: int = 10) -> list[str]:
    """Recent jobs, newest last: where, status, why, stage timings in ms."""
    lines = []
    for job in jobs[-last:]:
        stages = " ".join(f"{k} {float(job[k]) * 1000:.1f}" for k in protocol.STAGES if k in job)
        where = job.get("where") or job.get("host") or ""
        why = f" ({job['why']})" if job.get("why") else ""
        lines.append(f"  {job.get('command', '?')!s:<12} status {job.get('status', '?')!s:>3} "
                     f"on {where}{why} {stages + ' ms' if stages else ''}".rstrip())
    return lines


def mounted() -> list[str]:
    """Mount points of the offloadfs filesystems this machine has."""
    return mountinfo.offloadfs_mounts()


def mount_lines(mnt: str) -> list[str]:
    """A mount's hosts (state, slots, queue, commands) and its last jobs."""
    try:
        data = json.loads(os.getxattr(mnt, "user.offload.status"))
    except (OSError, ValueError) as exc:
        return [f"mount {mnt}: no status ({exc})"]
    lines = [f"mount {mnt}:"]
    if "shims" in data:
        lines.append("  shims: " + ("the compiled program" if data["shims"] == "program"
                                    else "sh scripts"))
    for h in data.get("hosts", []):
        lines.append(f"  host {h['host']} ({h['endpoint']}): {h['state']}, "
                     f"{h.get('busy', '?')}/{h.get('slots', '?')} slots busy, "
                     f"{h.get('queued', '?')} queued, {h['in_flight']} of ours in flight")
        lines.append("    commands: " + (" ".join(h["commands"]) or "(none)"))
    lines.append("  last jobs:")
    return lines + (job_lines(data.get("jobs", [])) or ["    (none)"])


def report(endpoints: dict[str, str], timeout: float, keys=None) -> tuple[list[str], list[str]]:
    """Status lines for every endpoint (each with where it came from; asked with CURVE
    ``keys`` if given), and one error line for each that did not answer."""
    lines, errors = [], []
    for endpoint, origin in endpoints.items():
        try:
            msg = fetch(endpoint, timeout, keys, origin)
        except OffloadError as exc:
            errors.append(exc.args[0])   # the line names the host; no job was involved
            continue
        rows = msg.get("jobs", [])
        hosts = [r for r in rows if "slots" in r]   # a broker lists its hosts
        lines += host_lines(endpoint, msg) + broker_host_lines(hosts) + \
            job_lines([r for r in rows if "slots" not in r])
    return lines, errors


def broker_host_lines(hosts: list[dict]) -> list[str]:
    """A broker's live hosts: name, slots in use, commands, tags."""
    return [f"  host {h.get('host')}: {h.get('busy')}/{h.get('slots')} slots busy, tags "
            f"{h.get('tags') or '-'}; commands: {h.get('commands') or '(none)'}" for h in hosts]
