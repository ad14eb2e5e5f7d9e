"""Post-copy's fallback: a step after the commit that fails for good hands the container back
to the source (its copy waited stopped) instead of ending with no trustworthy copy."""

from __future__ import annotations

import pytest

from schemas.v1.migrations import StrategyChoice
from schemas.v2.migrations import MigrationRecord, StepCommand
from workflows.post_copy import POST_COPY
from workflows.saga import (
    Compensation,
    Decision,
    SagaDefinition,
    Step,
    StepError,
    begin,
    step_failed,
    step_succeeded,
)


def _record() -> MigrationRecord:
    return MigrationRecord(
        id="m1", container="web", source="h1", destination="h2",
        strategy=StrategyChoice(chosen="post-copy", reason="requested"),
        trace_id="0" * 32, traceparent="", created_at=0.0, updated_at=0.0, deadline=0.0,
    )  # fmt: skip


def _only(decision: Decision) -> StepCommand:
    assert len(decision.commands) == 1, decision.commands
    return decision.commands[0]


def _until(step: str) -> Decision:
    decision = begin(POST_COPY, _record(), now=1.0)
    while _only(decision).step != step:
        decision = step_succeeded(POST_COPY, decision.record, _only(decision), None, now=2.0)
    return decision


def test_pages_lost_after_the_commit_fall_back_to_the_stopped_source() -> None:
    decision = _until("drain_pages")
    assert decision.record.committed
    lost = StepError("the lazy-pages daemon exited 137: pages may be missing", retryable=False)
    decision = step_failed(POST_COPY, decision.record, _only(decision), lost, now=3.0)
    ran = []
    while decision.commands:
        cmd = _only(decision)
        assert cmd.kind == "compensation"
        ran.append((cmd.step, decision.record.steps[-1].host))
        decision = step_succeeded(POST_COPY, decision.record, cmd, None, now=4.0)
    # The corrupt copy stops first; only then does the placement move back and the
    # source continue: never two copies running.
    assert ran == [
        ("stop_destination", "h2"),
        ("uncommit", "h2"),
        ("resume_source", "h1"),
        ("discard_destination", "h2"),
    ]
    record = decision.record
    assert record.state == "rolled_back"
    assert record.error is not None and "fell back to h1" in record.error
    assert "drain_pages failed after the commit" in record.error
    drain = next(s for s in record.steps if s.name == "drain_pages")
    assert drain.status == "compensated"
    restore = next(s for s in record.steps if s.name == "restore")
    assert restore.status == "done", "the fallback is not the restore's compensation"


def test_a_retryable_drain_failure_is_retried_before_falling_back() -> None:
    decision = _until("drain_pages")
    slow = StepError("the lazy-pages daemon still runs", retryable=True)
    again = step_failed(POST_COPY, decision.record, _only(decision), slow, now=3.0)
    assert (_only(again).step, _only(again).attempt) == ("drain_pages", 2)


def test_a_failing_fallback_action_ends_the_migration_failed() -> None:
    decision = _until("drain_pages")
    lost = StepError("daemon died", retryable=False)
    decision = step_failed(POST_COPY, decision.record, _only(decision), lost, now=3.0)
    gone = StepError("h2 unreachable", retryable=False)
    for _ in range(3):  # its retry policy allows three attempts
        decision = step_failed(POST_COPY, decision.record, _only(decision), gone, now=4.0)
        if not decision.commands:
            break
    assert decision.record.state == "failed"
    assert decision.record.error is not None and "stop_destination" in decision.record.error


def test_steps_after_the_commit_without_a_fallback_still_end_failed() -> None:
    decision = _until("clean_source")
    decision = step_failed(
        POST_COPY, decision.record, _only(decision), StepError("disk", False), now=3.0
    )
    assert decision.record.state == "failed" and not decision.commands


def test_a_fallback_is_refused_before_the_commit() -> None:
    undo = Compensation("undo", role="source", side="source")
    with pytest.raises(ValueError, match="before the commit"):
        SagaDefinition(
            name="bad",
            steps=(Step("a", "source", "source", fallback=(undo,)), Step("c", "source", "source")),
            commit_after="c",
        )
