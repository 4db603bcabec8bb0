"""Unit tests for offloadd.broker_rules: hosts, slots, FIFO with bypass, deaths, clients."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from offloadd.broker_rules import (
    BadHost,
    Cancel,
    CommandsChanged,
    Dispatch,
    DuplicateJob,
    Forget,
    HostLost,
    NoHost,
    Queued,
    Reannounce,
    Rules,
)

from offloadfs.states import HostState


def kinds(actions, cls):
    """The actions of one class, in order."""
    return [a for a in actions if isinstance(a, cls)]


def ready(r, host, now=0.0, commands=("cc",), tags=(), slots=1):
    """Announce a host named after its id."""
    return r.host_ready(host, now, host, commands, tags, slots)


def lost_line(host, how):
    """The line a client gets for a job whose host was lost (``how``) after its dispatch."""
    return (f"offloadfs: the job was sent to host {host}, which was lost ({how}); the job may "
            "have run, its outcome is unknown (it is not run again)")


def three_hosts(slots=(1, 1, 1), now=0.0):
    """Rules with hosts h1, h2, h3 offering cc, announced in that order."""
    r = Rules()
    for i, n in enumerate(slots, start=1):
        ready(r, f"h{i}", now, slots=n)
    return r


# --- dispatch and slots ---------------------------------------------------------------------

def test_job_goes_to_an_idle_host_in_slot_0():
    """A job submitted while a host is idle is dispatched at once, with no queue position."""
    r = Rules()
    ready(r, "h1")
    assert r.submit("a", "c1", 0.0, "cc") == [Dispatch("a", "h1", 0)]
    assert r.busy == 1 and r.slots == 1


def test_slots_respected_across_three_hosts():
    """Hosts with 1, 2 and 3 slots run 6 jobs at once, each at most its slots; the rest queue."""
    r = three_hosts((1, 2, 3))
    actions = []
    for i in range(8):
        actions += r.submit(f"j{i}", "c1", 0.0, "cc")
    per_host = {}
    for d in kinds(actions, Dispatch):
        per_host.setdefault(d.host_id, []).append(d.slot)
    assert per_host == {"h1": [0], "h2": [0, 1], "h3": [0, 1, 2]}
    assert kinds(actions, Queued) == [Queued("j6", 1), Queued("j7", 2)]
    assert r.busy == 6 and list(r.queue) == ["j6", "j7"]


def test_six_jobs_on_three_one_slot_hosts_in_fifo_order():
    """3 jobs run on 3 different hosts, 3 queue at 1..3, and each freed slot takes the oldest."""
    r = three_hosts()
    actions = []
    for i in range(1, 7):
        actions += r.submit(f"j{i}", "c1", 0.0, "cc")
    assert kinds(actions, Dispatch) == [Dispatch("j1", "h1", 0), Dispatch("j2", "h2", 0),
                                        Dispatch("j3", "h3", 0)]
    assert kinds(actions, Queued) == [Queued("j4", 1), Queued("j5", 2), Queued("j6", 3)]
    assert r.slot_freed("h2", "j2") == [Dispatch("j4", "h2", 0)]
    assert r.slot_freed("h1", "j1") == [Dispatch("j5", "h1", 0)]
    assert r.tick(0.5) == [Queued("j6", 1)]            # 3, then 1: the 2 between never told
    assert r.slot_freed("h3", "j3") == [Dispatch("j6", "h3", 0)]
    assert r.slot_freed("h3", "j6") == []
    assert not r.queue and r.busy == 2


def test_host_with_most_free_slots_wins_ties_go_to_first_announced():
    """A job goes to the host with most free slots; among equals, the one announced first."""
    r = three_hosts((2, 3, 3))
    assert r.submit("a", "c", 0.0, "cc") == [Dispatch("a", "h2", 0)]
    assert r.submit("b", "c", 0.0, "cc") == [Dispatch("b", "h3", 0)]
    assert r.submit("c", "c", 0.0, "cc") == [Dispatch("c", "h1", 0)]
    assert r.submit("d", "c", 0.0, "cc") == [Dispatch("d", "h2", 1)]


def test_lowest_free_slot_number_is_reused():
    """A host's slots count from 0, and a freed number is handed out again, lowest first."""
    r = Rules()
    ready(r, "h1", slots=3)
    assert [r.submit(j, "c", 0.0, "cc")[0].slot for j in "abc"] == [0, 1, 2]
    r.slot_freed("h1", "c")
    r.slot_freed("h1", "a")
    assert r.submit("d", "c", 0.0, "cc") == [Dispatch("d", "h1", 0)]
    assert r.submit("e", "c", 0.0, "cc") == [Dispatch("e", "h1", 2)]
    assert r.submit("f", "c", 0.0, "cc") == [Queued("f", 1)]
    assert r.slot_freed("h1", "b") == [Dispatch("f", "h1", 1)]


def test_positions_are_resent_only_when_they_change():
    """Cancelling the last queued job tells nobody; cancelling an earlier one moves the rest,
    told at the next tick."""
    r = Rules()
    ready(r, "h1")
    for j in "abcd":
        r.submit(j, "c", 0.0, "cc")
    assert r.cancel("d") == [Forget("d")]
    assert r.tick(0.5) == []
    assert r.cancel("b") == [Forget("b")]
    assert r.tick(0.6) == [Queued("c", 1)]
    assert r.tick(0.7) == []


def test_positions_are_told_once_a_tick_however_many_jobs_leave():
    """A job is told its place when it queues; then, while many jobs ahead of it start, it
    hears nothing until the tick, which tells it its place then, once."""
    r = Rules()
    ready(r, "h1")
    r.submit("run", "c", 0.0, "cc")
    assert [r.submit(f"q{i}", "c", 0.0, "cc") for i in range(5)] == [
        [Queued(f"q{i}", i + 1)] for i in range(5)]
    assert r.slot_freed("h1", "run") == [Dispatch("q0", "h1", 0)]
    for i in range(3):
        assert r.slot_freed("h1", f"q{i}") == [Dispatch(f"q{i + 1}", "h1", 0)]
    assert r.tick(0.5) == [Queued("q4", 1)]
    assert r.submit("late", "c", 0.5, "cc") == [Queued("late", 2)]


# --- routing by command and tags -------------------------------------------------------------

def test_routing_by_command():
    """Only the host offering gpujob gets it, though the others have more free slots."""
    r = Rules()
    ready(r, "cpu1", slots=4)
    ready(r, "gpu1", commands=("cc", "gpujob"), slots=1)
    ready(r, "cpu2", slots=4)
    assert r.submit("g", "c", 0.0, "gpujob") == [Dispatch("g", "gpu1", 0)]
    assert r.submit("g2", "c", 0.0, "gpujob") == [Queued("g2", 1)]
    assert r.submit("x", "c", 0.0, "cc") == [Dispatch("x", "cpu1", 0)]


def test_job_needing_a_tag_waits_for_that_host_others_go_around_it():
    """A gpu job waits for the busy gpu host though others are free; a later plain job starts."""
    r = Rules()
    ready(r, "gpu", tags=("gpu", "big"))
    ready(r, "cpu1")
    ready(r, "cpu2")
    assert r.submit("busy", "c", 0.0, "cc", ["gpu"]) == [Dispatch("busy", "gpu", 0)]
    assert r.submit("g", "c", 0.0, "cc", ["gpu"]) == [Queued("g", 1)]
    assert r.submit("p", "c", 0.0, "cc") == [Dispatch("p", "cpu1", 0)]
    assert r.slot_freed("gpu", "busy") == [Dispatch("g", "gpu", 0)]


def test_a_freed_slot_goes_to_the_oldest_job_that_host_can_run():
    """FIFO among compatible jobs: an older plain job beats a younger gpu job to the gpu host."""
    r = Rules()
    ready(r, "gpu", tags=("gpu",))
    ready(r, "cpu")
    r.submit("g0", "c", 0.0, "cc", ["gpu"])
    r.submit("c0", "c", 0.0, "cc")
    assert r.submit("plain", "c", 0.0, "cc") == [Queued("plain", 1)]
    assert r.submit("g", "c", 0.0, "cc", ["gpu"]) == [Queued("g", 2)]
    assert r.slot_freed("gpu", "g0") == [Dispatch("plain", "gpu", 0)]
    assert r.tick(0.5) == [Queued("g", 1)]
    assert r.slot_freed("cpu", "c0") == []              # the gpu job cannot use the cpu host
    assert r.slot_freed("gpu", "plain") == [Dispatch("g", "gpu", 0)]


def test_waiting_gpu_job_is_not_starved_by_later_plain_jobs():
    """However many plain jobs come later, the gpu host's next free slot goes to the gpu job."""
    r = Rules()
    ready(r, "gpu", tags=("gpu",))
    ready(r, "cpu")
    r.submit("p0", "c", 0.0, "cc")
    r.submit("p1", "c", 0.0, "cc")
    r.submit("g", "c", 0.0, "cc", ["gpu"])
    for i in range(2, 20):
        r.submit(f"p{i}", "c", 0.0, "cc")
    assert r.slot_freed("cpu", "p1") == [Dispatch("p2", "cpu", 0)]
    assert r.tick(0.5) == [Queued(f"p{i}", i - 1) for i in range(3, 20)]
    assert r.slot_freed("gpu", "p0")[0] == Dispatch("g", "gpu", 0)


# --- no host ----------------------------------------------------------------------------------

def test_command_no_live_host_offers_fails_at_once():
    """A submit for a command nobody offers gets NoHost with one clear line, and is not queued."""
    r = three_hosts()
    actions = r.submit("a", "c", 0.0, "blender")
    assert actions == [NoHost("a", "offloadfs: no live host offers 'blender'; the job never ran")]
    assert not r.queue and not r.jobs
    assert r.submit("a", "c", 0.0, "cc") == [Dispatch("a", "h1", 0)]   # the key is free again


def test_tags_no_live_host_has_fail_at_once():
    """A job whose command is offered, but never with all its tags, fails at once too."""
    r = Rules()
    ready(r, "h1", tags=("gpu",))
    ready(r, "h2", tags=("big",))
    (no,) = r.submit("a", "c", 0.0, "cc", ["big", "gpu"])
    assert no == NoHost("a", "offloadfs: no live host offers 'cc' with tags big, gpu; the job "
                             "never ran")


def test_no_hosts_at_all_fails_at_once():
    """With no host announced, any submit fails at once."""
    r = Rules()
    assert kinds(r.submit("a", "c", 0.0, "cc"), NoHost)


def test_grace_lets_a_job_wait_for_a_host_to_appear():
    """With grace, a job no host fits is queued; a fitting host arriving in time runs it."""
    r = Rules(grace=2.0)
    assert r.submit("a", "c", 10.0, "cc") == [Queued("a", 1)]
    assert r.wake_at() == 12.0
    assert r.tick(11.9) == []
    assert ready(r, "h1", now=11.95) == [CommandsChanged(("cc",)), Dispatch("a", "h1", 0)]


def test_grace_runs_out_with_no_host():
    """With grace, a job no host fits fails once grace has passed, and the queue moves up."""
    r = Rules(grace=2.0)
    ready(r, "h1", now=10.0, commands=("cc",))
    r.submit("run", "c", 10.0, "cc")
    r.submit("q", "c", 10.0, "cc")
    assert r.submit("b", "c", 10.0, "blender") == [Queued("b", 2)]
    r.client_heard("c", 12.0)
    r.host_heard("h1", 12.0)
    assert r.tick(12.0) == [NoHost("b", "offloadfs: no live host offers 'blender'; the job "
                                        "never ran")]
    assert list(r.queue) == ["q"]


def test_queued_job_whose_last_possible_host_dies_fails():
    """When the only host that could run a queued job dies, the job gets NoHost (grace 0)."""
    r = Rules()
    ready(r, "gpu", tags=("gpu",))
    ready(r, "cpu")
    r.submit("g0", "c", 0.0, "cc", ["gpu"])
    r.submit("g1", "c", 0.0, "cc", ["gpu"])
    r.host_heard("cpu", 2.0)
    r.client_heard("c", 2.0)
    actions = r.tick(3.0)
    assert actions == [HostLost("g0", "gpu", lost_line("gpu", "it stopped answering")),
                       NoHost("g1", "offloadfs: no live host offers 'cc' with tags gpu; the "
                                    "job never ran")]


# --- hosts dying and coming back -------------------------------------------------------------

def test_host_dying_mid_run():
    """HostLost for the dead host's running jobs only; the queue runs elsewhere; commands shrink."""
    r = Rules()
    ready(r, "h1", commands=("cc", "ld"), slots=2)
    ready(r, "h2", commands=("cc",))
    ready(r, "h3", commands=("cc",))
    for j in ["a", "b", "c", "d", "e", "f"]:
        r.submit(j, "c", 0.0, "cc")
    assert {j: r.jobs[j].host for j in "abcd"} == {"a": "h1", "b": "h1", "c": "h2", "d": "h3"}
    for host in ("h2", "h3"):
        r.host_heard(host, 2.0)
    r.client_heard("c", 2.0)
    actions = r.tick(3.0)
    assert kinds(actions, HostLost) == [
        HostLost(j, "h1", lost_line("h1", "it stopped answering")) for j in ("a", "b")]
    assert kinds(actions, CommandsChanged) == [CommandsChanged(("cc",))]
    assert not kinds(actions, Dispatch) and list(r.queue) == ["e", "f"]
    assert r.slot_freed("h3", "d") == [Dispatch("e", "h3", 0)]
    assert r.slot_freed("h2", "c") == [Dispatch("f", "h2", 0)]
    assert r.host_state("h1") is HostState.DEAD and r.slots == 2


def test_commands_union_changes_only_when_it_changes():
    """CommandsChanged comes when the union of offered commands grows or shrinks, not else."""
    r = Rules()
    assert ready(r, "h1", commands=("cc", "ld")) == [CommandsChanged(("cc", "ld"))]
    assert ready(r, "h2", commands=("cc",)) == []
    assert ready(r, "h3", commands=("make",)) == [CommandsChanged(("cc", "ld", "make"))]
    assert r.host_gone("h2", 1.0) == []
    assert r.host_gone("h1", 1.0) == [CommandsChanged(("make",))]
    assert r.commands == ("make",)


def test_host_reannouncing_after_death_starts_fresh():
    """A dead host is told to re-announce; its late news is ignored; after ready it is new."""
    r = Rules()
    ready(r, "h1", slots=2)
    ready(r, "h2", slots=2)
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    r.host_heard("h2", 2.5)
    r.client_heard("c", 2.5)
    assert [a.job for a in kinds(r.tick(3.0), HostLost)] == ["a"]
    assert r.host_heard("h1", 3.5) == [Reannounce("h1")]
    assert r.slot_freed("h1", "a") == []
    assert ready(r, "h1", now=4.0, slots=3) == []
    assert r.submit("x", "c", 4.0, "cc") == [Dispatch("x", "h1", 0)]    # 3 free against 1
    assert r.submit("y", "c", 4.0, "cc") == [Dispatch("y", "h1", 1)]
    assert r.submit("z", "c", 4.0, "cc") == [Dispatch("z", "h2", 1)]  # tie: h2 is older now
    assert r.submit("w", "c", 4.0, "cc") == [Dispatch("w", "h1", 2)]


def test_live_host_announcing_again_loses_its_running_jobs():
    """A ready from a live host means it restarted: its running jobs are lost, queue kept."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    assert ready(r, "h1", now=1.0) == [
        HostLost("a", "h1", lost_line("h1", "it announced itself again")),
        Dispatch("b", "h1", 0)]


def test_host_goodbye_loses_its_jobs_at_once():
    """A host that says goodbye is dead at once, without waiting for liveness."""
    r = three_hosts()
    r.submit("a", "c", 0.0, "cc")
    (lost,) = r.host_gone("h1", 0.5)
    assert lost.job == "a" and lost.reason == lost_line("h1", "it shut down")
    assert r.host_gone("h1", 0.6) == []
    assert r.host_heard("h1", 0.7) == [Reannounce("h1")]


def test_heartbeat_expiry_timing():
    """A host heard at t is alive until just before t + liveness and dead at t + liveness."""
    r = Rules(heartbeat=1.0, liveness=3.0)
    ready(r, "h1", now=10.0)
    r.host_heard("h1", 12.0)
    assert r.wake_at() == 15.0
    assert r.tick(12.9) == [] and r.host_state("h1") is HostState.UP
    assert r.tick(13.0) == [] and r.host_state("h1") is HostState.SUSPECT
    assert r.tick(14.999) == [] and "h1" in r.hosts
    assert r.tick(15.0) == [CommandsChanged(())]
    assert r.host_state("h1") is HostState.DEAD


def test_heard_again_after_a_missed_heartbeat_is_up():
    """A suspect host that is heard again is up and keeps its jobs."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.client_heard("c", 2.0)
    r.tick(2.0)
    assert r.host_state("h1") is HostState.SUSPECT
    r.host_heard("h1", 2.5)
    r.client_heard("c", 4.0)
    assert r.tick(3.0) == [] and r.host_state("h1") is HostState.UP
    assert r.jobs["a"].host == "h1"


def test_new_broker_asks_known_hosts_to_reannounce():
    """A restarted broker knows nobody: a host's heartbeat gets Reannounce, its exits nothing."""
    r = Rules()
    assert r.host_heard(b"h1", 0.0) == [Reannounce(b"h1")]
    assert r.slot_freed(b"h1", (b"c", "1")) == []
    assert r.cancel((b"c", "1")) == []
    assert r.wake_at() is None


# --- clients ------------------------------------------------------------------------------------

def test_vanished_client_running_jobs_cancelled_queued_removed():
    """A silent client's running jobs get Cancel, its queued ones go; others move up."""
    r = three_hosts()
    r.submit("a1", "A", 0.0, "cc")
    r.submit("b1", "B", 0.0, "cc")
    r.submit("b2", "B", 0.0, "cc")
    r.submit("a2", "A", 0.0, "cc")
    r.submit("b3", "B", 0.0, "cc")
    r.submit("a3", "A", 0.0, "cc")
    r.submit("b4", "B", 0.0, "cc")
    for h in ("h1", "h2", "h3"):
        r.host_heard(h, 4.0)
    r.client_heard("B", 4.0)
    assert r.tick(4.9) == []
    assert r.tick(5.0) == [Cancel("a1", "h1"), Forget("a2"), Forget("a3"), Queued("b3", 1),
                           Queued("b4", 2)]
    assert r.busy == 3                                  # the slot is busy until the host says
    assert r.slot_freed("h1", "a1") == [Dispatch("b3", "h1", 0)]
    assert "A" not in r.clients


def test_client_heard_keeps_its_jobs():
    """A client that keeps talking keeps its jobs however long they run or wait."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    for t in range(1, 30):
        r.client_heard("c", float(t))
        r.host_heard("h1", float(t))
        assert r.tick(t + 0.5) == []
    assert list(r.queue) == ["b"] and r.jobs["a"].host == "h1"


def test_cancel_queued_running_unknown_and_twice():
    """Cancel drops a queued job, has a running one killed once, and ignores the unknown."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    r.submit("c", "c", 0.0, "cc")
    assert r.cancel("b") == [Forget("b")]
    assert r.cancel("a") == [Cancel("a", "h1")]
    assert r.cancel("a") == []
    assert r.cancel("nope") == []
    with pytest.raises(DuplicateJob):
        r.submit("a", "c", 0.0, "cc")                   # still on its host until freed
    assert r.slot_freed("h1", "a") == [Dispatch("c", "h1", 0)]


def test_cancelled_job_on_a_dying_host_is_forgotten_not_lost():
    """A job being cancelled when its host dies is just forgotten: nobody waits for it."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.cancel("a")
    assert r.host_gone("h1", 1.0) == [Forget("a"), CommandsChanged(())]


# --- suspended clients (Ctrl-Z of offld) -----------------------------------------------------

def suspending(slots=2):
    """Rules with a long suspend limit and host h1 that outlives every test's clock."""
    r = Rules(liveness=1000.0, client_timeout=5.0, suspend_limit=100.0)
    ready(r, "h1", slots=slots)
    return r


def test_suspended_job_survives_client_silence_until_suspend_limit():
    """A stopped client's suspended job outlives its silence; at suspend_limit it is cancelled."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    assert r.suspend("a", 1.0) == []
    assert r.wake_at() == 101.0
    assert r.tick(6.0) == [] and "c" in r.clients and r.jobs["a"].state.value == "running"
    assert r.tick(100.9) == []
    assert r.tick(101.0) == [Cancel("a", "h1")]
    assert "c" not in r.clients and r.wake_at() == 1000.0
    assert r.slot_freed("h1", "a") == [] and not r.jobs


def test_suspended_jobs_siblings_go_with_the_silent_client():
    """The silent client's jobs that are not suspended go at client_timeout, as always."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    r.submit("q", "c", 0.0, "cc")                      # queued: two slots only
    r.submit("x", "other", 0.0, "cc")
    r.suspend("a", 1.0)
    r.client_heard("other", 5.0)
    assert r.wake_at() == 6.0                          # b and q are due at 1 + 5
    assert r.tick(6.0) == [Cancel("b", "h1"), Forget("q"), Queued("x", 1)]
    assert "c" in r.clients and r.wake_at() == 10.0    # then the other client
    assert r.slot_freed("h1", "b") == [Dispatch("x", "h1", 1)]
    assert r.tick(101.0) == [Cancel("a", "h1"), Cancel("x", "h1")]


def test_resume_restores_normal_liveness():
    """After resume, the job goes client_timeout after its client's last word, as before."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.suspend("a", 1.0)
    assert r.tick(30.0) == []
    assert r.resume("a", 50.0) == []                   # also heard: the client runs again
    assert r.wake_at() == 55.0
    assert r.tick(54.9) == []
    assert r.tick(55.0) == [Cancel("a", "h1")] and "c" not in r.clients


def test_suspend_and_resume_count_as_heard():
    """A suspend or a resume is a client's word like any other message."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    r.suspend("a", 4.0)
    assert r.tick(5.0) == []
    assert r.wake_at() == 9.0
    r.resume("a", 8.0)
    assert r.tick(9.0) == [] and r.wake_at() == 13.0


def test_suspend_keeps_its_first_time():
    """A second suspend without a resume does not push the limit further out."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.suspend("a", 1.0)
    r.suspend("a", 50.0)
    assert r.wake_at() == 101.0
    assert r.tick(101.0) == [Cancel("a", "h1")]


def test_suspend_of_a_job_not_running_is_ignored():
    """Queued, cancelled and unknown jobs are not suspended: they go with a silent client."""
    r = suspending(slots=1)
    r.submit("a", "c", 0.0, "cc")
    r.submit("q", "c", 0.0, "cc")
    r.submit("k", "d", 0.0, "cc")
    r.cancel("a")
    assert r.suspend("a", 1.0) == [] and r.suspend("q", 1.0) == []
    assert r.suspend("nope", 1.0) == [] and "nope" not in r.clients
    assert r.wake_at() == 5.0                          # d, heard at 0
    assert r.tick(6.0) == [Forget("q"), Forget("k")]
    assert not r.clients and r.wake_at() == 1000.0


def test_suspended_job_that_ends_while_its_client_is_stopped():
    """The job ends on its host while its client is stopped: the client's record goes too."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    r.suspend("a", 1.0)
    r.tick(6.0)
    assert r.slot_freed("h1", "a") == []
    assert r.wake_at() == 6.0                          # nothing kept: the record is due
    assert r.tick(7.0) == [] and "c" not in r.clients
    assert r.slot_freed("h1", "b") == [] and not r.jobs


def test_suspended_job_on_a_dying_host_is_lost():
    """A suspension keeps a job from its client's silence, not from its host's death."""
    r = suspending()
    r.submit("a", "c", 0.0, "cc")
    r.suspend("a", 1.0)
    (lost, _) = r.host_gone("h1", 2.0)
    assert lost == HostLost("a", "h1", lost.reason)
    assert r.tick(6.0) == [] and not r.clients


# --- errors and parameters -------------------------------------------------------------------

def test_duplicate_submit_raises_and_changes_nothing():
    """A job key still queued or running cannot be submitted again."""
    r = Rules()
    ready(r, "h1")
    r.submit("a", "c", 0.0, "cc")
    r.submit("b", "c", 0.0, "cc")
    for j in "ab":
        with pytest.raises(DuplicateJob):
            r.submit(j, "c", 0.0, "cc")
    assert list(r.queue) == ["b"] and r.busy == 1


@pytest.mark.parametrize("slots", [0, -1, True, 1.5])
def test_host_without_slots_is_refused(slots):
    """A host must announce at least one slot, as an integer."""
    r = Rules()
    with pytest.raises(BadHost):
        ready(r, "h1", slots=slots)
    assert not r.hosts


@pytest.mark.parametrize("kwargs", [{"heartbeat": 0}, {"heartbeat": 4, "liveness": 3},
                                    {"client_timeout": 0}, {"grace": -1},
                                    {"suspend_limit": -1}])
def test_bad_parameters_raise(kwargs):
    """Heartbeat must be positive and at most liveness; timeouts positive; grace and
    suspend_limit not negative."""
    with pytest.raises(ValueError):
        Rules(**kwargs)


# --- property: random event sequences ----------------------------------------------------------

HOSTS = ["h0", "h1", "h2", "h3"]
CLIENTS = ["c0", "c1", "c2"]
COMMANDS = ["cc", "ld", "gpujob"]
TAGS = ["gpu", "big"]

READY = st.tuples(st.just("ready"), st.sampled_from(HOSTS),
                  st.sets(st.sampled_from(COMMANDS), min_size=1),
                  st.sets(st.sampled_from(TAGS)), st.integers(1, 2))
SUBMIT = st.tuples(st.just("submit"), st.sampled_from(CLIENTS),
                   st.sampled_from(["cc", "cc", "ld", "gpujob"]),
                   st.sampled_from([set(), set(), {"gpu"}, {"big"}]))
FREED = st.tuples(st.just("freed"), st.integers(0, 40))
BEAT = st.tuples(st.just("beat"))                  # every host and client is heard
TICK = st.tuples(st.just("tick"), st.floats(0.0, 3.5))
EVENTS = st.one_of(
    READY, READY, SUBMIT, SUBMIT, SUBMIT, SUBMIT, SUBMIT, FREED, FREED, BEAT, BEAT, TICK, TICK,
    st.tuples(st.just("heard"), st.sampled_from(HOSTS)),
    st.tuples(st.just("gone"), st.sampled_from(HOSTS)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("client"), st.sampled_from(CLIENTS)),
    st.tuples(st.sampled_from(["suspend", "resume"]), st.integers(0, 40)),
)


class Model:
    """What the actions say, kept apart from the rules' own tables."""

    def __init__(self):
        """Nothing announced, nothing submitted."""
        self.offers: dict[str, tuple] = {}       # live host -> (commands, tags, slots)
        self.needs: dict[str, tuple] = {}        # job -> (command, tags)
        self.submitted: list[str] = []
        self.dispatched: dict[str, str] = {}     # job -> host, ever
        self.running: dict[str, dict] = {}       # live host -> {job: slot}
        self.ended: set[str] = set()             # freed, lost, forgotten, or no host
        self.told: dict[str, int] = {}           # job -> last position told

    def fits(self, host: str, job: str) -> bool:
        """True if the host offers the job's command and all its tags."""
        commands, tags, _ = self.offers[host]
        return self.needs[job][0] in commands and self.needs[job][1] <= tags

    def queue(self) -> list[str]:
        """Jobs neither dispatched nor ended, in submit order."""
        return [j for j in self.submitted if j not in self.dispatched and j not in self.ended]

    def host_died(self, host: str) -> None:
        """Forget a host the rules dropped."""
        self.offers.pop(host, None)
        self.running.pop(host, None)

    def apply(self, actions: list) -> None:
        """Check each action against the model, then record it."""
        for a in actions:
            if isinstance(a, Dispatch):
                assert a.job not in self.dispatched and a.job not in self.ended, "runs twice"
                assert self.fits(a.host_id, a.job)
                jobs = self.running.setdefault(a.host_id, {})
                assert 0 <= a.slot < self.offers[a.host_id][2] and a.slot not in jobs.values()
                older = [j for j in self.queue() if self.submitted.index(j) <
                         self.submitted.index(a.job)]
                assert not any(self.fits(a.host_id, j) for j in older), "FIFO broken"
                self.dispatched[a.job] = a.host_id
                jobs[a.job] = a.slot
            elif isinstance(a, (HostLost, Forget, NoHost)):
                assert a.job not in self.ended
                if isinstance(a, HostLost):
                    assert self.dispatched[a.job] == a.host_id
                self.ended.add(a.job)
            elif isinstance(a, Cancel):
                assert a.job in self.running[a.host_id]
            elif isinstance(a, Queued):
                assert a.position < self.told.get(a.job, 1 << 30), "position grew or repeated"
                self.told[a.job] = a.position


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0.0, 1.5]), st.lists(EVENTS, min_size=20, max_size=60))
def test_invariants_under_random_events(grace, events):
    """No job runs twice, no host over its slots, FIFO among fitting jobs, every job accounted."""
    r = Rules(heartbeat=1.0, liveness=3.0, client_timeout=5.0, grace=grace, suspend_limit=6.0)
    m = Model()
    now = 0.0
    for event in events:
        op = event[0]
        if op == "ready":
            _, host, commands, tags, slots = event
            m.host_died(host)                    # announcing again is a fresh start
            actions = r.host_ready(host, now, host, commands, tags, slots)
            m.offers[host] = (commands, tags, slots)
        elif op == "heard":
            actions = r.host_heard(event[1], now)
        elif op == "gone":
            actions = r.host_gone(event[1], now)
            m.host_died(event[1])
        elif op == "freed":
            pairs = [(h, j) for h, jobs in m.running.items() for j in jobs]
            if not pairs:
                continue
            host, job = pairs[event[1] % len(pairs)]
            actions = r.slot_freed(host, job)
            del m.running[host][job]
            m.ended.add(job)
        elif op == "submit":
            job = f"j{len(m.submitted)}"
            m.submitted.append(job)
            m.needs[job] = (event[2], event[3])
            actions = r.submit(job, event[1], now, event[2], event[3])
        elif op == "cancel":
            actions = r.cancel(m.submitted[event[1] % len(m.submitted)]) if m.submitted else []
        elif op == "client":
            actions = r.client_heard(event[1], now)
        elif op in ("suspend", "resume"):
            job = m.submitted[event[1] % len(m.submitted)] if m.submitted else "none"
            actions = getattr(r, op)(job, now)
        elif op == "beat":
            actions = [a for h in m.offers for a in r.host_heard(h, now)]
            for c in CLIENTS:
                r.client_heard(c, now)
        else:
            now += event[1]
            actions = r.tick(now)
            for h in [h for h in m.offers if h not in r.hosts]:
                m.host_died(h)
            assert r.wake_at() is None or r.wake_at() > now, "tick left work for the past"
        m.apply(actions)
        assert set(r.hosts) == set(m.offers)
        for host, jobs in m.running.items():     # the rules agree; slots bounded and distinct
            assert r.hosts[host].running == jobs
            assert len(jobs) <= m.offers[host][2] and len(set(jobs.values())) == len(jobs)
        queue = m.queue()
        assert list(r.queue) == queue
        for position, job in enumerate(queue, start=1):
            if op == "tick":   # told at submit; its changes at each tick
                assert m.told.get(job) == position, "a queued job does not know its position"
            else:
                assert m.told.get(job, 0) >= position, "a queued job was told too little"
            free = [h for h, o in m.offers.items() if len(m.running.get(h, {})) < o[2]]
            assert not any(m.fits(h, job) for h in free), "a fitting slot left idle"
            if grace == 0.0:
                assert any(m.fits(h, job) for h in m.offers), "queued though no host fits"
        if grace == 0.0:
            assert not r.hostless
    # Every submitted job is exactly one of: queued, dispatched and still on its host, ended.
    for job in m.submitted:
        on_host = job in m.dispatched and job not in m.ended
        assert (job in r.queue) + on_host + (job in m.ended) == 1
        assert on_host == (job in r.jobs and job not in r.queue)
