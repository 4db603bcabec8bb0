"""No job outlives offloadd unsupervised: the job records, the start-up sweep and the warden.

A job's leader dies with offloadd (``PR_SET_PDEATHSIG``, set in its preexec: see
``runner._confiner``), but what the job started (``sh -c 'cmd &'``) is in the job's process
group, not a child of offloadd, and would live on. So offloadd keeps one small file per running
job in its state directory (``[serve] state_dir``): the process groups of the job, each with
its leader's start time (``/proc/PID/stat`` field 22, clock ticks since boot) so that a reused
pid is never taken for the job. Two parties read the records:

* the **warden**, a small process offloadd starts beside itself (``python3 -I -S warden.py
  STATE_DIR PID START``, builtin modules only). Its stdin is a pipe whose write end only
  offloadd holds: end of file there means offloadd is gone, whatever killed it (``kill -9``
  too). It then kills the groups of that offloadd's records and removes them;
* **offloadd at start**: a warden may have died with it (``kill -9`` of both, the OOM killer):
  before it binds its socket the new daemon kills the groups of every record left by an
  offloadd that no longer runs, waits (bounded) until they are gone, and removes the records.
  So a restarted daemon never runs more jobs than its slots next to leftovers.

A daemon's records are the fixed slots of one file named after their owner (the daemon's pid
and start time), so that daemons sharing a directory (tests, several instances) never touch
each other's jobs; a record carries the boot id, so that one from before a reboot never kills
anything.

A group is killed only if its leader still runs with the recorded start time, or if the leader
is gone and the group still has members: Linux does not reuse a pid while a process group of
that id exists, so those members can only be the job's. A pid that runs with another start
time was reused: nothing is killed.

File ``DPID.DSTART``: slots of ``SLOT`` bytes, each written whole by one ``pwrite`` (a job's
start and end cost a write each, not a file made, renamed and removed); a slot never straddles
a page, so a daemon killed at any moment leaves each slot either as it was or as it became.
A free slot is newlines; a used one::

    boot BOOT-ID
    job JOB-ID TEXT
    group PGID START        (one line per group: the leader's, then the job's for a terminal)

The sweep also reads the files of earlier versions, one record each, named
``DPID.DSTART.PID.START`` (written as ``.NAME.tmp``, then renamed).
"""
import os
import signal
import sys
import time

PREFIX = "offloadd: "
SLOT = 512          # bytes per record; a page holds a whole number of them
JOB_TEXT = 200      # characters of a job's text kept in its record (printable ASCII)


def start_time(pid):
    """The start time of ``pid`` (clock ticks since boot), or None if there is no such process."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_id():
    """This boot's id (records from another boot are void)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def usable(state_dir):
    """Make ``state_dir`` (0700) if needed; None if it is fit for records (ours, not writable
    by others: a record makes us kill process groups), else why not."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        st = os.stat(state_dir)
    except OSError as exc:
        return f"cannot make {state_dir}: {exc.strerror}"
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return (f"{state_dir} is not this user's alone (owner {st.st_uid}, mode "
                f"{st.st_mode & 0o777:o})")
    return None


class Records:
    """The records of one daemon's running jobs, slots of its file (made at the first job);
    its loop thread calls these."""

    def __init__(self, state_dir, warn):
        """Records in ``state_dir``, owned by this process; ``warn(text)`` on a failed write."""
        self.dir = state_dir
        self.owner = f"{os.getpid()}.{start_time(os.getpid())}"
        self.path = os.path.join(state_dir, self.owner)
        self.boot = boot_id()
        self.warn = warn
        self.jobs = {}      # name: [job text, groups, slot]
        self.free = []      # slots of ended jobs, taken again first
        self.slots = 0      # slots the file has
        self.fd = -1

    def add(self, job, groups):
        """Record a job (``job``: a line of text) whose groups are ``groups`` [(pgid, start)];
        its name, or None if it could not be written."""
        name = f"{groups[0][0]}.{groups[0][1]}"
        job = job[:JOB_TEXT]
        if not (job.isprintable() and job.isascii()):
            job = "".join(c if c.isprintable() and c.isascii() else "?" for c in job)
        if self.fd < 0 and not self._open():
            return None
        slot = self.free.pop() if self.free else self.slots
        self.slots = max(self.slots, slot + 1)
        self.jobs[name] = [job, list(groups), slot]
        if self._write(slot, self._text(name)):
            return name
        del self.jobs[name]
        self.free.append(slot)
        return None

    def add_group(self, name, pgid, start):
        """The job (a terminal's) has a group of its own as well."""
        if name in self.jobs:
            self.jobs[name][1].append((pgid, start))
            self._write(self.jobs[name][2], self._text(name))

    def remove(self, name):
        """The job is reaped: forget it (its slot is free again)."""
        record = self.jobs.pop(name, None)
        if record is not None:
            self._write(record[2], b"")
            self.free.append(record[2])

    def close(self):
        """Every job is gone: remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _open(self):
        """Make this daemon's file; True if it worked."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC |
                              os.O_NOFOLLOW, 0o600)
            return True
        except OSError as exc:
            self._failed(exc)
            return False

    def _text(self, name):
        """The record of job ``name``, as its slot holds it."""
        job, groups, _ = self.jobs[name]
        return (f"boot {self.boot}\njob {job}\n" +
                "".join(f"group {g} {s}\n" for g, s in groups)).encode()[:SLOT]

    def _write(self, slot, text):
        """Write one whole slot (``text``, newlines after it); True if it worked."""
        try:
            os.pwrite(self.fd, text.ljust(SLOT, b"\n"), slot * SLOT)
            return True
        except OSError as exc:
            self._failed(exc)
            return False

    def _failed(self, exc):
        """Say that a record could not be kept."""
        self.warn(f"cannot write job records in {self.path}: {exc.strerror}; if offloadd is "
                  f"killed, what its jobs leave behind may keep running")


def owner_of(entry):
    """(daemon pid, start time) from a record file's name (``DPID.DSTART``, or an earlier
    version's ``DPID.DSTART.PID.START`` or its temporary), else None."""
    name = entry[1:-4] if entry.startswith(".") and entry.endswith(".tmp") else entry
    parts = name.split(".")
    if len(parts) not in (2, 4) or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def owner_runs(owner):
    """True if the daemon that wrote a record still runs (same pid, same start time)."""
    return start_time(owner[0]) == owner[1]


def sweep(state_dir, spare, say):
    """Kill the groups of every record in ``state_dir`` whose owner ``spare(owner)`` does not
    keep, remove those records, ``say(line)`` once per group killed; the pgids killed."""
    try:
        entries = sorted(os.listdir(state_dir))
    except OSError:
        return []
    boot, killed = boot_id(), []
    for entry in entries:
        owner = owner_of(entry)
        if owner is None or spare(owner):
            continue
        path = os.path.join(state_dir, entry)
        killed += _kill_record(path, owner, boot, say)
        try:
            os.unlink(path)
        except OSError:
            pass
    return killed


def _kill_record(path, owner, boot, say):
    """Kill what is left of the groups a record file names; the pgids killed."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    killed = []
    for fields, groups in records_in(text):
        if fields.get("boot") != boot:
            continue
        for pgid, start in groups:
            if pgid <= 1 or pgid == os.getpgrp() or not leftover(pgid, start):
                continue
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                continue
            killed.append(pgid)
            say(f"killed process group {pgid} of {fields.get('job', '?')}, left by offloadd "
                f"pid {owner[0]}")
    return killed


def records_in(text):
    """The records in a file's text: ({"boot": .., "job": ..}, [(pgid, start)]) each; a
    ``boot`` line begins one, free slots (blank lines) and bad lines are skipped."""
    found = []
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "boot":
            found.append(({"boot": rest}, []))
        elif not found or not rest:
            continue
        elif word == "job":
            found[-1][0]["job"] = rest
        elif word == "group":
            parts = rest.split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                found[-1][1].append((int(parts[0]), int(parts[1])))
    return found


def leftover(pgid, start):
    """True if group ``pgid`` is the recorded job's: its leader runs with the recorded start
    time, or the leader is gone and the group still has members."""
    now = start_time(pgid)
    if now is not None:
        return now == start
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def members(pgids):
    """Pids of processes (not zombies) in any of the groups ``pgids``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != b"Z" and int(rest[2]) in pgids:
            found.append(int(entry))
    return found


def wait_gone(pgids, timeout):
    """Wait (at most ``timeout`` seconds) until no process of ``pgids`` runs; the pids left."""
    deadline = time.monotonic() + timeout
    while True:
        left = members(set(pgids)) if pgids else []
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def main(argv):
    """The warden: wait for end of file on stdin (offloadd gone), then kill its jobs' groups."""
    state_dir, mine = argv[1], (int(argv[2]), int(argv[3]))
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)   # it ends when offloadd's pipe does
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    sweep(state_dir, lambda owner: owner != mine, _say)


def _say(line):
    """One line on stderr (offloadd's log) in offloadd's format."""
    try:
        os.write(2, f"{PREFIX}WARNING offloadd is gone: {line}\n".encode(errors="replace"))
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv)
