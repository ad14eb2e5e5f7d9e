"""Post-copy's fallback: a step after the commit that fails for good hands the container back
to the source (its copy waited stopped) instead of ending with no trustworthy copy."""

from __future__ import annotations

import pytest

from tests.support.saga import only, run_until
from workflows.post_copy import POST_COPY
from workflows.saga import (
    Compensation,
    SagaDefinition,
    Step,
    StepError,
    step_failed,
    step_succeeded,
)


def test_pages_lost_after_the_commit_fall_back_to_the_stopped_source() -> None:
    decision = run_until("drain_pages", POST_COPY)
    assert decision.record.committed
    lost = StepError("the lazy-pages daemon exited 137: pages may be missing", retryable=False)
    decision = step_failed(POST_COPY, decision.record, only(decision), lost, now=3.0)
    ran = []
    while decision.commands:
        cmd = only(decision)
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
    decision = run_until("drain_pages", POST_COPY)
    slow = StepError("the lazy-pages daemon still runs", retryable=True)
    again = step_failed(POST_COPY, decision.record, only(decision), slow, now=3.0)
    assert (only(again).step, only(again).attempt) == ("drain_pages", 2)


def test_a_failing_fallback_action_ends_the_migration_failed() -> None:
    decision = run_until("drain_pages", POST_COPY)
    lost = StepError("daemon died", retryable=False)
    decision = step_failed(POST_COPY, decision.record, only(decision), lost, now=3.0)
    gone = StepError("h2 unreachable", retryable=False)
    for _ in range(3):  # its retry policy allows three attempts
        decision = step_failed(POST_COPY, decision.record, only(decision), gone, now=4.0)
        if not decision.commands:
            break
    assert decision.record.state == "failed"
    assert decision.record.error is not None and "stop_destination" in decision.record.error


def test_steps_after_the_commit_without_a_fallback_still_end_failed() -> None:
    decision = run_until("clean_source", POST_COPY)
    decision = step_failed(
        POST_COPY, decision.record, only(decision), StepError("disk", False), now=3.0
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
