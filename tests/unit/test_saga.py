"""The saga engine, driven through whole migrations with every outcome at every step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.v2.migrations import StepCommand
from schemas.v2.results import RestoreResult
from tests.support.saga import new_record, only, run_until
from workflows.saga import (
    NO_RETRY,
    Compensation,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepError,
    begin,
    can_roll_forward,
    pending_commands,
    roll_forward,
    step_failed,
    step_succeeded,
)
from workflows.stop_and_copy import RESUME_SOURCE, STOP_AND_COPY

FORWARD = [s.name for s in STOP_AND_COPY.steps]


def test_a_clean_run_walks_every_step_in_order_on_the_right_hosts() -> None:
    decision = begin(STOP_AND_COPY, new_record(), now=1.0)
    seen = []
    while decision.commands:
        cmd = only(decision)
        seen.append((cmd.step, decision.record.steps[-1].host))
        result = RestoreResult(running_at=2.0, freeze_ms=420) if cmd.step == "restore" else None
        decision = step_succeeded(
            STOP_AND_COPY, decision.record, cmd, result, now=2.0, bytes_moved=10
        )
    assert [name for name, _ in seen] == FORWARD
    hosts = dict(seen)
    assert hosts["dump"] == "h1" and hosts["restore"] == "h2" and hosts["clean_source"] == "h1"
    record = decision.record
    assert record.state == "completed" and record.committed
    assert record.freeze_ms == 420 and record.bytes_moved == 10 * len(FORWARD)
    assert [s.status for s in record.steps] == ["done"] * len(FORWARD)
    assert decision.events[-1].type == "finished"  # type: ignore[attr-defined]


def test_a_retryable_failure_runs_the_step_again_after_its_backoff() -> None:
    decision = run_until("transfer")
    cmd = only(decision)
    retry = step_failed(STOP_AND_COPY, decision.record, cmd, StepError("reset", True), now=5.0)
    again = only(retry)
    assert (again.step, again.attempt) == ("transfer", 2)
    assert again.not_before == pytest.approx(5.5)
    assert retry.record.steps[-1].attempts == 2 and retry.record.steps[-1].error == "reset"


def test_failure_before_commit_compensates_in_reverse_and_rolls_back() -> None:
    decision = run_until("restore")
    decision = step_failed(
        STOP_AND_COPY, decision.record, only(decision), StepError("restore said no", False), 3.0
    )
    undone = []
    while decision.commands:
        cmd = only(decision)
        assert cmd.kind == "compensation"
        undone.append(cmd.step)
        decision = step_succeeded(STOP_AND_COPY, decision.record, cmd, None, now=4.0)
    assert undone == ["stop_destination", "resume_source", "forget_presync", "discard_destination"]
    record = decision.record
    assert record.state == "rolled_back" and not record.committed
    assert "restore said no" in (record.error or "")
    statuses = {(s.name, s.kind): s.status for s in record.steps}
    assert statuses[("restore", "forward")] == "compensated"
    assert statuses[("dump", "forward")] == "compensated"
    assert statuses[("transfer", "forward")] == "done"  # nothing to undo there
    assert statuses[("resume_source", "compensation")] == "done"


def test_failure_after_commit_never_rolls_back() -> None:
    decision = run_until("clean_source")
    assert decision.record.committed
    cmd = only(decision)
    for attempt in range(1, 6):
        decision = step_failed(
            STOP_AND_COPY, decision.record, cmd, StepError("rm: busy", True), 9.0
        )
        if attempt < 5:
            cmd = only(decision)
    assert decision.commands == ()
    assert decision.record.state == "failed"
    assert all(s.kind == "forward" for s in decision.record.steps)


def test_a_closed_network_after_the_commit_is_retried_until_the_way_back_deadline() -> None:
    decision = run_until("open_network")
    cmd = only(decision)
    first = cmd
    deadline = decision.record.options.way_back_deadline_s
    started = decision.record.steps[-1].first_started_at or 0.0
    for _ in range(20):  # far past max_attempts: the only copy must become reachable
        decision = step_failed(STOP_AND_COPY, decision.record, cmd, StepError("ip", True), 9.0)
        cmd = only(decision)
    assert cmd.step == first.step and cmd.attempt == 21
    assert cmd.not_before - 9.0 == 30.0  # at the last backoff
    late = step_failed(
        STOP_AND_COPY, decision.record, cmd, StepError("ip", True), started + deadline + 1
    )
    assert late.record.state == "failed" and late.commands == ()


def test_the_way_back_keeps_trying_and_fails_only_past_its_deadline_or_for_good() -> None:
    decision = run_until("dump")
    decision = step_failed(
        STOP_AND_COPY, decision.record, only(decision), StepError("x", False), 3.0
    )
    cmd = only(decision)
    assert cmd.step == "resume_source"
    for _ in range(3 * RESUME_SOURCE.retry.max_attempts):  # past what its policy counts
        decision = step_failed(
            STOP_AND_COPY, decision.record, cmd, StepError("no pages", True), 4.0
        )
        cmd = only(decision)
        assert decision.record.state == "compensating"
    # A failure that no retry can help ends it, and says so.
    decision = step_failed(
        STOP_AND_COPY, decision.record, cmd, StepError("criu: bad image", False), 5.0
    )
    assert decision.record.state == "failed"
    assert "resume_source" in (decision.record.error or "")


def test_a_commit_the_record_never_saw_rolls_forward_before_anything_is_undone() -> None:
    decision = run_until("commit")
    commit = only(decision)
    # The watchdog gave up on the commit (its worker went silent after the CAS).
    failed = step_failed(STOP_AND_COPY, decision.record, commit, StepError("silent", True), 5.0)
    for _ in range(2):
        failed = step_failed(STOP_AND_COPY, failed.record, only(failed), StepError("s", True), 6)
    stop = only(failed)
    assert stop.step == "stop_destination" and failed.record.state == "compensating"
    assert can_roll_forward(STOP_AND_COPY, failed.record)
    forward = roll_forward(STOP_AND_COPY, failed.record, "placement names h2", 7.0)
    assert forward.record.committed and forward.record.state == "running"
    assert [c.step for c in forward.commands] == ["open_network"]
    statuses = {(s.name, s.kind): s.status for s in forward.record.steps}
    assert statuses[("commit", "forward")] == "done"
    assert statuses[("stop_destination", "compensation")] == "skipped"
    # Once a compensation has run, going forward is no longer safe.
    undone = step_succeeded(STOP_AND_COPY, failed.record, stop, None, 8.0)
    assert not can_roll_forward(STOP_AND_COPY, undone.record)
    assert not roll_forward(STOP_AND_COPY, undone.record, "late", 9.0).changed
    # Nor is there anything to roll forward before the commit ran.
    assert not can_roll_forward(STOP_AND_COPY, run_until("verify").record)


def test_a_stale_or_duplicate_outcome_changes_nothing_and_repeats_the_current_command() -> None:
    decision = run_until("transfer")
    old = step_succeeded(STOP_AND_COPY, decision.record, only(decision), None, now=3.0)
    duplicate = step_succeeded(STOP_AND_COPY, old.record, only(decision), None, now=4.0)
    assert not duplicate.changed and duplicate.record == old.record
    assert duplicate.commands == pending_commands(old.record) == old.commands


def test_definitions_refuse_compensation_after_commit_and_unknown_commit() -> None:
    undo = Compensation("undo", role="source", side="source")
    with pytest.raises(ValueError, match="after the commit"):
        SagaDefinition(
            "bad",
            (Step("a", "source", "source"), Step("b", "source", "source", compensation=undo)),
            commit_after="a",
        )
    with pytest.raises(ValueError, match="not a step"):
        SagaDefinition("bad", (Step("a", "source", "source"),), commit_after="zzz")


def test_retry_policy_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=9, backoff_s=(1.0, 2.0))
    assert [policy.delay_before(a) for a in (1, 2, 3, 4, 9)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert NO_RETRY.delay_before(2) == 0.0


outcome = st.sampled_from(["ok", "transient", "fatal"])


@settings(max_examples=300, deadline=None)
@given(st.lists(outcome, min_size=1, max_size=60))
def test_any_sequence_of_outcomes_ends_safely(outcomes: list[str]) -> None:
    """Whatever fails, whenever: the saga ends in one terminal state, never undoes anything
    after the commit, and undoes what it undoes in reverse order."""
    decision = begin(STOP_AND_COPY, new_record(), now=0.0)
    moves = iter(outcomes)
    for _ in range(200):
        if not decision.commands:
            break
        cmd = only(decision)
        what = next(moves, "ok")
        if what == "ok":
            decision = step_succeeded(STOP_AND_COPY, decision.record, cmd, None, now=1.0)
        else:
            error = StepError(what, what == "transient")
            decision = step_failed(STOP_AND_COPY, decision.record, cmd, error, now=1.0)
    record = decision.record
    assert record.state in ("completed", "rolled_back", "failed")
    compensations = [s.name for s in record.steps if s.kind == "compensation"]
    if record.committed:
        assert compensations == []
    order = ["stop_destination", "resume_source", "forget_presync", "discard_destination"]
    assert compensations == [c for c in order if c in compensations]
    if record.state == "completed":
        assert all(s.status == "done" for s in record.steps)
    if record.state == "rolled_back":
        assert not record.committed


# Which copy of the container runs, as the steps' side effects leave it.
STARTS_DESTINATION = {("restore", "forward")}
STOPS_SOURCE = {("dump", "forward")}
STOPS_DESTINATION = {("stop_destination", "compensation"), ("discard_destination", "compensation")}
STARTS_SOURCE = {("resume_source", "compensation")}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_duplicated_reordered_and_redelivered_outcomes_keep_one_copy_running(
    data: st.DataObject,
) -> None:
    """A delivery model with crashes: outcomes arrive late, twice, or for commands that were
    already superseded; a worker may crash before acking (the command comes back). The engine
    must only ever act on the current command, so the side effects it lets happen never leave
    two copies running, and the saga ends with exactly one."""
    decision = begin(STOP_AND_COPY, new_record(), now=0.0)
    record = decision.record
    inbox: list[StepCommand] = list(decision.commands)  # published, not yet acked
    delivered: list[StepCommand] = []  # every command some worker ran
    source_runs, destination_runs = True, False
    for _ in range(300):
        if record.state in ("completed", "rolled_back", "failed") and not inbox:
            break
        pool = inbox + delivered
        cmd = data.draw(st.sampled_from(pool)) if pool else None
        if cmd is None:
            break
        action = data.draw(st.sampled_from(["ok", "ok", "ok", "transient", "fatal", "crash"]))
        if cmd in inbox:
            inbox.remove(cmd)
        delivered.append(cmd)
        if action == "crash":  # ran (maybe), never acked: JetStream delivers it again
            inbox.append(cmd)
            continue
        if action == "ok":
            decision = step_succeeded(STOP_AND_COPY, record, cmd, None, now=1.0)
        else:
            error = StepError(action, action == "transient")
            decision = step_failed(STOP_AND_COPY, record, cmd, error, now=1.0)
        if decision.changed and action == "ok":
            key = (cmd.step, cmd.kind)
            source_runs = (source_runs and key not in STOPS_SOURCE) or key in STARTS_SOURCE
            destination_runs = (
                destination_runs and key not in STOPS_DESTINATION
            ) or key in STARTS_DESTINATION
            assert not (source_runs and destination_runs), f"two copies after {key}"
        record = decision.record
        inbox.extend(c for c in decision.commands if c not in inbox)
    # Drive whatever is still pending to the end with successes.
    for _ in range(100):
        if record.state in ("completed", "rolled_back", "failed"):
            break
        cmd = pending_commands(record)[0]
        decision = step_succeeded(STOP_AND_COPY, record, cmd, None, now=2.0)
        key = (cmd.step, cmd.kind)
        source_runs = (source_runs and key not in STOPS_SOURCE) or key in STARTS_SOURCE
        destination_runs = (
            destination_runs and key not in STOPS_DESTINATION
        ) or key in STARTS_DESTINATION
        record = decision.record
    assert record.state in ("completed", "rolled_back", "failed")
    if record.state == "completed":
        assert destination_runs and not source_runs
    if record.state == "rolled_back":
        assert source_runs and not destination_runs
    compensations = [s.name for s in record.steps if s.kind == "compensation"]
    order = ["stop_destination", "resume_source", "forget_presync", "discard_destination"]
    assert compensations == [c for c in order if c in compensations]


def test_cancel_stops_at_the_next_step_boundary_and_compensates() -> None:
    from workflows.saga import request_cancel

    decision = run_until("transfer")
    record = request_cancel(decision.record, "operator asked", now=3.0)
    assert record.cancel_requested == "operator asked"
    after = step_succeeded(STOP_AND_COPY, record, only(decision), None, now=4.0)
    cmd = only(after)
    assert (cmd.kind, cmd.step) == ("compensation", "resume_source")
    while after.commands:
        after = step_succeeded(STOP_AND_COPY, after.record, only(after), None, now=5.0)
    assert after.record.state == "rolled_back"
    assert after.record.error == "cancelled: operator asked"


def test_cancel_is_refused_after_the_commit() -> None:
    from workflows.saga import request_cancel

    decision = run_until("open_network")
    with pytest.raises(ValueError, match="commit"):
        request_cancel(decision.record, "too late", now=1.0)
