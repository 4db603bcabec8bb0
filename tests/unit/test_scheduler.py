"""Unit tests for offloadd.scheduler: slots, FIFO queue, positions, cancel, slot reuse."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from offloadd.scheduler import Dispatch, Queued, Scheduler


def test_starts_immediately_when_a_slot_is_free():
    """A job submitted to an idle scheduler starts in slot 0, with no position report."""
    s = Scheduler(2)
    assert s.submit("a") == [Dispatch("a", 0)]
    assert s.busy == 1


def test_slots_respected():
    """No more than ``slots`` jobs run; the next one is queued at position 1."""
    s = Scheduler(2)
    assert s.submit("a") == [Dispatch("a", 0)]
    assert s.submit("b") == [Dispatch("b", 1)]
    assert s.submit("c") == [Queued("c", 1)]
    assert s.busy == 2
    assert list(s.queue) == ["c"]


def test_positions_reported_after_submit():
    """Each queued job learns its own position, counting from 1, in arrival order."""
    s = Scheduler(1)
    s.submit("a")
    assert s.submit("b") == [Queued("b", 1)]
    assert s.submit("c") == [Queued("c", 2)]
    assert s.submit("d") == [Queued("d", 3)]


def test_fifo_order_and_positions_after_finish():
    """When a job finishes, the oldest queued job starts and the rest move up."""
    s = Scheduler(1)
    for job in "abcd":
        s.submit(job)
    assert s.slot_freed("a") == [Dispatch("b", 0), Queued("c", 1), Queued("d", 2)]
    assert s.slot_freed("b") == [Dispatch("c", 0), Queued("d", 1)]
    assert s.slot_freed("c") == [Dispatch("d", 0)]
    assert s.slot_freed("d") == []
    assert s.busy == 0 and not s.queue


def test_finish_with_several_slots_starts_one():
    """A finish frees one slot, so exactly one queued job starts."""
    s = Scheduler(2)
    for job in "abcde":
        s.submit(job)
    actions = s.slot_freed("b")
    assert actions == [Dispatch("c", 1), Queued("d", 1), Queued("e", 2)]
    assert s.busy == 2


def test_finish_unknown_job_changes_nothing():
    """Finishing a job the scheduler does not run returns no actions and keeps state."""
    s = Scheduler(1)
    s.submit("a")
    s.submit("b")
    assert s.slot_freed("zzz") == []
    assert s.running == {"a": 0} and list(s.queue) == ["b"]


def test_cancel_queued_job():
    """Cancelling a queued job removes it and reports the new positions of the others."""
    s = Scheduler(1)
    for job in "abcd":
        s.submit(job)
    assert s.cancel("c") == [Queued("b", 1), Queued("d", 2)]
    assert s.busy == 1
    assert s.slot_freed("a") == [Dispatch("b", 0), Queued("d", 1)]
    assert s.slot_freed("b") == [Dispatch("d", 0)]


def test_cancel_head_of_queue():
    """Cancelling the next-to-start job moves everyone behind it up by one."""
    s = Scheduler(1)
    for job in "abc":
        s.submit(job)
    assert s.cancel("b") == [Queued("c", 1)]


def test_cancel_last_queued_job():
    """Cancelling the only queued job reports nothing and leaves the running job alone."""
    s = Scheduler(1)
    s.submit("a")
    s.submit("b")
    assert s.cancel("b") == []
    assert s.running == {"a": 0} and not s.queue


def test_cancel_running_job_starts_next():
    """Cancelling a running job frees its slot for the head of the queue."""
    s = Scheduler(1)
    for job in "abc":
        s.submit(job)
    assert s.cancel("a") == [Dispatch("b", 0), Queued("c", 1)]
    assert "a" not in s.running


def test_cancel_unknown_or_twice():
    """Cancelling an unknown job, or the same job twice, returns no actions."""
    s = Scheduler(1)
    s.submit("a")
    s.submit("b")
    assert s.cancel("nope") == []
    assert s.cancel("b") == []
    assert s.cancel("b") == []
    assert s.running == {"a": 0}


def test_slot_of_finished_job_goes_to_next():
    """The slot a finished job held is the slot the next job starts in."""
    s = Scheduler(3)
    assert [s.submit(j)[0].slot for j in "abc"] == [0, 1, 2]
    s.submit("d")
    assert s.slot_freed("b")[0] == Dispatch("d", 1)
    assert s.running == {"a": 0, "c": 2, "d": 1}


def test_lowest_free_slot_is_used():
    """With several free slots, a new job takes the lowest numbered one."""
    s = Scheduler(3)
    for job in "abc":
        s.submit(job)
    s.slot_freed("c")
    s.slot_freed("a")
    assert s.submit("d") == [Dispatch("d", 0)]
    assert s.submit("e") == [Dispatch("e", 2)]


def test_cancelled_running_slot_reused():
    """The slot of a cancelled running job is reused too."""
    s = Scheduler(2)
    s.submit("a")
    s.submit("b")
    s.cancel("a")
    assert s.submit("c") == [Dispatch("c", 0)]


def test_duplicate_submit_raises():
    """Submitting a job id that is running or queued raises ValueError."""
    s = Scheduler(1)
    s.submit("a")
    s.submit("b")
    with pytest.raises(ValueError):
        s.submit("a")
    with pytest.raises(ValueError):
        s.submit("b")
    assert s.running == {"a": 0} and list(s.queue) == ["b"]


def test_resubmit_after_finish_is_allowed():
    """Once a job finished, its id may be used again."""
    s = Scheduler(1)
    s.submit("a")
    s.slot_freed("a")
    assert s.submit("a") == [Dispatch("a", 0)]


def test_tuple_keys():
    """Any hashable key works, such as the server's (peer, job id) pairs."""
    s = Scheduler(1)
    assert s.submit((b"peer1", "1")) == [Dispatch((b"peer1", "1"), 0)]
    assert s.submit((b"peer2", "1")) == [Queued((b"peer2", "1"), 1)]


@pytest.mark.parametrize("slots", [0, -1, -100])
def test_slots_below_one_raise(slots):
    """A scheduler needs at least one slot."""
    with pytest.raises(ValueError):
        Scheduler(slots)


OPS = st.lists(st.tuples(st.sampled_from(["submit", "finish", "cancel"]),
                         st.integers(min_value=0, max_value=7)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=4), OPS)
def test_invariants_under_random_operations(slots, ops):
    """Against a simple model: slots bounded and distinct, no idle slot while jobs wait, FIFO."""
    s = Scheduler(slots)
    running: dict[int, int] = {}
    queue: list[int] = []
    for op, job in ops:
        if op == "submit":
            if job in running or job in queue:
                with pytest.raises(ValueError):
                    s.submit(job)
                continue
            actions = s.submit(job)
            queue.append(job)
        elif op == "finish":
            actions = s.slot_freed(job)
            running.pop(job, None)
        else:
            actions = s.cancel(job)
            running.pop(job, None)
            if job in queue:
                queue.remove(job)
        starts = [a for a in actions if isinstance(a, Dispatch)]
        positions = [a for a in actions if isinstance(a, Queued)]
        assert actions == starts + positions          # starts come first
        expected_started = queue[:max(0, slots - len(running))]
        assert [a.job for a in starts] == expected_started
        for a in starts:
            assert a.slot not in running.values() and 0 <= a.slot < slots
            running[a.job] = a.slot
        del queue[:len(starts)]
        for a in positions:
            assert queue[a.position - 1] == a.job
        if starts:                                     # everyone left in the queue moved up
            assert [a.job for a in positions] == queue
        assert s.running == running
        assert list(s.queue) == queue
        assert s.busy == len(running) <= slots
        assert len(set(running.values())) == len(running)
        assert not queue or s.busy == slots
