"""The migration record (the saga's durable state) and the step command, version 2.

A command says only what to run — migration id, step, kind, attempt, and the host and role
that must run it; the worker takes everything else from the record, which is the truth.
The record holds the request's options and each step's typed result.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import Field, ValidationError, model_validator

from schemas import subjects
from schemas.v1.base import Part
from schemas.v1.containers import ContainerNameStr, HostNameStr
from schemas.v1.fleet import PlacementChoice
from schemas.v1.migrations import (
    FaultPoint,
    MigrationState,
    Role,
    StepKind,
    StepRecord,
    StrategyChoice,
)
from schemas.v1.types import MigrationId
from schemas.v2.base import Message
from schemas.v2.forecast import FreezeForecast
from schemas.v2.results import RESULT_TYPES, StepResults

ChosenStrategy = Literal["stop-and-copy", "post-copy", "pre-copy"]
SUPPORTED_RECORD_VERSIONS = (1, 2)


class MigrationOptions(Part):
    """What the request asked for, as every step needs it."""

    downtime_budget_ms: int = Field(default=300, ge=10, le=600_000)
    compress: bool = False
    block_deltas: bool = True
    bandwidth_limit_bps: int | None = Field(default=None, gt=0)
    inject_fault: FaultPoint | None = Field(
        default=None, description="test only; honoured on hosts run with FERRY_ALLOW_FAULTS=1"
    )
    way_back_deadline_s: float = Field(
        default=6 * 3600.0,
        ge=60,
        le=7 * 24 * 3600.0,
        description="how long a step that brings back the only copy keeps retrying",
    )


class MigrationRecord(Message):
    """The durable state of one migration (KV ferry-migrations, compare-and-set only)."""

    id: MigrationId
    container: ContainerNameStr
    source: HostNameStr
    destination: HostNameStr
    state: MigrationState = "running"
    strategy: StrategyChoice
    trace_id: str
    traceparent: str
    created_at: float
    updated_at: float
    deadline: float
    committed: bool = False
    requested_by: str = Field(
        default="", description="the bus identity that asked for the move (audit)"
    )
    cancel_requested: str | None = Field(
        default=None, description="why an operator or the watchdog asked to stop"
    )
    steps: tuple[StepRecord, ...] = ()
    options: MigrationOptions = Field(default_factory=MigrationOptions)
    results: StepResults = Field(default_factory=StepResults)
    bytes_moved: int = 0
    freeze_ms: int | None = None
    forecast: FreezeForecast | None = Field(
        default=None, description="the freeze forecast at intake, beside the measured one"
    )
    error: str | None = None
    placement: PlacementChoice | None = Field(
        default=None, description="how the fleet controller chose the destination, and why"
    )

    @model_validator(mode="after")
    def _strategy_is_chosen(self) -> MigrationRecord:
        if self.strategy.chosen == "auto":
            raise ValueError("a record names the strategy auto chose, never 'auto' itself")
        return self

    @property
    def chosen(self) -> ChosenStrategy:
        """The strategy this migration runs (the saga definition's name)."""
        return cast(ChosenStrategy, self.strategy.chosen)

    def public(self) -> dict[str, Any]:
        """The record as `ferry status --json` shows it."""
        return self.model_dump(mode="json", exclude={"traceparent", "schema_version"})


class StepCommand(Message):
    """Run one step (or compensation) of a migration; published on the work-queue stream."""

    migration_id: MigrationId
    step: str
    kind: StepKind = "forward"
    attempt: int = Field(ge=1)
    host: HostNameStr
    role: Role
    not_before: float = 0.0

    @property
    def msg_id(self) -> str:
        """Nats-Msg-Id: publishing the same command again after a crash is a no-op."""
        return subjects.command_msg_id(self.migration_id, self.kind, self.step, self.attempt)


def _upcast_record_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A v1 record's `facts` bag becomes options and per-step results.

    A v1 fact belongs to the step whose result model names it; only steps that finished
    get a result, and a step whose v1 facts do not make a valid result gets none.
    """
    facts: dict[str, Any] = dict(raw.pop("facts", None) or {})
    options = {
        key: facts[key]
        for key in MigrationOptions.model_fields
        if key in facts and facts[key] is not None
    }
    if isinstance(facts.get("listening_ports"), str):  # v1 kept the list as JSON in a string
        try:
            facts["listening_ports"] = json.loads(facts["listening_ports"])
        except ValueError:
            facts.pop("listening_ports")
    finished = {s.get("name") for s in raw.get("steps", ()) if s.get("status") == "done"}
    results: dict[str, Any] = {}
    for step, model in RESULT_TYPES.items():
        if step not in finished:
            continue
        values = {name: facts[name] for name in model.model_fields if name in facts}
        if step == "clean_source" and "pages_written" in facts:
            values["pages_served"] = facts["pages_written"]
        try:
            results[step] = model.model_validate(values).model_dump()
        except ValidationError:
            continue
    return {**raw, "schema_version": 2, "options": options, "results": results}


def read_record(data: bytes) -> MigrationRecord:
    """A stored record of any supported version, as v2. ValueError if it is unreadable."""
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError("a migration record must be a JSON object")
    version = raw.get("schema_version", 1)
    if version not in SUPPORTED_RECORD_VERSIONS:
        raise ValueError(f"migration record schema_version {version!r} is not supported")
    if version == 1:
        raw = _upcast_record_v1(raw)
    return MigrationRecord.model_validate(raw)


def read_command(data: bytes, host: str, role: str) -> StepCommand:
    """A step command as v2. A v1 command named no host or role: it takes those of the
    subject it was delivered on, which the worker then checks against the record."""
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError("a step command must be a JSON object")
    if raw.get("schema_version", 1) == 1:
        raw = {
            **{k: raw[k] for k in ("migration_id", "step", "kind", "attempt") if k in raw},
            "not_before": raw.get("not_before", 0.0),
            "host": host,
            "role": role,
            "schema_version": 2,
        }
    return StepCommand.model_validate(raw)
