"""Prometheus metrics of a daemon or a broker (``--metrics ADDR:PORT``), with prometheus_client.

The loop thread updates the metrics (jobs and their stage times in plain ints, :class:`Tally`,
exported when scraped); an HTTP thread of ours (named ``offloadd-metrics``, a
wsgiref server around prometheus_client's ``make_wsgi_app``) serves them;
:meth:`Metrics.close` shuts that server down. How a job
ended is one of :data:`OUTCOMES` (docs/decisions.md, "Operations"); :func:`exit_outcome` and
:func:`error_outcome` say which.
"""
from __future__ import annotations

import bisect
import logging
import os
import platform
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client.metrics
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from offloadfs import __version__, protocol
from offloadfs.settings import host_port

log = logging.getLogger("offloadd")


def disable_created_metrics() -> None:
    """No ``*_created`` series: prometheus_client's switch from 0.17, its module flag before
    (Debian 12 has 0.16, whose start_http_server also returns nothing: hence our own server)."""
    switch = getattr(prometheus_client, "disable_created_metrics", None)
    if switch is not None:
        switch()
    else:
        prometheus_client.metrics._use_created = False


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """The metrics' HTTP server: a thread per request (daemon threads: a stuck scraper does
    not hold up shutdown)."""
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Requests are not logged (a scrape every few seconds would fill the log)."""

    def log_message(self, format, *args):
        """Log nothing."""

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)

# How a job ended, the ``outcome`` label of the jobs counter.
DONE = "done"            # it ran and exited 0
FAILED = "failed"        # it ran and exited non-zero
SIGNAL = "signal"        # it ran and was killed by a signal
REFUSED = "refused"      # it never ran: refused at submit, or could not be started
ERROR = "error"          # the host ended it after it may have run (output limit, internal)
LOST = "lost"            # its client (or, at a broker, its host) went away before the end
CANCELLED = "cancelled"  # its client gave it up (cancel)
OUTCOMES = (DONE, FAILED, SIGNAL, REFUSED, ERROR, LOST, CANCELLED)
OTHER_COMMAND = "(other)"   # the command label of a job whose command nobody here offers


class MetricsError(Exception):
    """The metrics cannot be served (the address is in use, say); the text is one line."""


def exit_outcome(status: int, signal: int | None) -> str:
    """The outcome of a job that ran to its end: its exit status and its killing signal."""
    if signal:
        return SIGNAL
    return DONE if status == 0 else FAILED


def error_outcome(started: bool) -> str:
    """The outcome of a job that ended with an ``error``: whether it may have run."""
    return ERROR if started else REFUSED


def command_label(name: str, offered) -> str:
    """The command label of a job named ``name``: the name if it is in ``offered``, else one
    label for all the rest, so that what peers send cannot grow the label set."""
    return name[:64] if name in offered else OTHER_COMMAND


def ended_record(job_id: str, argv0: bytes, status: int | None, host: str,
                 timings: dict) -> dict:
    """A job that ended, as ``status`` lists it among the recent jobs: its id, command,
    exit status (-1: none), the host it ran on (or was meant for) and its stage times."""
    return {"job": job_id, "command": os.fsdecode(argv0)[:255],
            "status": -1 if status is None else status, "host": host,
            **{k: round(v, 6) for k, v in stage_times(timings).items()}}


def stage_times(timings: dict) -> dict[str, float]:
    """The stage times of a job's ``timings`` (a host's, as the protocol names them), without
    anything else a peer put there."""
    return {k: float(v) for k, v in timings.items() if k in protocol.STAGES
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tally:
    """Jobs ended by command and outcome, and their stage times by histogram bucket, in plain
    ints: a collector of the registry that exports them as prometheus_client's Counter and
    Histogram would (``PREFIX_jobs_total``, ``PREFIX_stage_seconds_bucket`` and so on), built
    when scraped. Counter.inc and Histogram.observe take a lock each: at thousands of jobs a
    second they were a tenth of the broker's work. The loop thread calls :meth:`job_ended`;
    the HTTP thread :meth:`collect`, which reads copies (each ``list()`` of a dict's items or
    of a row is one step under the GIL)."""

    def __init__(self, prefix: str):
        """Nothing counted yet; the metrics are named ``prefix``_jobs and _stage_seconds."""
        self.prefix = prefix
        self.jobs: dict[tuple[str, str], int] = {}   # (command, outcome) -> jobs
        self.stages: dict[str, list] = {}   # stage -> [jobs in each bucket, +Inf, sum]
        self.bounds = [floatToGoString(b) for b in STAGE_BUCKETS] + ["+Inf"]

    def job_ended(self, command: str, outcome: str, timings: dict) -> None:
        """Count one job and the bucket of each of its stage times."""
        key = (command, outcome)
        self.jobs[key] = self.jobs.get(key, 0) + 1
        if not timings:
            return
        for stage, seconds in stage_times(timings).items():
            row = self.stages.get(stage)
            if row is None:
                row = self.stages[stage] = [0] * (len(STAGE_BUCKETS) + 1) + [0.0]
            row[bisect.bisect_left(STAGE_BUCKETS, seconds)] += 1   # le: the first bound >=
            row[-1] += seconds

    def collect(self):
        """The two metric families, as the registry asks when scraped."""
        jobs = CounterMetricFamily(f"{self.prefix}_jobs", "Jobs ended, by command and outcome "
                                   "(done, failed, signal, refused, error, lost, cancelled)",
                                   labels=["command", "outcome"])
        for (command, outcome), n in list(self.jobs.items()):
            jobs.add_metric([command, outcome], n)
        stages = HistogramMetricFamily(f"{self.prefix}_stage_seconds",
                                       "Time jobs spent in each stage", labels=["stage"])
        for stage, row in list(self.stages.items()):
            row = list(row)
            total, buckets = 0, []
            for bound, n in zip(self.bounds, row[:-1], strict=True):
                total += n
                buckets.append((bound, total))
            stages.add_metric([stage], buckets, row[-1])
        return [jobs, stages]


class Metrics:
    """Jobs by command and outcome, queue length, slots, stage times, heartbeats missed,
    replies dropped by the rate limit, and the build."""

    def __init__(self, role: str):
        """A private registry (``role`` is daemon or broker: the metrics' prefix)."""
        disable_created_metrics()   # no *_created series: nobody graphs a counter's birth
        self.registry = CollectorRegistry()
        prefix = f"offload_{role}"
        self.tally = Tally(prefix)
        self.registry.register(self.tally)
        self.queue = Gauge(f"{prefix}_queue_length", "Jobs waiting for a slot",
                           registry=self.registry)
        self.busy = Gauge(f"{prefix}_slots_busy", "Slots in use", registry=self.registry)
        self.slots = Gauge(f"{prefix}_slots", "Slots in all", registry=self.registry)
        self.missed = Counter(f"{prefix}_heartbeats_missed", "Peers given up for silence",
                              ["peer"], registry=self.registry)
        self.dropped = Counter(f"{prefix}_replies_dropped", "Replies to bad or refused input "
                               "not sent: the peer passed its rate limit", registry=self.registry)
        Info(f"{prefix}_build", "The offloadfs version serving, its Python and libzmq",
             registry=self.registry).info({"version": __version__,
                                           "python": platform.python_version(),
                                           "libzmq": zmq.zmq_version()})
        self.server = self.thread = None

    def serve(self, address: str) -> None:
        """Serve the metrics over HTTP at ADDR:PORT (port 0: any free port) and log where;
        MetricsError if that address cannot be had."""
        host, port = host_port(address, None, bind=True)
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("MetricsServer", (_Server,), {"address_family": family})
        try:
            self.server = make_server(host, port, make_wsgi_app(self.registry), server,
                                      handler_class=_QuietHandler)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {address}: "
                               f"{(exc.strerror or str(exc)).lower()}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="offloadd-metrics",
                                       daemon=True)
        self.thread.start()
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        """Where the metrics are served (after :meth:`serve`): ADDR:PORT, [ADDR]:PORT for
        IPv6."""
        host, port = self.server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def job_ended(self, command: str, outcome: str, timings: dict) -> None:
        """Count a job (``command``: a label from :func:`command_label`) and observe its stage
        times."""
        self.tally.job_ended(command, outcome, timings)

    def load(self, slots: int, busy: int, queued: int) -> None:
        """The current slots, slots in use and queue length."""
        self.slots.set(slots)
        self.busy.set(busy)
        self.queue.set(queued)

    def close(self) -> None:
        """Stop the HTTP server and wait for its thread."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
