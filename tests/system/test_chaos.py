"""Chaos, short (issue 12): bench/chaos.py's harness with 150 jobs, 2 host SIGKILLs and 2
broker restarts (SIGTERM, then SIGKILL, same ports), from offld (with and without --fallback)
and the mount's shims (auto and always) at once.

Nothing may run twice, nothing may end wrong (a bad status or output that is not a 255, or an
``always`` job run locally), no 255 may say "never ran" of a job that ran (a lie) or fail to
say which it is ("never ran" / "may have run", one line), and nothing may hang. The harness
runs in tmp_path, so conftest's leak check also sees every process it started.
"""
from __future__ import annotations

import json

from bench import chaos

SETTINGS = chaos.Settings(jobs=150, clients=8, hosts=3, slots=2, host_kills=2,
                          broker_restarts=2, down=1.5, broker_down=0.3, broker_signal="both",
                          sleep_share=0.2, sleep=0.3, hang=45.0)


def test_nothing_runs_twice_while_hosts_and_the_broker_die(tmp_path):
    """Every job ran once or failed with a truthful 255; the chaos really happened."""
    r = chaos.run_chaos(SETTINGS, base=tmp_path)
    kills, restarts = chaos.chaos_counts(r)
    assert (kills, restarts) == (2, 2), r["events"]
    assert not r["errors"], r["errors"]
    failures = {c: r["totals"][c] for c in chaos.FAILURES}
    assert failures == dict.fromkeys(chaos.FAILURES, 0), json.dumps(
        {"failures": r["failures"][:40], "said_255": r["said_255"], "events": r["events"]},
        indent=1)
    assert sum(r["totals"].values()) == SETTINGS.jobs
    assert r["totals"]["ran-once host"] > SETTINGS.jobs // 2, r["totals"]
    assert not list(tmp_path.glob("offloadfs-chaos-*")), "the harness left its temp dir"
