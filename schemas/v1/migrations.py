"""Migrations: the request other systems publish, the commands workers exchange, the events
they emit and the record that is the saga's durable state."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from schemas.v1.base import Message, Part
from schemas.v1.containers import ContainerNameStr, HostNameStr
from schemas.v1.types import EndpointStr, MigrationId

Strategy = Literal["stop-and-copy", "post-copy", "pre-copy", "auto"]
Role = Literal["source", "transfer", "destination", "cleanup"]
Side = Literal["source", "destination"]
StepKind = Literal["forward", "compensation"]
StepStatus = Literal["pending", "running", "done", "failed", "compensated", "skipped"]
MigrationState = Literal["running", "compensating", "completed", "rolled_back", "failed"]
Fact = str | int | float | bool | None
# Test-only faults (hosts must run with FERRY_ALLOW_FAULTS=1):
#   restore                 the destination's CRIU restore fails (a damaged image)
#   kill:STEP:before|after  the worker running STEP is SIGKILLed before/after its side effect
#   duplicate:STEP          STEP's command is delivered twice
#   corrupt:transfer        the first transfer's bytes are damaged on the way
#   lazy-pages-dies         post-copy: the destination's lazy-pages daemon is killed as
#                           drain_pages starts (after the commit), pages still at the source
#   silent:STEP:after       the worker running STEP goes silent right after its side effect
#                           (stops itself, as if cut off; it continues after
#                           FERRY_FAULT_SILENT_S on its host, default 120 s)
#   slow:STEP               the worker running STEP takes FERRY_FAULT_SLOW_S on its host
#                           (default 15 s) longer, alive and reporting progress meanwhile
#   pause:commit:cas        the destination stops itself for 2 s just before its commit's
#                           compare-and-set (make chaos cuts what NATS sends it meanwhile)
#   several at once, joined with "+" (e.g. restore+kill:resume_source:before)
_ONE_FAULT = (
    r"(restore|lazy-pages-dies|corrupt:transfer|duplicate:[a-z_]+|kill:[a-z_]+:(before|after)"
    r"|silent:[a-z_]+:after|slow:[a-z_]+|pause:commit:cas)"
)
FAULT_PATTERN = rf"^{_ONE_FAULT}(\+{_ONE_FAULT})*$"
FAULT_EXAMPLES = (
    "restore",
    "kill:dump:before",
    "duplicate:restore",
    "corrupt:transfer",
    "lazy-pages-dies",
)
FaultPoint = Annotated[str, StringConstraints(pattern=FAULT_PATTERN)]


class MigrationRequest(Message):
    """Move a running container to another host. Published on ferry.v1.migrations.request."""

    container: ContainerNameStr
    destination: HostNameStr | None = Field(
        default=None,
        description="the host to move it to; absent: the fleet controller's scheduler chooses",
    )
    source: HostNameStr | None = Field(
        default=None, description="if given, the host the container must be on now"
    )
    strategy: Strategy = Field(
        default="auto",
        description="auto picks the best strategy both hosts support for the downtime budget",
    )
    downtime_budget_ms: int | None = Field(
        default=None,
        ge=10,
        le=600_000,
        description="longest freeze the workload tolerates (QEMU's default is 300 ms). Given,"
        " it is a limit: a move whose forecast freeze is longer is refused, and auto picks a"
        " strategy that fits. Not given: the freeze is forecast and recorded, never refused,"
        " and pre-copy plans its rounds for 300 ms",
    )
    bandwidth_limit_mib_s: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="cap on Ferry's own file and image transfers, in MiB/s",
    )
    compress: bool = Field(default=False, description="compress file and image transfers")
    block_deltas: bool = Field(
        default=True,
        description="after the freeze, send a large changed file's changed blocks only"
        " (false: whole, as the bench's baseline)",
    )
    dry_run: bool = Field(
        default=False, description="only run the pre-flight checks; change nothing"
    )
    inject_fault: FaultPoint | None = Field(
        default=None,
        description="test only: make this step fail for real; refused unless the hosts"
        " run with FERRY_ALLOW_FAULTS=1 (`ferry lab up --allow-faults`)",
    )


class ForwardedRequest(Message):
    """A request passed on by the host whose intake took it to the host that holds the
    container (only the holder may lock its placement)."""

    request: MigrationRequest
    requested_by: str = Field(description="the identity that published the request")


class CheckResult(Part):
    """One pre-flight check on one host."""

    host: str
    check: str
    ok: bool
    detail: str = ""


class DryRunReport(Message):
    """Reply to a dry run: would the move work, and if not, why. Nothing was changed."""

    dry_run: Literal[True] = True
    ok: bool
    checks: tuple[CheckResult, ...]


class HostCheck(Message):
    """Ask a host whether it can play its part in a move (dry run)."""

    container: ContainerNameStr
    side: Side
    needed_bytes: int = 0


class HostCheckReply(Message):
    checks: tuple[CheckResult, ...]
    memory_bytes: int = 0


class StartPageServer(Message):
    """Pre-copy: ask the destination for a page server taking one round's pages."""

    migration_id: MigrationId
    images: str = Field(pattern=r"^(it-[1-9][0-9]?|images)$", description="it-N or images")
    parent: str | None = Field(
        default=None, pattern=r"^\.\./it-[1-9][0-9]?$", description="the previous round's dir"
    )


class PageServerStarted(Message):
    address: EndpointStr


class CancelRequest(Message):
    """Stop a migration before its commit; published on ferry.v1.migrations.cancel."""

    id: MigrationId
    reason: str = "cancelled by operator"


class CancelAccepted(Message):
    id: MigrationId
    state: str


class MigrationAccepted(Message):
    """Reply to an accepted request."""

    id: MigrationId


class StrategyChoice(Part):
    chosen: Strategy
    reason: str


class StepRecord(Part):
    """One forward step or compensation as it happened."""

    name: str
    kind: StepKind = "forward"
    role: Role
    host: str
    status: StepStatus = "pending"
    attempts: int = Field(default=0, ge=0)
    started_at: float | None = None
    first_started_at: float | None = Field(
        default=None, description="when its first attempt started (retries keep it)"
    )
    finished_at: float | None = None
    duration_ms: int | None = None
    error: str | None = None


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
    cancel_requested: str | None = Field(
        default=None, description="why an operator or the watchdog asked to stop"
    )
    steps: tuple[StepRecord, ...] = ()
    facts: dict[str, Fact] = Field(default_factory=dict)
    bytes_moved: int = 0
    freeze_ms: int | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        """The record as `ferry status --json` shows it."""
        return self.model_dump(mode="json", exclude={"facts", "traceparent", "schema_version"})


class StepCommand(Message):
    """Run one step (or compensation) of a migration; published on the work-queue stream."""

    migration_id: MigrationId
    step: str
    kind: StepKind = "forward"
    attempt: int = Field(ge=1)
    container: ContainerNameStr
    source: HostNameStr
    destination: HostNameStr
    facts: dict[str, Fact] = Field(default_factory=dict)
    not_before: float = 0.0


class EventBase(Message):
    migration_id: MigrationId
    at: float


class Accepted(EventBase):
    type: Literal["accepted"] = "accepted"
    container: str
    source: str
    destination: str
    strategy: StrategyChoice


class StepStarted(EventBase):
    type: Literal["step_started"] = "step_started"
    step: str
    kind: StepKind
    host: str
    attempt: int


class StepProgress(EventBase):
    type: Literal["step_progress"] = "step_progress"
    step: str
    host: str
    message: str
    phase: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate_bps: float | None = None
    eta_s: float | None = None


class StepFinished(EventBase):
    type: Literal["step_finished"] = "step_finished"
    step: str
    kind: StepKind
    host: str
    attempt: int
    status: StepStatus
    duration_ms: int
    error: str | None = None
    will_retry: bool = False


class Finished(EventBase):
    type: Literal["finished"] = "finished"
    state: MigrationState
    freeze_ms: int | None = None
    bytes_moved: int = 0
    error: str | None = None


Event = Annotated[
    Accepted | StepStarted | StepProgress | StepFinished | Finished, Field(discriminator="type")
]
