"""What a saga step handler receives and returns. No NATS here."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from schemas.v1.containers import Placement
from schemas.v1.migrations import Fact, StepCommand
from services.errors import RuntimeFailure
from services.stores import PlacementStore


@dataclass
class StepOutcome:
    """What a successful step hands on: facts for later steps, bytes it moved."""

    facts: dict[str, Fact] = field(default_factory=dict)
    bytes_moved: int = 0


Progress = Callable[[str, int | None, int | None], Awaitable[None]]
StepHandler = Callable[[StepCommand, Progress], Awaitable[StepOutcome]]


def fact_str(cmd: StepCommand, key: str) -> str:
    value = cmd.facts.get(key)
    if not isinstance(value, str):
        raise RuntimeFailure(
            f"{cmd.step} needs fact {key!r} from an earlier step, which is missing"
        )
    return value


def fact_float(cmd: StepCommand, key: str) -> float:
    value = cmd.facts.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def strategy_of(cmd: StepCommand) -> str:
    value = cmd.facts.get("strategy")
    return value if isinstance(value, str) else "stop-and-copy"


def fact_ports(cmd: StepCommand) -> list[int]:
    return [int(p) for p in json.loads(fact_str(cmd, "listening_ports"))]


async def placement_of(cmd: StepCommand, placements: PlacementStore) -> Placement:
    found = await placements.get(cmd.container)
    if found is None:
        raise RuntimeFailure(f"placement of {cmd.container} vanished during the migration")
    return found[0]
