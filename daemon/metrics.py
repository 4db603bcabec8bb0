"""Prometheus metrics of a daemon or a broker (``--metrics ADDR:PORT``), with prometheus_client.

The loop thread updates the metrics; prometheus_client's HTTP thread (named
``offloadd-metrics``) serves them; :meth:`Metrics.close` shuts that server down.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from offloadfs.settings import host_port

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)


class Metrics:
    """Jobs by command and outcome, queue length, slots, stage times, heartbeats missed,
    replies dropped by the rate limit."""

    def __init__(self, role: str):
        """A private registry (``role`` is daemon or broker: the metrics' prefix)."""
        self.registry = CollectorRegistry()
        prefix = f"offload_{role}"
        self.jobs = Counter(f"{prefix}_jobs", "Jobs ended, by command and outcome",
                            ["command", "outcome"], registry=self.registry)
        self.queue = Gauge(f"{prefix}_queue_length", "Jobs waiting for a slot",
                           registry=self.registry)
        self.busy = Gauge(f"{prefix}_slots_busy", "Slots in use", registry=self.registry)
        self.slots = Gauge(f"{prefix}_slots", "Slots in all", registry=self.registry)
        self.stages = Histogram(f"{prefix}_stage_seconds", "Time jobs spent in each stage",
                                ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.missed = Counter(f"{prefix}_heartbeats_missed", "Peers given up for silence",
                              ["peer"], registry=self.registry)
        self.dropped = Counter(f"{prefix}_replies_dropped", "Replies to bad or refused input "
                               "not sent: the peer passed its rate limit", registry=self.registry)
        self.server = self.thread = None

    def serve(self, address: str) -> None:
        """Serve the metrics over HTTP at ADDR:PORT (port 0: any free port)."""
        host, port = host_port(address, None, bind=True)
        self.server, self.thread = start_http_server(port, host or "0.0.0.0",
                                                     registry=self.registry)
        self.thread.name = "offloadd-metrics"

    @property
    def address(self) -> str:
        """Where the metrics are served (after :meth:`serve`)."""
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def job_ended(self, command: str, outcome: str, timings: dict) -> None:
        """Count a job and observe its stage times."""
        self.jobs.labels(command=command[:64], outcome=outcome).inc()
        for stage, seconds in timings.items():
            self.stages.labels(stage=stage).observe(seconds)

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
