"""Unit tests for offloadfs.states: job and host state machines."""
from __future__ import annotations

import itertools

import pytest

from offloadfs.states import (
    HostState,
    IllegalTransition,
    JobState,
    advance,
    advance_host,
    first_contact,
)

J = JobState
H = HostState
JOB_EVENT_NAMES = ("queued", "started", "exited", "exit", "error", "cancel")
HOST_EVENT_NAMES = ("heard", "missed", "expired")

# The intended job rules, written out independently of the module's table.
LEGAL_JOB = {
    (J.NEW, "queued"): J.QUEUED,
    (J.NEW, "started"): J.RUNNING,
    (J.QUEUED, "queued"): J.QUEUED,          # a position update
    (J.QUEUED, "started"): J.RUNNING,
    (J.RUNNING, "exited"): J.DRAINING,
    (J.RUNNING, "exit"): J.DONE,
    (J.DRAINING, "exit"): J.DONE,
    **{(s, "error"): J.FAILED for s in (J.NEW, J.QUEUED, J.RUNNING, J.DRAINING)},
    **{(s, "cancel"): J.CANCELLED for s in (J.NEW, J.QUEUED, J.RUNNING, J.DRAINING)},
}

LEGAL_HOST = {
    **{(s, "heard"): H.UP for s in H},
    (H.UNKNOWN, "missed"): H.DEAD,
    (H.UP, "missed"): H.SUSPECT,
    (H.SUSPECT, "missed"): H.SUSPECT,
    (H.DEAD, "missed"): H.DEAD,
    **{(s, "expired"): H.DEAD for s in H},
}


@pytest.mark.parametrize("state,event", sorted(LEGAL_JOB, key=str))
def test_legal_job_transitions(state, event):
    """Every legal job event leads to the intended state."""
    assert advance(state, event) is LEGAL_JOB[(state, event)]


ILLEGAL_JOB = [(s, e) for s, e in itertools.product(J, JOB_EVENT_NAMES)
               if (s, e) not in LEGAL_JOB]


@pytest.mark.parametrize("state,event", ILLEGAL_JOB, ids=[f"{s.value}-{e}" for s, e in ILLEGAL_JOB])
def test_illegal_job_transitions(state, event):
    """Every other (state, event) pair raises IllegalTransition naming state and event."""
    with pytest.raises(IllegalTransition, match=f"{state.value}.*{event}"):
        advance(state, event)


@pytest.mark.parametrize("state,event", [(J.DONE, "started"), (J.NEW, "exit"),
                                         (J.NEW, "exited"), (J.QUEUED, "exit"),
                                         (J.DRAINING, "started"), (J.RUNNING, "queued"),
                                         (J.CANCELLED, "cancel"), (J.FAILED, "error")])
def test_named_illegal_transitions(state, event):
    """Spot checks: no restart after the end, no exit before a start, no double cancel."""
    with pytest.raises(IllegalTransition):
        advance(state, event)


@pytest.mark.parametrize("event", ["bogus", "", "EXIT", "Started"])
def test_unknown_job_event(event):
    """An event name that does not exist is illegal in every state, case sensitive."""
    for state in J:
        with pytest.raises(IllegalTransition):
            advance(state, event)


def test_illegal_transition_is_not_a_key_error():
    """IllegalTransition is its own exception, not a leaked KeyError."""
    assert not issubclass(IllegalTransition, KeyError)
    with pytest.raises(IllegalTransition):
        advance(J.DONE, "exit")


def test_full_lives():
    """Typical lives of a job end in the expected final state."""
    def run(*events):
        state = J.NEW
        for event in events:
            state = advance(state, event)
        return state
    assert run("queued", "queued", "started", "exited", "exit") is J.DONE
    assert run("started", "exit") is J.DONE
    assert run("queued", "cancel") is J.CANCELLED
    assert run("started", "exited", "error") is J.FAILED


@pytest.mark.parametrize("state", list(J))
def test_final_property(state):
    """DONE, FAILED and CANCELLED are final; every other state is not."""
    assert state.final is (state in (J.DONE, J.FAILED, J.CANCELLED))


@pytest.mark.parametrize("state", [s for s in J if s.final])
def test_final_states_take_no_event(state):
    """Nothing more happens to a job in a final state."""
    for event in JOB_EVENT_NAMES:
        with pytest.raises(IllegalTransition):
            advance(state, event)


@pytest.mark.parametrize("state,event", sorted(LEGAL_HOST, key=str))
def test_host_transitions(state, event):
    """Host events lead to the intended states: heard means up, expired means dead."""
    assert advance_host(state, event) is LEGAL_HOST[(state, event)]


def test_host_transition_table_complete():
    """Every host state takes every host event (a host can always be heard from or expire)."""
    for state, event in itertools.product(H, HOST_EVENT_NAMES):
        assert (state, event) in LEGAL_HOST
        advance_host(state, event)


@pytest.mark.parametrize("event", ["bogus", "queued", "HEARD"])
def test_unknown_host_event(event):
    """Unknown host events raise IllegalTransition naming the state."""
    for state in H:
        with pytest.raises(IllegalTransition, match=state.value):
            advance_host(state, event)


def test_dead_host_recovers():
    """A dead host that is heard from again is up; an up host goes suspect, then dead."""
    state = H.UNKNOWN
    for event, expected in [("heard", H.UP), ("missed", H.SUSPECT), ("missed", H.SUSPECT),
                            ("expired", H.DEAD), ("heard", H.UP)]:
        state = advance_host(state, event)
        assert state is expected


def test_job_and_host_functions_not_interchangeable():
    """Job events do not apply to hosts and host events do not apply to jobs."""
    with pytest.raises(IllegalTransition):
        advance(J.RUNNING, "heard")
    with pytest.raises(IllegalTransition):
        advance_host(H.UP, "exit")


# --- the start-up rule: wait for a host's first answer, go, or give up ----------------------

@pytest.mark.parametrize("usable, links, verdict", [
    (True, [(H.UNKNOWN, 0.1)], "go"),                         # a host up offers it: go now
    (False, [(H.UNKNOWN, 0.1)], "wait"),                      # its first hello is unanswered
    (False, [(H.DEAD, 0.1), (H.UNKNOWN, 4.9)], "wait"),       # one host may still answer
    (False, [(H.UNKNOWN, 5.0)], "give up"),                   # past the bound: no more wait
    (False, [(H.DEAD, 0.1)], "give up"),                      # its connection was refused
    (False, [(H.UP, 0.1)], "give up"),                        # up, but it does not offer it
    (False, [(H.SUSPECT, 0.1), (H.DEAD, 0.2)], "give up"),    # known hosts: nothing to wait for
    (False, [], "give up"),                                   # no host configured
])
def test_a_request_waits_only_for_hosts_not_yet_heard_within_the_bound(usable, links, verdict):
    """A request that finds no usable host waits while a host has not answered its first
    connection attempt, for at most the bound (5 s here) since that attempt began."""
    assert first_contact(usable, links, 5.0).value == verdict
