"""``offld`` (and ``offloadfs run``): run one command on a compute host as if it ran here.

Follow one job: :func:`main` parses the thesis's options, :func:`run` connects
(``client.connect``), builds the JobSpec from this process's argv, cwd, credentials and
environment, submits it (``jobrun.JobRun``), drives it (``client.ClientLoop``) and exits with
the job's status; errors of the offload itself print one ``offld: ...`` line and exit 255.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

import zmq

from . import (
    environ,
    export,
    joblog,
    mountinfo,
    notice,
    protocol,
    reach,
    request,
    staging,
    terminal,
)
from .channel import OffloadError
from .client import ClientLoop, connect
from .commandline import add_version
from .config import DEFAULT_PORT, ClientConfig, ConfigError, host_endpoint
from .jobrun import JobRun, JobSpec, Outcome

OFFLOAD_ERROR = 255


def parser(prog: str = "offld") -> argparse.ArgumentParser:
    """The thesis's options, ``--`` ending them."""
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
    return p


def main(argv: list[str] | None = None, prog: str = "offld") -> int:
    """Entry point of ``offld``."""
    opts = parser(prog).parse_args(argv)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        print(f"{prog}: no command given (try {prog} -h)", file=sys.stderr)
        return 2
    say = Reporter(prog, opts.quiet, opts.debug or os.environ.get("OFFLOADFS_DEBUG") == "1")
    try:
        return run(command, opts, say)
    except OffloadError as exc:
        fall_back(command, opts, exc, say)
        say.error(str(exc))
        return OFFLOAD_ERROR
    except ConfigError as exc:
        say.error(str(exc))
        return OFFLOAD_ERROR


def fall_back(command: list[str], opts, error: OffloadError, say: Reporter) -> None:
    """With --fallback, replace this process by the local command when nothing ran remotely
    (and the caller did not give up on it: a Ctrl-C before the start is no reason to run it)."""
    if not opts.fallback or request.ending(error) is not request.Ending.NEVER_RAN:
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
        return notice.at_terminal(sys.stderr.fileno(), self.prog, self.place,
                                  self.quiet or self.debugging)


def endpoints(opts, cfg: ClientConfig) -> dict[str, str]:
    """Where to send the job, in order, each with where it came from (``reach.origin``): -L
    brokers, then -H hosts, else the config's (or the default host)."""
    given = [(e, "-L") for e in getattr(opts, "load_balancer", None) or []] + \
        [(e, "-H") for e in opts.host or []]
    if given:
        return {host_endpoint(e): reach.origin(flag) for e, flag in given}
    kind = "file" if cfg.configured else "default"
    return {e: reach.origin(kind, cfg.path) for e in cfg.brokers + cfg.hosts}


def brokers(opts, cfg: ClientConfig) -> list[str]:
    """The endpoints of :func:`endpoints` that are brokers: -L's if -L or -H is given."""
    given = getattr(opts, "load_balancer", None) or []
    return [host_endpoint(e) for e in given] if given or opts.host else cfg.brokers


def spec_here(command: list[str], cfg: ClientConfig) -> JobSpec:
    """The job as this process would run it: its argv, cwd, credentials and environment."""
    env = environ.passing(dict(os.environb), list(environ.DEFAULT_PASS) + cfg.env_pass)
    return JobSpec(argv=[os.fsencode(a) for a in command], cwd=os.fsencode(os.getcwd()),
                   uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(), env=env,
                   tags=cfg.tags.get(os.path.basename(command[0]), []))


def run(command: list[str], opts, say: Reporter) -> int:
    """Connect, submit, relay, report; the job's exit status."""
    started = time.monotonic()
    age = process_age()
    cfg = ClientConfig.load(opts.config)
    out_fd = _output_fd(opts.output)
    ctx = zmq.Context()
    channel = None
    try:
        hosts = endpoints(opts, cfg)
        channel = connect(ctx, list(hosts), cfg.connect_timeout, say.debug, cfg.keys, hosts)
        connected = time.monotonic()
        say.place = notice.place(channel.endpoint, channel.endpoint in brokers(opts, cfg))
        spec = spec_here(command, cfg)
        if opts.no_mount:
            outcome = _drive(channel, spec, out_fd, cfg, say, opts.tty, stage(spec))
        else:
            with exported(cfg, say) as exp:
                spec.data = _descriptor(exp, spec)
                try:
                    outcome = _drive(channel, spec, out_fd, cfg, say, opts.tty)
                finally:
                    exp.finish(spec.data)
    finally:   # nothing is owed once the job ended: a last cancel gets a moment, no more
        if channel is not None:
            channel.close(linger=200)
        ctx.destroy(linger=0)
    outcome.timings["start"] = age
    outcome.timings["connect"] = connected - started
    outcome.timings["total"] = time.monotonic() - started + age
    _derive_drain(outcome.timings)
    _report(command, outcome, opts, cfg, say)
    return outcome.status


def stage(spec: JobSpec) -> tuple:
    """-n: send the files the argv names under the cwd; changed files come back here."""
    spec.argv, files = staging.plan(spec.argv, spec.cwd)
    spec.data = {"mode": protocol.DATA_STAGE, "bytes": staging.total(spec.cwd, files)}
    return staging.Outbox(spec.cwd, files), staging.Inbox(spec.cwd)


def _drive(channel, spec: JobSpec, out_fd: int, cfg: ClientConfig, say: Reporter,
           tty: str = "auto", staged: tuple | None = None) -> Outcome:
    """Submit the job on ``channel`` and run the loop until it ends; the terminal (a pty on
    the host when ours is one, or with -t) is restored on every way out but SIGKILL."""
    loop = ClientLoop(cfg.timing())
    term = terminal.choose((0, out_fd, 2), os.getpid(), tty)
    try:
        job = JobRun(channel, spec, (0, out_fd, 2), loop.wake_w, say.debug, staged=staged,
                     terminal=term)
        job.on_stop = lambda signum: _stop_here(job, signum, say)
        job.waits = say.notice()
        job.submit()
        loop.add(job)
        (outcome,) = loop.run()
    finally:
        if term is not None:
            term.restore()
        loop.close()
    return outcome


def _stop_here(job: JobRun, signum: int, say: Reporter) -> None:
    """The job stopped on the host: stop our process group with the same signal (the shell
    shows it Stopped), then, once continued (fg, bg), let the job go on too."""
    say.debug(f"the job stopped (signal {signum}): suspending")
    if signum not in terminal.JOB_CONTROL:
        signum = signal.SIGSTOP
    old = None if signum == signal.SIGSTOP else signal.signal(signum, signal.SIG_DFL)
    try:
        os.kill(0, signum)    # returns once we are continued
    finally:
        if old is not None:
            signal.signal(signum, old)
    say.debug("continued")
    job.continued()


@contextlib.contextmanager
def exported(cfg: ClientConfig, say: Reporter):
    """The VM's export for this job: the mount's (if an offloadfs mount runs, its export is
    up) or, with none, one started for this job alone (the thesis's slow path)."""
    exp = export.make(cfg.export)
    if isinstance(exp, export.NfsExport) and not mountinfo.offloadfs_mounts():
        say.debug(f"no offloadfs mount: exporting {cfg.export.root} for this job")
        try:
            exp.start()
        except export.ExportError as exc:
            raise OffloadError(f"cannot export {cfg.export.root}: {exc}", "export") from None
        try:
            yield exp
        finally:
            exp.stop()
    else:
        yield exp


def _descriptor(exp, spec: JobSpec) -> dict | None:
    """Where the host finds the cwd, or OffloadError (nothing ran) when it cannot."""
    cwd = os.fsdecode(spec.cwd)
    try:
        return exp.descriptor(cwd)
    except KeyError:
        raise OffloadError(f"{cwd} is outside the exported tree {exp.cfg.root}",
                           "export") from None
    except OSError as exc:
        raise OffloadError(f"cannot write the job's nonce: {exc.strerror}", "export") from None


def _output_fd(path: str | None) -> int:
    """The fd for the job's stdout: -o FILE or our own stdout."""
    if not path:
        return 1
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def _derive_drain(timings: dict) -> None:
    """Drain: the daemon's drain plus what the stages leave unaccounted (transport); only for
    a job that ran to its exit (an aborted job has no daemon timings to subtract)."""
    if "run" in timings:
        known = sum(timings.get(k, 0.0) for k in ("start", "connect", "queue", "attach", "run"))
        timings["drain"] = max(timings.get("drain", 0.0), timings["total"] - known)


def process_age() -> float:
    """Seconds since this process started (interpreter and imports included; 10 ms steps)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0.0
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    return max(0.0, since_boot - ticks / os.sysconf("SC_CLK_TCK"))


def _report(command, outcome: Outcome, opts, cfg: ClientConfig, say: Reporter) -> None:
    """The error line (or the local fallback), the -p profile, the job log entry."""
    if outcome.error is not None:
        fall_back(command, opts, outcome.error, say)
        say.error(str(outcome.error))
    if opts.profile and not opts.quiet:
        say.info(profile_line(outcome))
    if not opts.no_logging:
        joblog.append(cfg.job_log, command, outcome)


def profile_line(outcome: Outcome) -> str:
    """``host H: connect 1.2 ms | queue ... | total ... ms`` from an outcome's timings."""
    parts = [f"{k} {outcome.timings.get(k, 0.0) * 1000:.1f} ms" for k in protocol.STAGES]
    return f"profile on {outcome.host}: " + " | ".join(parts)


def entry() -> None:
    """Console-script entry point of ``offld``."""
    sys.exit(main())
