"""The watchdog's judgement of a stuck migration (pure: a record and a clock)."""

from __future__ import annotations

from services.watchdog import GRACE_S, overdue
from tests.support.saga import new_record, only, run_until
from workflows.saga import begin, step_succeeded
from workflows.stop_and_copy import STOP_AND_COPY


def test_a_moving_migration_is_left_alone() -> None:
    decision = run_until("transfer")
    assert overdue(decision.record, now=3.0) is None


def test_a_stuck_retryable_step_is_tried_again() -> None:
    decision = run_until("transfer")
    timeout = STOP_AND_COPY.step("transfer").timeout_s
    late = 2.0 + timeout + GRACE_S + 1
    again = overdue(decision.record, now=late)
    assert again is not None and again.changed
    cmd = only(again)
    assert (cmd.step, cmd.attempt) == ("transfer", 2)
    assert "no progress on transfer" in (again.record.steps[-1].error or "")


def test_a_stuck_restore_rolls_back_to_the_source() -> None:
    decision = run_until("restore")
    late = 2.0 + STOP_AND_COPY.step("restore").timeout_s + GRACE_S + 1
    undo = overdue(decision.record, now=late)
    assert undo is not None
    assert [c.step for c in undo.commands] == ["stop_destination"]
    assert undo.record.state == "compensating"


def test_a_migration_past_its_deadline_is_cancelled_before_the_commit() -> None:
    record = begin(STOP_AND_COPY, new_record(), now=0.0).record
    decision = overdue(record, now=record.deadline + GRACE_S + 1)
    assert decision is not None and decision.record.state in ("rolled_back", "compensating")


def test_finished_migrations_are_ignored() -> None:
    decision = run_until("clean_source")
    done = step_succeeded(STOP_AND_COPY, decision.record, only(decision), None, now=3.0)
    assert done.record.state == "completed"
    assert overdue(done.record, now=1e12) is None
