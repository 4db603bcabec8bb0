"""daemon.metrics: the outcome of each way a job ends, bounded labels, and what is exported."""
from __future__ import annotations

import pytest
from offloadd import metrics
from prometheus_client import generate_latest

from offloadfs import __version__


@pytest.mark.parametrize("status, signal, outcome", [
    (0, None, metrics.DONE), (3, None, metrics.FAILED), (255, None, metrics.FAILED),
    (137, 9, metrics.SIGNAL), (143, 15, metrics.SIGNAL)])
def test_an_exit_is_done_failed_or_signal(status, signal, outcome):
    """Exit 0 is done, another status failed, a killing signal signal (whatever the status)."""
    assert metrics.exit_outcome(status, signal) == outcome


def test_an_error_is_refused_if_nothing_ran():
    """An error about a job that never ran is a refusal; one that may have run, an error."""
    assert metrics.error_outcome(False) == metrics.REFUSED
    assert metrics.error_outcome(True) == metrics.ERROR


def test_commands_nobody_offers_share_one_label():
    """What a peer names cannot grow the label set: unknown commands are one label."""
    assert metrics.command_label("sh", ["cat", "sh"]) == "sh"
    assert metrics.command_label("x" * 1000, ["sh"]) == metrics.OTHER_COMMAND


def test_only_the_protocols_stages_are_observed():
    """A host's timings: the stages, as floats; anything else a peer put there is dropped."""
    assert metrics.stage_times({"run": 1, "queue": 0.5, "bogus": 1.0, "drain": "x",
                                "attach": True}) == {"run": 1.0, "queue": 0.5}


def test_the_export_has_build_info_and_no_created_series():
    """build_info carries the version; no counter or histogram exports a _created series."""
    m = metrics.Metrics("daemon")
    m.job_ended("sh", metrics.DONE, {"run": 0.25})
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert f'version="{__version__}"' in text and "offload_daemon_build_info{" in text
    assert 'offload_daemon_jobs_total{command="sh",outcome="done"} 1.0' in text


def test_a_recent_job_names_its_host():
    """status's record of a job: id, command, status (-1: none), host, stage times."""
    assert metrics.ended_record("7", b"/bin/sh", None, "h1", {"run": 0.1234567, "x": 1}) == {
        "job": "7", "command": "/bin/sh", "status": -1, "host": "h1", "run": 0.123457}


def test_the_tally_exports_what_prometheus_clients_own_metrics_would():
    """Jobs and stage times counted in plain ints read, when scraped, line for line as
    prometheus_client's Counter and Histogram fed the same jobs (bucket bounds included: a
    time equal to a bound is in that bucket, one past the last bound only in +Inf)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    ours = metrics.Metrics("broker")
    theirs = CollectorRegistry()
    counter = Counter("offload_broker_jobs", "Jobs ended, by command and outcome (done, failed, "
                      "signal, refused, error, lost, cancelled)", ["command", "outcome"],
                      registry=theirs)
    histogram = Histogram("offload_broker_stage_seconds", "Time jobs spent in each stage",
                          ["stage"], buckets=metrics.STAGE_BUCKETS, registry=theirs)
    jobs = [("sh", metrics.DONE, {"run": 0.25, "queue": 0.001}),
            ("sh", metrics.DONE, {"run": 5, "drain": 0.0, "bogus": 3.0}),
            ("(other)", metrics.REFUSED, {}), ("sh", metrics.FAILED, {"run": 1e9})]
    for command, outcome, timings in jobs:
        ours.job_ended(command, outcome, timings)
        counter.labels(command, outcome).inc()
        for stage, seconds in metrics.stage_times(timings).items():
            histogram.labels(stage).observe(seconds)

    def lines(registry, prefix):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(prefix)
                      and "_created" not in line)

    for prefix in ("offload_broker_jobs", "offload_broker_stage_seconds"):
        assert lines(ours.registry, prefix) == lines(theirs, prefix)
    assert 'offload_broker_stage_seconds_bucket{le="0.001",stage="queue"} 1.0' in \
        lines(ours.registry, "offload_broker_stage_seconds")
