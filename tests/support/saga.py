"""Helpers for driving the saga engine in tests: a fresh record, the one command a decision
must hold, and a migration run up to a given step."""

from __future__ import annotations

from schemas.v1.migrations import StrategyChoice
from schemas.v2.migrations import MigrationRecord, StepCommand
from workflows.saga import Decision, SagaDefinition, begin, step_succeeded
from workflows.stop_and_copy import STOP_AND_COPY


def new_record(strategy: str = "stop-and-copy") -> MigrationRecord:
    return MigrationRecord(
        id="0123456789abcdef",
        container="web",
        source="h1",
        destination="h2",
        strategy=StrategyChoice(chosen=strategy, reason="requested"),  # type: ignore[arg-type]
        trace_id="0" * 32,
        traceparent="",
        created_at=0.0,
        updated_at=0.0,
        deadline=0.0,
    )


def only(decision: Decision) -> StepCommand:
    assert len(decision.commands) == 1, decision.commands
    return decision.commands[0]


def run_until(step: str, definition: SagaDefinition = STOP_AND_COPY) -> Decision:
    """A migration of `definition` whose steps before `step` all succeeded."""
    decision = begin(definition, new_record(definition.name), now=1.0)
    while only(decision).step != step:
        decision = step_succeeded(definition, decision.record, only(decision), None, now=2.0)
    return decision
