"""``offld``'s own path: a ZeroMQ connection to a host or broker, when no mount's agent takes the
job (``handoff.reason_not``, or no offloadfs mount; see ``offld``).

Follow one job: :func:`run` connects (``client.connect``), builds the JobSpec from this
process's argv, cwd, credentials and environment, submits it (``jobrun.JobRun``), drives it
(``client.ClientLoop``) and returns the job's status; errors of the offload itself are
``OffloadError``s (``offld.main`` prints one ``offld: ...`` line and exits 255).
"""
from __future__ import annotations

import contextlib
import os
import time

import zmq

from . import (
    environ,
    export,
    handoff,
    joblog,
    notice,
    protocol,
    reach,
    staging,
    terminal,
)
from .channel import OffloadError
from .client import ClientLoop, connect
from .config import ClientConfig, host_endpoint
from .jobrun import JobRun, JobSpec, Outcome
from .offld import Reporter, _output_fd, fall_back

__all__ = ["OffloadError", "run"]


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
    handoff.suspend(signum)
    say.debug("continued")
    job.continued()


@contextlib.contextmanager
def exported(cfg: ClientConfig, say: Reporter):
    """The VM's export for this job: the one up already (the mount's: ``serving``), else
    one started for this job alone (the thesis's slow path). Whether some offloadfs mount
    runs says nothing: it may be another user's, with another export (offld then sent jobs
    to an export nobody served)."""
    exp = export.make(cfg.export)
    if isinstance(exp, export.NfsExport) and not exp.serving():
        say.debug(f"the export of {cfg.export.root} is not up: exporting it for this job")
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


