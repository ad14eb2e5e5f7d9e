"""The watchdog's judgement of a step's liveness (pure: a record, what the lease says, and
what the watchdog saw itself on its own monotonic clock)."""

from __future__ import annotations

from schemas.v2.migrations import MigrationRecord
from services.watchdog import GRACE_S
from tests.support.saga import only, run_until
from workflows.liveness import Liveness, Sighting, judge
from workflows.saga import Decision, step_succeeded
from workflows.stop_and_copy import STOP_AND_COPY

FIRST_SEEN = 500.0  # this watchdog's monotonic clock when it first saw the attempt


def judged(
    record: MigrationRecord,
    liveness: Liveness,
    *,
    now: float,
    sighting: Sighting | None = None,
    migration_first_seen: float = FIRST_SEEN,
) -> Decision | None:
    return judge(
        STOP_AND_COPY,
        record,
        liveness,
        sighting or Sighting(first_seen=FIRST_SEEN),
        migration_first_seen=migration_first_seen,
        now=now,
        wall_now=1e9,  # another epoch altogether: wall clocks are only written, never compared
        grace=GRACE_S,
    )


def past_timeout(step: str, since: float = FIRST_SEEN) -> float:
    return since + STOP_AND_COPY.step(step).timeout_s + GRACE_S + 1


def test_a_held_step_is_alive_however_long_it_runs() -> None:
    record = run_until("transfer").record
    assert judged(record, "held", now=past_timeout("transfer") + 3 * 300) is None


def test_a_step_nobody_took_is_tried_again_after_the_watchdogs_own_timeout() -> None:
    record = run_until("transfer").record
    assert judged(record, "never_held", now=past_timeout("transfer") - 2) is None
    again = judged(record, "never_held", now=past_timeout("transfer"))
    assert again is not None and again.changed
    cmd = only(again)
    assert (cmd.step, cmd.attempt) == ("transfer", 2)
    assert "not taken by any worker" in (again.record.steps[-1].error or "")


def test_a_released_lease_counts_from_when_it_was_last_seen_held() -> None:
    record = run_until("transfer").record
    seen = Sighting(first_seen=FIRST_SEEN, last_held=FIRST_SEEN + 200)
    assert judged(record, "released", now=past_timeout("transfer"), sighting=seen) is None
    late = judged(record, "released", now=past_timeout("transfer", FIRST_SEEN + 200), sighting=seen)
    assert late is not None and "not held by any worker" in (late.record.steps[-1].error or "")


def test_an_expired_lease_fails_the_attempt_at_once() -> None:
    record = run_until("transfer").record
    again = judged(record, "expired", now=FIRST_SEEN)
    assert again is not None and only(again).attempt == 2
    assert "expired" in (again.record.steps[-1].error or "")


def test_an_expired_restore_rolls_back_to_the_source() -> None:
    record = run_until("restore").record
    undo = judged(record, "expired", now=FIRST_SEEN)
    assert undo is not None
    assert [c.step for c in undo.commands] == ["stop_destination"]
    assert undo.record.state == "compensating"


def test_unknown_liveness_changes_nothing() -> None:
    record = run_until("dump").record
    assert judged(record, "unavailable", now=1e12, migration_first_seen=0.0) is None


def test_past_the_deadline_a_step_nobody_holds_is_cancelled_before_the_commit() -> None:
    record = run_until("transfer").record
    now = FIRST_SEEN + STOP_AND_COPY.total_timeout_s + GRACE_S + 1
    assert judged(record, "never_held", now=now - 2, sighting=Sighting(now - 3)) is None
    decision = judged(record, "never_held", now=now, sighting=Sighting(now - 1))
    assert decision is not None and decision.record.state in ("rolled_back", "compensating")


def test_past_the_deadline_a_held_step_is_asked_to_stop_at_its_boundary() -> None:
    record = run_until("transfer").record
    now = FIRST_SEEN + STOP_AND_COPY.total_timeout_s + GRACE_S + 1
    decision = judged(record, "held", now=now)
    assert decision is not None and decision.commands == ()
    assert decision.record.cancel_requested and decision.record.state == "running"
    assert judged(decision.record, "held", now=now) is None  # asked once


def test_finished_migrations_are_ignored() -> None:
    decision = run_until("clean_source")
    done = step_succeeded(STOP_AND_COPY, decision.record, only(decision), None, now=3.0)
    assert done.record.state == "completed"
    assert judged(done.record, "expired", now=1e12, migration_first_seen=0.0) is None
