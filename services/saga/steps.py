"""What a saga step handler receives and returns. No NATS here.

A handler gets the command (what to run) together with the migration record (the truth
about what it runs on): container, hosts, strategy, the request's options and the typed
results of earlier steps all come from the record, never from the message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from schemas.v1.containers import Placement
from schemas.v2.migrations import ChosenStrategy, MigrationOptions, MigrationRecord, StepCommand
from schemas.v2.results import StepResult, StepResults
from services.errors import RuntimeFailure
from services.retrying import transient
from services.stores import PlacementStore

T = TypeVar("T")


@dataclass(frozen=True)
class StepOutcome:
    """What a successful step hands on: its typed result for later steps, bytes it moved."""

    result: StepResult | None = None
    bytes_moved: int = 0


@dataclass(frozen=True)
class StepRun:
    """One delivery of a step command, read against the record it belongs to."""

    command: StepCommand
    record: MigrationRecord

    @property
    def migration_id(self) -> str:
        return self.record.id

    @property
    def container(self) -> str:
        return self.record.container

    @property
    def source(self) -> str:
        return self.record.source

    @property
    def destination(self) -> str:
        return self.record.destination

    @property
    def strategy(self) -> ChosenStrategy:
        return self.record.chosen

    @property
    def options(self) -> MigrationOptions:
        return self.record.options

    @property
    def results(self) -> StepResults:
        return self.record.results

    def needs(self, result: T | None, what: str) -> T:
        """An earlier step's result this step cannot do without."""
        if result is None:
            raise RuntimeFailure(
                f"{self.command.step} needs the result of {what}, which the record lacks"
            )
        return result


Progress = Callable[[str, int | None, int | None], Awaitable[None]]
StepHandler = Callable[[StepRun, Progress], Awaitable[StepOutcome]]


@transient  # a read: asking again after a bus hiccup is safe, and keeps the step alive
async def placement_of(run: StepRun, placements: PlacementStore) -> Placement:
    found = await placements.get(run.container)
    if found is None:
        # Unknown, not "nowhere": a store being rebuilt may bring it back.
        raise RuntimeFailure(
            f"the placement of {run.container} is missing during the migration", retryable=True
        )
    return found[0]
