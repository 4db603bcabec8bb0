"""The session leader of a job that has a terminal: ``python3 -I -S ptyleader.py ...``.

offloadd (``runner.Process``) starts this program, as the job's user and confined like any job,
in a new session whose controlling terminal is the job's pty. It forks the job into a process
group of its own and stays beside it, because only a process of the session may say which group
is the terminal's foreground (``tcsetpgrp``): the job runs in the foreground while the caller's
shell has it there, and in the background otherwise, so that reading the terminal stops it with
SIGTTIN exactly as at a local terminal. The job's group is not orphaned (its parent, this
program, is in the same session and another group), so SIGTSTP, SIGTTIN and SIGTTOU stop it.

argv: REPORT_FD CONTROL_FD FOREGROUND(0|1) PATH ARGV0 [ARGS...]

Report pipe, one line each (to offloadd): ``pid N START`` once the job is forked (START: its
start time, /proc/N/stat field 22, for offloadd's job record), ``stop SIG`` when it stopped,
``cont`` when it continued. Control pipe, one line each (from offloadd): ``fg`` or ``bg`` (give
the job the terminal's fore- or background, then SIGCONT its group). End of the control pipe
means offloadd is gone: the job is killed rather than left unsupervised. So does SIGTERM, which
is also this program's parent death signal (offloadd sets it in the preexec; SIGKILL would
kill this program before it could kill the job): with offloadd killed by SIGKILL both come at
once, and whichever is seen first kills the job's group. SIGTERM is blocked across the fork, so
that the handler always knows the job's pid. This program exits with the job's status, or
dies of the job's signal, so offloadd's wait4 sees the job's own ending (and its resource
usage: wait4 counts the children this program waited for).

Only builtin modules, no site: it starts in a few milliseconds, once per terminal job.
"""
import os
import resource
import select
import signal
import sys

QUIET = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
         signal.SIGHUP)


def main(argv):
    """Fork the job, follow it, relay control lines; exit as it did."""
    report, control, foreground = int(argv[1]), int(argv[2]), argv[3] == "1"
    path, args = argv[4], argv[5:]
    for signum in QUIET:
        signal.signal(signum, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, _die_with_job)
    tty = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    pid = os.fork()
    if pid == 0:
        _exec_job(tty, foreground, path, args)
    JOB.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    _group(pid, tty, foreground)
    _say(report, f"pid {pid} {_start_time(pid)}")
    watched = [control, wake_r]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if wake_r in ready:
            _drain(wake_r)
            ended = _follow(pid, report)
            if ended is not None:
                _end_as(ended)
        if control in ready and not _obey(control, pid, tty):
            watched.remove(control)
            _killpg(pid, signal.SIGKILL)


JOB = []   # the job's pid, once forked (for the SIGTERM handler)


def _die_with_job(signum, frame):
    """SIGTERM (offloadd died: the parent death signal, or someone's kill): kill the job's group
    (and the job itself, in case it has not made its group yet), then die of SIGTERM."""
    for pid in JOB:
        _killpg(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)


def _start_time(pid):
    """The start time of ``pid`` (clock ticks since boot), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _exec_job(tty, foreground, path, args):
    """In the child: own group, the terminal's foreground if asked, default signals, exec."""
    try:
        os.setpgid(0, 0)
        if foreground:
            os.tcsetpgrp(tty, os.getpgrp())   # SIGTTOU is still ignored here
        signal.set_wakeup_fd(-1)
        for signum in QUIET + (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        os.execv(path, args)
    except OSError as exc:
        os.write(2, f"offloadd: cannot run {path}: {exc.strerror}\n".encode())
    os._exit(127)


def _group(pid, tty, foreground):
    """In the parent too (whichever runs first): the job's group, and the foreground."""
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass                                  # the child did it already, or has exec'd
    if foreground:
        try:
            os.tcsetpgrp(tty, pid)
        except OSError:
            pass


def _follow(pid, report):
    """Report the job's stops and continues; its wait status once it ended, else None."""
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
        except ChildProcessError:
            return 255 << 8
        if got == 0:
            return None
        if os.WIFSTOPPED(status):
            _say(report, f"stop {os.WSTOPSIG(status)}")
        elif os.WIFCONTINUED(status):
            _say(report, "cont")
        else:
            return status


def _obey(control, pid, tty):
    """Carry out the control lines waiting; False once offloadd has gone."""
    data = os.read(control, 4096)
    if not data:
        return False
    for line in data.split(b"\n"):
        if line in (b"fg", b"bg"):
            try:
                os.tcsetpgrp(tty, pid if line == b"fg" else os.getpgrp())
            except OSError:
                pass
            _killpg(pid, signal.SIGCONT)
    return True


def _killpg(pgid, signum):
    """killpg that ignores a group already gone."""
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass


def _say(fd, line):
    """One report line (offloadd reads them as they come)."""
    try:
        os.write(fd, line.encode() + b"\n")
    except OSError:
        pass


def _drain(fd):
    """Empty the wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _end_as(status):
    """Exit with the job's status, or die of its signal (without a core of our own)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main(sys.argv)
