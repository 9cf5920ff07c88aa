"""Tests for workers.journal: which client calls an operation overlapped, with a fake clock."""

from __future__ import annotations

import pytest

from workers.journal import Journal, Operation


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_counts_calls_in_flight_at_start_and_started_before_end() -> None:
    journal = Journal(clock=Clock())
    journal.client_started()  # in flight before the load begins, ends during it
    journal.client_started()  # in flight before, outlives it
    with journal.record("load", "ctr", 2) as load:
        journal.client_finished()
        journal.client_started()  # starts during the load
        journal.client_finished()
    journal.client_started()  # after the load: not its business
    journal.client_finished()
    journal.client_finished()
    assert load == Operation("load", "ctr", 2, start=101.0, end=102.0, client_requests=3)
    assert journal.in_flight == 0


def test_quiet_operations_count_nothing_and_overlapping_operations_each_count() -> None:
    journal = Journal(clock=Clock())
    with journal.record("warmup", "ctr", 1) as quiet:
        pass
    with journal.record("load", "ctr", 2) as load:
        with journal.record("unload", "ctr", 1) as unload:
            journal.client_started()
            journal.client_finished()
        journal.client_started()
        journal.client_finished()
    assert quiet.client_requests == 0
    assert (load.client_requests, unload.client_requests) == (2, 1)
    assert [op.kind for op in journal.operations] == ["warmup", "load", "unload"]  # in order of start


def test_a_failing_operation_is_ended_and_stops_counting() -> None:
    journal = Journal(clock=Clock())
    with pytest.raises(RuntimeError), journal.record("load", "ctr", 3) as op:
        raise RuntimeError("bad SavedModel")
    journal.client_started()
    assert op.end is not None and op.end > op.start
    assert op.client_requests == 0


def test_running_operations_show_no_end_and_the_journal_is_bounded() -> None:
    journal = Journal(maxlen=3, clock=Clock())
    with journal.record("load", "ctr", 1) as running:
        for version in range(5):
            with journal.record("warmup", "ctr", version):
                pass
        assert running.end is None and running not in journal.operations  # evicted, still counted
        journal.client_started()
    assert [op.version for op in journal.operations] == [2, 3, 4]
    assert running.client_requests == 1 and running.end is not None
