"""``offld`` (and ``offloadfs run``): run one command on a compute host as if it ran here.

:func:`main` parses the thesis's options. With an offloadfs mount present (and no option only
offld itself can honour: ``handoff.reason_not``), :func:`hand_off` gives the job to the mount's
agent over its local socket: this process's stdio, identity (from the kernel), cwd and
environment (from /proc) go with it, and the agent's end frame says how to exit. Otherwise
``direct.run`` connects to a host itself over ZeroMQ. Either way, errors of the offload itself
print one ``offld: ...`` line and exit 255, and ``--fallback`` runs the command here when
nothing ran remotely. This module imports the standard library and ``handoff`` only: the
direct path's modules load when it is taken.
"""
from __future__ import annotations

import _signal  # signal's C half (the module's enums cost each start ms: see handoff)
import os
import sys

from . import handoff, mountinfo, settings
from .settings import DEFAULT_PORT, ConfigError

OFFLOAD_ERROR = 255
# What every option is when none is given: the parser's defaults (it sets them from here), and
# what offld uses without building the parser when its argv has no option at all.
DEFAULTS = {"config": None, "profile": False, "host": None, "load_balancer": None,
            "no_mount": False, "output": None, "no_logging": False, "quiet": False,
            "debug": False, "tty": "auto", "fallback": None}


def parser(prog: str = "offld"):
    """The thesis's options, ``--`` ending them (an argparse.ArgumentParser)."""
    import argparse  # here: offld CMD, without options, needs no parser (parse)

    from .commandline import add_version
    p = argparse.ArgumentParser(prog=prog, description="Run COMMAND on a compute host.",
                                usage=f"{prog} [options] [--] COMMAND [ARGS...]")
    p.add_argument("-c", "--config", metavar="FILE", help="read settings from FILE")
    p.add_argument("-p", "--profile", action="store_true", help="print the time of each stage")
    p.add_argument("-H", "--host", metavar="HOST[:PORT]", action="append",
                   help=f"run the job on this host (port {DEFAULT_PORT}); repeat to try several")
    p.add_argument("-L", "--load-balancer", metavar="BROKER[:PORT]", action="append",
                   help="ask this broker for a host; repeat to try several")
    p.add_argument("-n", "--no-mount", action="store_true",
                   help="no shared tree: send the files the arguments name, get back the "
                   "files the job creates or changes")
    p.add_argument("-o", "--output", metavar="FILE", help="write the job's stdout to FILE")
    p.add_argument("-Q", "--no-logging", action="store_true", help="write no job log entry")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing of its own "
                   "but a fatal error")
    p.add_argument("-d", "--debug", action="store_true", help="print debug messages")
    tty = p.add_mutually_exclusive_group()
    tty.add_argument("-t", dest="tty", action="store_const", const="force", default="auto",
                     help="give the job a terminal on the host even if ours is not one")
    tty.add_argument("-T", dest="tty", action="store_const", const="never",
                     help="no terminal on the host (pipes), even at a terminal")
    p.add_argument("--fallback", metavar="PATH", help="if no host took the job (so nothing "
                   "ran), run PATH here instead, with the same arguments")
    add_version(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    p.set_defaults(**DEFAULTS)
    return p


# The options offld reads without the parser: flags without a value, each spelled whole and
# given once (``offld -q CMD``); test_handoff checks each against the parser.
FLAGS = {"-q": ("quiet", True), "--quiet": ("quiet", True), "-Q": ("no_logging", True),
         "--no-logging": ("no_logging", True), "-t": ("tty", "force"), "-T": ("tty", "never")}


def parse(argv: list[str], prog: str = "offld"):
    """The options of ``argv``: :data:`DEFAULTS`, its leading :data:`FLAGS` and the command
    when it has no other option (``offld CMD ...``, ``offld -q -- CMD ...``: argparse and
    what it imports cost ms of each start, more than the job), else the parser's."""
    fields, i = dict(DEFAULTS), 0
    while i < len(argv) and argv[i] in FLAGS and fields[FLAGS[argv[i]][0]] == \
            DEFAULTS[FLAGS[argv[i]][0]]:
        dest, value = FLAGS[argv[i]]
        fields[dest], i = value, i + 1
    rest = argv[i:]
    if rest and (rest[0] == "--" or not rest[0].startswith("-")):
        import types
        return types.SimpleNamespace(**fields, command=list(rest))
    return parser(prog).parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "offld") -> int:
    """Entry point of ``offld``."""
    opts = parse(sys.argv[1:] if argv is None else argv, prog)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        print(f"{prog}: no command given (try {prog} -h)", file=sys.stderr)
        return 2
    say = Reporter(prog, opts.quiet, opts.debug or os.environ.get("OFFLOADFS_DEBUG") == "1")
    try:
        why = handoff.reason_not(opts, command)
        status = hand_off(command, opts, say) if why is None else None
        if status is not None:
            return status
        if why is not None:
            say.debug(f"not through a mount's agent ({why}): connecting myself")
        from . import direct
        try:
            return direct.run(command, opts, say)
        except direct.OffloadError as exc:
            fall_back(command, opts, exc, say)
            say.error(str(exc))
            return OFFLOAD_ERROR
    except ConfigError as exc:
        say.error(str(exc))
        return OFFLOAD_ERROR


def fall_back(command: list[str], opts, error, say: Reporter) -> None:
    """With --fallback, replace this process by the local command when nothing ran remotely
    (and the caller did not give up on it: a Ctrl-C before the start is no reason to run it).
    ``error`` is an OffloadError (``request.ending`` says) or a hand-off's ``handoff.End``."""
    if not opts.fallback:
        return
    if isinstance(error, handoff.End):
        never = error.ending == "never ran"
    else:
        from . import request
        never = request.ending(error) is request.Ending.NEVER_RAN
    if not never:
        return
    say.debug(f"{error}; running {opts.fallback} here")
    try:
        os.execv(opts.fallback, [command[0]] + command[1:])
    except OSError as exc:
        say.error(f"{opts.fallback}: {exc.strerror}")


class Reporter:
    """Prints the client's own lines on stderr: errors always, the rest unless quiet."""

    def __init__(self, prog: str, quiet: bool, debug: bool):
        """Remember how talkative to be."""
        self.prog, self.quiet, self.debugging = prog, quiet, debug and not quiet
        self.place = ""   # where the job waits for a slot (notice.place), once connected

    def error(self, text: str) -> None:
        """One line for a fatal error of the offload."""
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    def info(self, text: str) -> None:
        """A line unless quiet."""
        if not self.quiet:
            print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    def debug(self, text: str) -> None:
        """A line with -d only."""
        if self.debugging:
            print(f"{self.prog}: debug: {text}", file=sys.stderr, flush=True)

    def notice(self):
        """The queue notice on stderr: at a terminal only, never when quiet, and not with -d
        (its debug lines say each position, and would run into the notice's line)."""
        from . import notice
        return notice.at_terminal(sys.stderr.fileno(), self.prog, self.place,
                                  self.quiet or self.debugging)


def hand_off(command: list[str], opts, say: Reporter) -> int | None:
    """Run the job through the agent of the offloadfs mount on PATH (else the first one);
    its exit status, or None when no mount's agent takes it (then offld connects itself)."""
    owners = mountinfo.offloadfs_owners()
    mnt = handoff.choose_mount(os.environ.get("PATH", ""), owners, os.getuid())
    if mnt is None:
        return None
    try:
        sock = handoff.connect(handoff.address(mnt))
    except OSError as exc:
        say.debug(f"the mount {mnt} takes no hand-off ({exc.strerror}): connecting myself")
        return None
    try:
        _, uid, _ = handoff.peer(sock)
        if uid != owners[mnt]:
            say.debug(f"the hand-off socket of {mnt} belongs to uid {uid}, not to the "
                      f"mount's owner: connecting myself")
            return None
        end = _handed(sock, command, opts, _output_fd(opts.output), mnt, say)
    finally:
        sock.close()
    if end is None:
        return None
    if end.error:
        fall_back(command, opts, end, say)
        say.error(end.error)
    if not opts.no_logging:
        log_handed(command, end, say)
    return end.status


def log_handed(command: list[str], end: handoff.End, say: Reporter) -> None:
    """The job log's entry of a handed-off job: the line the agent made, in the file the
    mount's config names (else ours, $XDG_STATE_HOME's); without one (the agent refused the
    job before reading it), our own line in the file our config names."""
    from . import joblog
    if end.log is not None:
        joblog.write(end.job_log or settings.job_log_of({}), end.log)
        return
    try:
        joblog.append(job_log(), command, end)
    except ConfigError as exc:   # the job is over: its log entry is not worth its status
        say.debug(f"no job log entry: {exc}")


def _handed(sock, command: list[str], opts, out_fd: int, mnt: str, say: Reporter):
    """Send the job with our stdio, then follow the agent's frames to the end (None if the
    job could not be sent: offld then connects itself); the forwarded signals stay blocked
    meanwhile (pending: the agent sees them in /proc and forwards them). A stop suspends us
    as the job did; a mount gone mid-job restores the terminal."""
    blocked = set(handoff.RELAYED)
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, blocked)
    saved = _terminal_settings((0, out_fd, 2))
    try:
        try:
            handoff.send(sock, handoff.Job.frame(command, opts.tty, opts.quiet), (0, out_fd, 2))
        except (OSError, handoff.HandoffError) as exc:   # not sent: nothing can have run
            say.debug(f"the hand-off to {mnt} failed ({exc}): connecting myself")
            return None
        reader = handoff.Reader(sock)
        while (frame := reader.next()) is not None:
            kind, fields = frame
            if kind == handoff.END:
                return handoff.End(fields)
            if kind != handoff.STOP:
                raise handoff.HandoffError(f"a {kind.decode()} frame from the agent")
            handoff.suspend(handoff.stop_signal(fields))
            handoff.send(sock, handoff.encode(handoff.CONTINUED))
        why = "the offloadfs mount went away"
    except (OSError, handoff.HandoffError) as exc:
        why = f"the offloadfs mount's agent failed: {exc}"
    finally:
        _drop_pending(blocked)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)
    _restore_terminal(saved)
    return handoff.End({"status": OFFLOAD_ERROR, "host": mnt, "ending": "may have run",
                        "error": f"{why} while the job ran; the job may have run, its "
                        f"outcome is unknown", "timings": {}})


def _drop_pending(signals: set) -> None:
    """Take the blocked signals still pending (the agent forwarded them to the job), so that
    unblocking them does not act on them here again."""
    while signals and _signal.sigtimedwait(signals, 0) is not None:
        pass


def _terminal_settings(fds: tuple[int, ...]) -> list:
    """(fd, settings) of each terminal among ``fds``: put back if the mount dies mid-job."""
    ttys = [fd for fd in dict.fromkeys(fds) if os.isatty(fd)]
    if not ttys:
        return []
    import termios
    saved = []
    for fd in ttys:
        try:
            saved.append((fd, termios.tcgetattr(fd)))
        except termios.error:
            pass
    return saved


def _restore_terminal(saved: list) -> None:
    """Put back what :func:`_terminal_settings` read (the agent may have left it raw)."""
    import termios
    for fd, attrs in saved:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
        except termios.error:
            pass


def job_log() -> str:
    """Where this run's job log entry goes: the VM's config's ``job_log`` (the file is read,
    not loaded whole: the mount's agent, which holds the rest of it, checked it at its start)."""
    return settings.job_log_of(settings.load_toml(None, settings.CLIENT_CONFIG))


def _output_fd(path: str | None) -> int:
    """The fd for the job's stdout: -o FILE or our own stdout."""
    if not path:
        return 1
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def __getattr__(name: str):
    """The direct path's names (``offld.endpoints``, ``offld.brokers``, ...), loaded when
    asked for: importing offld must not load them."""
    if name.startswith("__"):
        raise AttributeError(name)
    from . import direct
    try:
        return getattr(direct, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def entry() -> None:
    """Console-script entry point of ``offld``: exits at once when done. The interpreter's
    teardown would cost each run some ms for nothing: the job's output went out with
    os.write, our own lines are flushed here, and every socket and thread is closed."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
