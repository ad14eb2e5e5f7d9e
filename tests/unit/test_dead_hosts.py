"""A host an operator declared dead: the saga skips what can run only there, gives up a way back
whose copy was there, and `ferry recover` falls post-copy back to its stopped source."""

from __future__ import annotations

import pytest

from schemas.v1.migrations import StepFinished
from tests.support.records import placement
from tests.support.saga import only, run_until
from workflows.dead_hosts import NotRecoverable, past_dead_hosts, placement_back, recover
from workflows.post_copy import POST_COPY
from workflows.saga import Decision, SagaDefinition, StepError, step_failed, step_succeeded
from workflows.stop_and_copy import STOP_AND_COPY

DEAD = {"h2": "its disks burned"}


def restore_failed(definition: SagaDefinition) -> Decision:
    """The restore on h2 failed for good: the saga starts compensating on h2."""
    decision = run_until("restore", definition)
    gone = StepError("h2 stopped answering", retryable=False)
    decision = step_failed(definition, decision.record, only(decision), gone, now=3.0)
    assert (only(decision).step, only(decision).host) == ("stop_destination", "h2")
    return decision


def statuses(decision: Decision) -> list[tuple[str, str, str]]:
    return [(s.name, s.kind, s.status) for s in decision.record.steps if s.kind == "compensation"]


def test_nothing_changes_while_no_host_it_needs_is_declared_dead() -> None:
    decision = restore_failed(STOP_AND_COPY)
    assert past_dead_hosts(STOP_AND_COPY, decision.record, {}, now=4.0) is None
    assert past_dead_hosts(STOP_AND_COPY, decision.record, {"h3": "gone"}, now=4.0) is None


def test_post_copy_skips_the_dead_destination_and_resumes_its_stopped_source() -> None:
    decision = restore_failed(POST_COPY)
    skipped = past_dead_hosts(POST_COPY, decision.record, DEAD, now=4.0)
    assert skipped is not None
    stop = next(s for s in skipped.record.steps if s.name == "stop_destination")
    assert stop.status == "skipped"
    assert stop.error == "nothing can run on h2, declared dead by an operator: its disks burned"
    assert [e.status for e in skipped.events if isinstance(e, StepFinished)] == ["skipped"]
    # Post-copy's pages wait on the source: its resume needs nothing of h2.
    assert (only(skipped).step, only(skipped).host) == ("resume_source", "h1")
    decision = skipped
    while only(decision).host == "h1":
        decision = step_succeeded(POST_COPY, decision.record, only(decision), None, now=5.0)
    assert (only(decision).step, only(decision).host) == ("discard_destination", "h2")
    done = past_dead_hosts(POST_COPY, decision.record, DEAD, now=6.0)
    assert done is not None and not done.commands
    assert done.record.state == "rolled_back"
    assert statuses(done) == [
        ("stop_destination", "compensation", "skipped"),
        ("resume_source", "compensation", "done"),
        ("forget_presync", "compensation", "done"),
        ("discard_destination", "compensation", "skipped"),
    ]


def test_stop_and_copy_cannot_resume_once_its_pages_went_to_the_dead_destination() -> None:
    decision = restore_failed(STOP_AND_COPY)
    ended = past_dead_hosts(STOP_AND_COPY, decision.record, DEAD, now=4.0)
    assert ended is not None and not ended.commands
    assert ended.record.state == "failed"
    assert ended.record.error == (
        "compensation resume_source failed: its memory was on h2,"
        " declared dead by an operator: its disks burned"
    )
    resume = next(s for s in ended.record.steps if s.name == "resume_source")
    assert resume.status == "failed"


def test_a_resume_that_keeps_retrying_fails_for_good_once_the_destination_is_declared() -> None:
    decision = restore_failed(STOP_AND_COPY)
    decision = step_succeeded(STOP_AND_COPY, decision.record, only(decision), None, now=4.0)
    refused = StepError("connection refused by h2's transfer service", retryable=True)
    decision = step_failed(STOP_AND_COPY, decision.record, only(decision), refused, now=5.0)
    assert (only(decision).step, only(decision).attempt) == ("resume_source", 2)
    ended = past_dead_hosts(STOP_AND_COPY, decision.record, DEAD, now=6.0)
    assert ended is not None and ended.record.state == "failed"


def test_a_dump_that_failed_may_have_left_the_container_on_the_source() -> None:
    decision = run_until("dump", STOP_AND_COPY)
    failed = StepError("criu dump failed", retryable=False)
    decision = step_failed(STOP_AND_COPY, decision.record, only(decision), failed, now=3.0)
    assert only(decision).step == "resume_source"
    assert past_dead_hosts(STOP_AND_COPY, decision.record, DEAD, now=4.0) is None


def test_a_dead_source_ends_the_way_back_it_holds() -> None:
    decision = restore_failed(POST_COPY)
    ended = past_dead_hosts(POST_COPY, decision.record, {"h1": "flooded", **DEAD}, now=4.0)
    assert ended is not None and ended.record.state == "failed"
    assert ended.record.error is not None
    assert "the container's only copy was on h1, declared dead" in ended.record.error


def test_uncommit_is_never_skipped_only_ferry_recover_stands_in_for_it() -> None:
    decision = run_until("drain_pages", POST_COPY)
    lost = StepError("the lazy-pages daemon's host went away", retryable=False)
    decision = step_failed(POST_COPY, decision.record, only(decision), lost, now=3.0)
    moved = past_dead_hosts(POST_COPY, decision.record, DEAD, now=4.0)
    assert moved is not None
    assert (only(moved).step, only(moved).host) == ("uncommit", "h2")
    assert past_dead_hosts(POST_COPY, moved.record, DEAD, now=5.0) is None


# -- ferry recover ---------------------------------------------------------------------------


def test_recover_falls_post_copy_back_to_the_source_when_the_destination_died_after_commit() -> (
    None
):
    decision = run_until("open_network", POST_COPY)
    assert decision.record.committed
    recovery = recover(POST_COPY, decision.record, DEAD, now=4.0)
    assert recovery.possible and recovery.decision is not None
    assert "web continues on h1 from the copy it kept stopped" in recovery.reason
    assert recovery.actions[0] == "move the placement of web back to h1 (compare-and-set)"
    decision = recovery.decision
    assert (only(decision).step, only(decision).host) == ("resume_source", "h1")
    assert decision.record.state == "compensating"
    steps = {(s.name, s.kind): s.status for s in decision.record.steps}
    assert steps[("open_network", "forward")] == "skipped"
    assert steps[("drain_pages", "forward")] == "failed"
    assert steps[("stop_destination", "compensation")] == "skipped"
    assert steps[("uncommit", "compensation")] == "skipped"
    decision = step_succeeded(POST_COPY, decision.record, only(decision), None, now=5.0)
    assert (only(decision).step, only(decision).host) == ("discard_destination", "h2")
    done = past_dead_hosts(POST_COPY, decision.record, DEAD, now=6.0)
    assert done is not None and done.record.state == "rolled_back"
    assert done.record.error is not None
    assert "the destination h2, declared dead by an operator: its disks burned" in (
        done.record.error
    )
    assert "fell back to h1" in done.record.error


def test_recover_takes_over_a_fallback_stuck_on_the_dead_destination() -> None:
    decision = run_until("drain_pages", POST_COPY)
    lost = StepError("the lazy-pages daemon died", retryable=False)
    decision = step_failed(POST_COPY, decision.record, only(decision), lost, now=3.0)
    moved = past_dead_hosts(POST_COPY, decision.record, DEAD, now=4.0)
    assert moved is not None and only(moved).step == "uncommit"
    recovery = recover(POST_COPY, moved.record, DEAD, now=5.0)
    assert recovery.decision is not None
    assert only(recovery.decision).step == "resume_source"
    names = [(s.name, s.status) for s in recovery.decision.record.steps if s.kind == "compensation"]
    assert names == [
        ("stop_destination", "skipped"),
        ("uncommit", "skipped"),
        ("resume_source", "running"),
    ]


def test_recover_also_takes_a_fallback_that_ended_failed() -> None:
    decision = run_until("drain_pages", POST_COPY)
    lost = StepError("daemon died", retryable=False)
    decision = step_failed(POST_COPY, decision.record, only(decision), lost, now=3.0)
    for _ in range(3):  # stop_destination on the silent h2, before anyone declared it dead
        decision = step_failed(
            POST_COPY, decision.record, only(decision), StepError("silent", False), now=4.0
        )
        if not decision.commands:
            break
    assert decision.record.state == "failed"
    recovery = recover(POST_COPY, decision.record, DEAD, now=5.0)
    assert recovery.possible and recovery.decision is not None
    assert only(recovery.decision).step == "resume_source"


def test_recover_says_stop_and_copy_cannot_come_back_and_changes_nothing() -> None:
    decision = run_until("open_network", STOP_AND_COPY)
    recovery = recover(STOP_AND_COPY, decision.record, DEAD, now=4.0)
    assert not recovery.possible and recovery.decision is None
    assert recovery.reason == (
        "web cannot come back: its only copy was on h2, declared dead by an operator:"
        " its disks burned (stop-and-copy: its memory left h1 at the dump)"
    )


def test_recover_cannot_bring_back_what_clean_source_removed() -> None:
    decision = run_until("clean_source", POST_COPY)
    recovery = recover(POST_COPY, decision.record, DEAD, now=4.0)
    assert not recovery.possible and "clean_source" in recovery.reason


@pytest.mark.parametrize(
    ("until", "dead", "words"),
    [
        ("open_network", {}, "is not declared dead"),
        ("verify", DEAD, "never committed"),
    ],
)
def test_recover_refuses_without_its_evidence(until: str, dead: dict[str, str], words: str) -> None:
    decision = run_until(until, POST_COPY)
    with pytest.raises(NotRecoverable, match=words):
        recover(POST_COPY, decision.record, dead, now=4.0)


def test_the_placement_moves_back_once_and_only_from_this_migrations_destination() -> None:
    record = run_until("open_network", POST_COPY).record
    on_dest = placement(host="h2", state="running", migration_id=record.id)
    back = placement_back(on_dest, record)
    assert back is not None
    assert (back.host, back.state, back.migration_id) == ("h1", "migrating", record.id)
    assert placement_back(back, record) is None, "a second run writes nothing"
    unlocked = placement(host="h2", migration_id=None)  # a failed end released the lock
    assert placement_back(unlocked, record) is not None
    for foreign in (
        placement(host="h3", migration_id=record.id),
        placement(host="h2", migration_id="ffffffffffffffff"),
    ):
        with pytest.raises(ValueError, match="not migration"):
            placement_back(foreign, record)


def _stop_destination_ran_out(definition: SagaDefinition) -> Decision:
    """Before anyone declared h2 dead, stopping its copy failed three times: the saga failed."""
    decision = restore_failed(definition)
    while decision.commands:
        silent = StepError("stop_destination (h2) not taken by any worker", retryable=True)
        decision = step_failed(definition, decision.record, only(decision), silent, now=4.0)
    assert decision.record.state == "failed" and not decision.record.committed
    return decision


def test_recover_takes_up_a_way_back_that_failed_on_the_dead_host_before_the_commit() -> None:
    decision = _stop_destination_ran_out(POST_COPY)
    recovery = recover(POST_COPY, decision.record, DEAD, now=5.0)
    assert recovery.possible and not recovery.moves_placement
    assert recovery.decision is not None
    assert (only(recovery.decision).step, only(recovery.decision).host) == ("resume_source", "h1")
    assert recovery.actions[-1] == "run resume_source on h1"
    stop = next(s for s in recovery.decision.record.steps if s.name == "stop_destination")
    assert stop.status == "skipped"


def test_recover_of_a_failed_stop_and_copy_way_back_says_its_memory_was_on_the_dead_host() -> None:
    decision = _stop_destination_ran_out(STOP_AND_COPY)
    recovery = recover(STOP_AND_COPY, decision.record, DEAD, now=5.0)
    assert not recovery.possible
    assert "its memory was on h2, declared dead by an operator" in recovery.reason
