"""A saga engine with no I/O: definitions as data, and pure transitions of the record.

Workers call these functions with the migration record they read from KV and the outcome
of the step they ran; they get back the new record, the commands to publish and the events
to emit. Writing the record (compare-and-set), publishing and acking are the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.v1.migrations import (
    Accepted,
    EventBase,
    Finished,
    Role,
    Side,
    StepFinished,
    StepKind,
    StepRecord,
    StepStarted,
    StepStatus,
)
from schemas.v2.migrations import MigrationRecord, StepCommand
from schemas.v2.results import RestoreResult, StepResult


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step may run, and how long to wait before each new attempt."""

    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (1.0, 3.0, 10.0)
    # A step that brings back the only copy of a container (or keeps it reachable) does not
    # give up after max_attempts: it goes on at its last backoff until the migration's
    # way-back deadline, for as long as a retryable error says a retry can still help.
    keeps_trying: bool = False

    def delay_before(self, attempt: int) -> float:
        """Delay before `attempt` (2 = the first retry)."""
        if attempt <= 1 or not self.backoff_s:
            return 0.0
        return self.backoff_s[min(attempt - 2, len(self.backoff_s) - 1)]


NO_RETRY = RetryPolicy(max_attempts=1, backoff_s=())


@dataclass(frozen=True)
class Compensation:
    """Undoes a step's side effects. Must be idempotent and succeed when nothing was done."""

    name: str
    role: Role
    side: Side
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class Step:
    """One step: which role on which side runs it, its limits, and what undoes it."""

    name: str
    role: Role
    side: Side
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation: Compensation | None = None
    # After the commit only: if this step fails for good, run these in order and hand the
    # container back to the source (post-copy's stopped source is still there).
    fallback: tuple[Compensation, ...] = ()


@dataclass(frozen=True)
class SagaDefinition:
    """A saga declared once: its steps in order and its point of no return."""

    name: str
    steps: tuple[Step, ...]
    commit_after: str

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: step names must be unique")
        if self.commit_after not in names:
            raise ValueError(f"{self.name}: commit step {self.commit_after!r} is not a step")
        commit = names.index(self.commit_after)
        for step in self.steps[commit + 1 :]:
            if step.compensation is not None:
                raise ValueError(f"{step.name} runs after the commit: nothing may roll it back")
        for step in self.steps[: commit + 1]:
            if step.fallback:
                raise ValueError(f"{step.name} runs before the commit: compensate it instead")

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def compensation(self, name: str) -> tuple[Step, Compensation]:
        for step in self.steps:
            if step.compensation is not None and step.compensation.name == name:
                return step, step.compensation
        for step in self.steps:
            for action in step.fallback:
                if action.name == name:
                    return step, action
        raise KeyError(name)

    def action(self, name: str, kind: str) -> Step | Compensation:
        """The step or compensation a command names: its role, timeout and retry policy."""
        return self.step(name) if kind == "forward" else self.compensation(name)[1]

    @property
    def total_timeout_s(self) -> float:
        """How long the saga may take to reach its commit, or to undo what it did: past it,
        a saga that has not committed is cancelled. Steps after the commit are not counted
        (post-copy's page drain may take hours for a large container, and is judged by
        whether pages still arrive)."""
        names = [s.name for s in self.steps]
        until_commit = self.steps[: names.index(self.commit_after) + 1]
        forward = sum(s.timeout_s * s.retry.max_attempts for s in until_commit)
        back = sum(
            c.timeout_s * c.retry.max_attempts
            for s in self.steps
            for c in ((s.compensation,) if s.compensation else s.fallback)
        )
        return forward + back

    @property
    def after_commit_s(self) -> float:
        """The longest the steps after the commit may take, every attempt counted."""
        names = [s.name for s in self.steps]
        after = self.steps[names.index(self.commit_after) + 1 :]
        return sum(s.timeout_s * s.retry.max_attempts for s in after)


@dataclass(frozen=True)
class StepError:
    """Why a step failed, and whether running it again could help."""

    reason: str
    retryable: bool


@dataclass(frozen=True)
class Decision:
    """What to do after a transition. `changed` is False for a stale or duplicate outcome."""

    record: MigrationRecord
    commands: tuple[StepCommand, ...] = ()
    events: tuple[EventBase, ...] = ()
    changed: bool = True

    @property
    def finished(self) -> bool:
        return self.record.state in ("completed", "rolled_back", "failed")


def host_of(record: MigrationRecord, side: Side) -> str:
    return record.source if side == "source" else record.destination


def _command(record: MigrationRecord, entry: StepRecord, not_before: float = 0.0) -> StepCommand:
    return StepCommand(
        migration_id=record.id,
        step=entry.name,
        kind=entry.kind,
        attempt=entry.attempts,
        host=entry.host,
        role=entry.role,
        not_before=not_before,
    )


def _started(record: MigrationRecord, entry: StepRecord, now: float) -> StepStarted:
    return StepStarted(
        migration_id=record.id,
        at=now,
        step=entry.name,
        kind=entry.kind,
        host=entry.host,
        attempt=entry.attempts,
    )


def _replace_last(
    record: MigrationRecord, entry: StepRecord, **changes: object
) -> tuple[StepRecord, ...]:
    index = max(
        i for i, s in enumerate(record.steps) if s.name == entry.name and s.kind == entry.kind
    )
    steps = list(record.steps)
    steps[index] = entry.model_copy(update=changes)
    return tuple(steps)


def current(record: MigrationRecord) -> StepRecord | None:
    """The step or compensation that is running now, if any."""
    running = [s for s in record.steps if s.status == "running"]
    return running[-1] if running else None


def pending_commands(record: MigrationRecord) -> tuple[StepCommand, ...]:
    """The command for what runs now: re-published after a crash between CAS and publish
    (JetStream drops the duplicate by its message id if the first one did go out)."""
    entry = current(record)
    return (_command(record, entry),) if entry else ()


def begin(defn: SagaDefinition, record: MigrationRecord, now: float) -> Decision:
    first = defn.steps[0]
    entry = StepRecord(
        name=first.name,
        role=first.role,
        host=host_of(record, first.side),
        status="running",
        attempts=1,
        started_at=now,
        first_started_at=now,
    )
    started = record.model_copy(
        update={
            "steps": (entry,),
            "state": "running",
            "updated_at": now,
            "deadline": now + defn.total_timeout_s,
        }
    )
    accepted = Accepted(
        migration_id=record.id,
        at=now,
        container=record.container,
        source=record.source,
        destination=record.destination,
        strategy=record.strategy,
    )
    return Decision(started, (_command(started, entry),), (accepted, _started(started, entry, now)))


def _is_current(
    record: MigrationRecord, step: str, kind: StepKind, attempt: int
) -> StepRecord | None:
    entry = current(record)
    if entry and entry.name == step and entry.kind == kind and entry.attempts == attempt:
        return entry
    return None


def is_current(record: MigrationRecord, command: StepCommand) -> bool:
    return _is_current(record, command.step, command.kind, command.attempt) is not None


def step_finished(
    record: MigrationRecord,
    entry: StepRecord,
    status: StepStatus,
    now: float,
    duration_ms: int,
    *,
    error: str | None = None,
    will_retry: bool = False,
) -> StepFinished:
    """The event that says how one attempt of a step or compensation ended."""
    return StepFinished(
        migration_id=record.id,
        at=now,
        step=entry.name,
        kind=entry.kind,
        host=entry.host,
        attempt=entry.attempts,
        status=status,
        duration_ms=duration_ms,
        error=error,
        will_retry=will_retry,
    )


def _duration_ms(entry: StepRecord, now: float) -> int:
    # For display only: `started_at` may come from another host's clock, ahead of ours.
    return max(0, round((now - (entry.started_at or now)) * 1000))


def _start_entry(record: MigrationRecord, entry: StepRecord, now: float) -> Decision:
    advanced = record.model_copy(update={"steps": (*record.steps, entry), "updated_at": now})
    return Decision(advanced, (_command(advanced, entry),), (_started(advanced, entry, now),))


def finished_event(record: MigrationRecord) -> Finished:
    """How a record that has ended is announced (again, after a crash, with the same words)."""
    return Finished(
        migration_id=record.id,
        at=record.updated_at,
        state=record.state,
        freeze_ms=record.freeze_ms,
        bytes_moved=record.bytes_moved,
        error=record.error,
    )


def _finish(record: MigrationRecord, state: str, now: float, error: str | None) -> Decision:
    done = record.model_copy(update={"state": state, "updated_at": now, "error": error})
    return Decision(done, (), (finished_event(done),))


def step_succeeded(
    defn: SagaDefinition,
    record: MigrationRecord,
    command: StepCommand,
    result: StepResult | None,
    now: float,
    *,
    bytes_moved: int = 0,
) -> Decision:
    entry = _is_current(record, command.step, command.kind, command.attempt)
    if entry is None:
        return Decision(record, pending_commands(record), changed=False)
    duration = _duration_ms(entry, now)
    steps = _replace_last(
        record, entry, status="done", finished_at=now, duration_ms=duration, error=None
    )
    updates: dict[str, object] = {
        "steps": steps,
        "bytes_moved": record.bytes_moved + bytes_moved,
        "updated_at": now,
    }
    if result is not None:
        updates["results"] = record.results.with_result(entry.name, result)
    if isinstance(result, RestoreResult):
        updates["freeze_ms"] = result.freeze_ms
    if entry.kind == "forward" and entry.name == defn.commit_after:
        updates["committed"] = True
    if entry.kind == "compensation" and _falling_back(defn, record) is None:
        forward, _ = defn.compensation(entry.name)
        steps = tuple(
            s.model_copy(update={"status": "compensated"})
            if s.kind == "forward" and s.name == forward.name
            else s
            for s in steps
        )
        updates["steps"] = steps
    record = record.model_copy(update=updates)
    finished_event = step_finished(record, entry, "done", now, duration)
    if entry.kind == "compensation":
        decision = _next_compensation(defn, record, now)
    elif record.cancel_requested and not record.committed:
        # Stopping at a step boundary: nothing runs concurrently with the compensations.
        stopped = record.model_copy(update={"error": record.cancel_requested})
        decision = _next_compensation(defn, stopped, now)
    else:
        decision = _next_forward(defn, record, entry.name, now)
    return Decision(decision.record, decision.commands, (finished_event, *decision.events))


def _next_forward(
    defn: SagaDefinition, record: MigrationRecord, after: str, now: float
) -> Decision:
    names = [s.name for s in defn.steps]
    index = names.index(after) + 1
    if index == len(names):
        return _finish(record, "completed", now, None)
    step = defn.steps[index]
    entry = StepRecord(
        name=step.name,
        role=step.role,
        host=host_of(record, step.side),
        status="running",
        attempts=1,
        started_at=now,
        first_started_at=now,
    )
    return _start_entry(record, entry, now)


# A compensation is over when it ran, or when it was skipped because nothing of it could run
# (its host was declared dead by an operator: workflows/dead_hosts.py).
HANDLED = ("done", "skipped")


def _to_compensate(defn: SagaDefinition, record: MigrationRecord) -> list[Step]:
    """Forward steps that ran (or tried to) and still need undoing, latest first."""
    ran = {s.name for s in record.steps if s.kind == "forward" and s.status in ("done", "failed")}
    return [
        step for step in reversed(defn.steps) if step.compensation is not None and step.name in ran
    ]


def _falling_back(defn: SagaDefinition, record: MigrationRecord) -> Step | None:
    """The step after the commit whose failure is being answered by its fallback, if any."""
    if not record.committed:
        return None
    failed = [s for s in record.steps if s.kind == "forward" and s.status == "failed"]
    for entry in reversed(failed):
        step = defn.step(entry.name)
        if step.fallback:
            return step
    return None


def _next_fallback(
    defn: SagaDefinition, record: MigrationRecord, step: Step, now: float
) -> Decision:
    """The next action of `step`'s fallback; when all ran, the source has the container."""
    index = max(i for i, s in enumerate(record.steps) if s.name == step.name)
    done = [
        s for s in record.steps[index + 1 :] if s.kind == "compensation" and s.status in HANDLED
    ]
    if len(done) < len(step.fallback):
        action = step.fallback[len(done)]
        entry = StepRecord(
            name=action.name,
            kind="compensation",
            role=action.role,
            host=host_of(record, action.side),
            status="running",
            attempts=1,
            started_at=now,
            first_started_at=now,
        )
        return _start_entry(record.model_copy(update={"state": "compensating"}), entry, now)
    steps = _replace_last(record, record.steps[index], status="compensated")
    failure = record.steps[index].error
    reason = (
        f"{step.name} failed after the commit: {failure}; fell back to {record.source}"
        " (the copy it kept stopped)"
    )
    return _finish(record.model_copy(update={"steps": steps}), "rolled_back", now, reason)


def _next_compensation(defn: SagaDefinition, record: MigrationRecord, now: float) -> Decision:
    falling_back = _falling_back(defn, record)
    if falling_back is not None:
        return _next_fallback(defn, record, falling_back, now)
    undone = {s.name for s in record.steps if s.kind == "compensation" and s.status in HANDLED}
    for step in _to_compensate(defn, record):
        assert step.compensation is not None
        if step.compensation.name in undone:
            continue
        entry = StepRecord(
            name=step.compensation.name,
            kind="compensation",
            role=step.compensation.role,
            host=host_of(record, step.compensation.side),
            status="running",
            attempts=1,
            started_at=now,
            first_started_at=now,
        )
        return _start_entry(record.model_copy(update={"state": "compensating"}), entry, now)
    failed = next((s for s in record.steps if s.kind == "forward" and s.status == "failed"), None)
    reason = f"{failed.name} failed: {failed.error}" if failed else record.error
    if record.cancel_requested and failed is None:
        reason = f"cancelled: {record.cancel_requested}"
    return _finish(record, "rolled_back", now, reason)


def step_failed(
    defn: SagaDefinition,
    record: MigrationRecord,
    command: StepCommand,
    error: StepError,
    now: float,
) -> Decision:
    entry = _is_current(record, command.step, command.kind, command.attempt)
    if entry is None:
        return Decision(record, pending_commands(record), changed=False)
    policy = defn.action(entry.name, entry.kind).retry
    duration = _duration_ms(entry, now)
    will_retry = error.retryable and (
        entry.attempts < policy.max_attempts or _still_trying(policy, record, entry, now)
    )
    failed_event = step_finished(
        record, entry, "failed", now, duration, error=error.reason, will_retry=will_retry
    )
    if will_retry:
        attempt = entry.attempts + 1
        steps = _replace_last(record, entry, attempts=attempt, error=error.reason, started_at=now)
        retried = record.model_copy(update={"steps": steps, "updated_at": now})
        retry_entry = current(retried)
        assert retry_entry is not None
        command_out = _command(retried, retry_entry, not_before=now + policy.delay_before(attempt))
        return Decision(
            retried, (command_out,), (failed_event, _started(retried, retry_entry, now))
        )
    steps = _replace_last(
        record, entry, status="failed", finished_at=now, duration_ms=duration, error=error.reason
    )
    record = record.model_copy(update={"steps": steps, "updated_at": now})
    if entry.kind == "compensation":
        decision = _finish(
            record, "failed", now, f"compensation {entry.name} failed: {error.reason}"
        )
    elif record.committed and defn.step(entry.name).fallback:
        decision = _next_fallback(defn, record, defn.step(entry.name), now)
    elif record.committed:
        # Past the point of no return the destination owns the container: clean up
        # forward only, and say the move needs attention rather than roll it back.
        decision = _finish(
            record, "failed", now, f"{entry.name} failed after commit: {error.reason}"
        )
    else:
        decision = _next_compensation(defn, record.model_copy(update={"error": error.reason}), now)
    return Decision(decision.record, decision.commands, (failed_event, *decision.events))


def _still_trying(
    policy: RetryPolicy, record: MigrationRecord, entry: StepRecord, now: float
) -> bool:
    if not policy.keeps_trying:
        return False
    first = entry.first_started_at or entry.started_at or now
    return now - first < record.options.way_back_deadline_s


def commit_attempted(defn: SagaDefinition, record: MigrationRecord) -> bool:
    """The commit step ran or is running: the placement may have moved without the record
    hearing of it (the destination's worker did the compare-and-set, then lost the bus)."""
    return not record.committed and any(
        s.kind == "forward" and s.name == defn.commit_after for s in record.steps
    )


def can_roll_forward(defn: SagaDefinition, record: MigrationRecord) -> bool:
    """Only while nothing was undone yet: a compensation that finished has changed a side
    (stopped the destination's copy, say), and going forward from there is not safe."""
    undone = any(s.kind == "compensation" and s.status == "done" for s in record.steps)
    return (
        record.state in ("running", "compensating")
        and commit_attempted(defn, record)
        and not undone
    )


def roll_forward(
    defn: SagaDefinition, record: MigrationRecord, reason: str, now: float
) -> Decision:
    """The placement names the destination although the record never saw the commit: the
    destination owns the container, so the saga goes on after the commit instead of bringing
    the source back. The compensation in progress (if any) is skipped, the commit marked done.
    """
    if not can_roll_forward(defn, record):
        return Decision(record, pending_commands(record), changed=False)
    index = max(
        i for i, s in enumerate(record.steps) if s.kind == "forward" and s.name == defn.commit_after
    )
    steps = list(record.steps)
    steps[index] = steps[index].model_copy(
        update={"status": "done", "finished_at": now, "error": None}
    )
    for i in range(index + 1, len(steps)):
        if steps[i].status == "running":
            steps[i] = steps[i].model_copy(
                update={"status": "skipped", "finished_at": now, "error": reason}
            )
    forward = record.model_copy(
        update={
            "steps": tuple(steps),
            "committed": True,
            "state": "running",
            "error": None,
            "cancel_requested": None,
            "updated_at": now,
        }
    )
    decision = _next_forward(defn, forward, defn.commit_after, now)
    done = step_finished(
        record, steps[index], "done", now, _duration_ms(steps[index], now), error=reason
    )
    return Decision(decision.record, decision.commands, (done, *decision.events))


def skip_current(
    defn: SagaDefinition, record: MigrationRecord, reason: str, now: float
) -> Decision:
    """The compensation running now can run nowhere (its host is gone for good): it is marked
    skipped, with the reason, and the saga goes on with what follows it."""
    entry = current(record)
    if entry is None or entry.kind != "compensation":
        return Decision(record, pending_commands(record), changed=False)
    duration = _duration_ms(entry, now)
    steps = _replace_last(
        record, entry, status="skipped", finished_at=now, duration_ms=duration, error=reason
    )
    skipped = record.model_copy(update={"steps": steps, "updated_at": now})
    event = step_finished(record, entry, "skipped", now, duration, error=reason)
    decision = _next_compensation(defn, skipped, now)
    return Decision(decision.record, decision.commands, (event, *decision.events))


def request_cancel(record: MigrationRecord, reason: str, now: float) -> MigrationRecord:
    """Ask the saga to stop at the next step boundary and compensate.

    Refused once the commit is done (the destination owns the container) or the saga has
    ended; the caller turns the refusal into a clear error.
    """
    if record.state not in ("running",):
        raise ValueError(f"migration {record.id} is {record.state}")
    if record.committed:
        raise ValueError(f"migration {record.id} is past its commit point")
    if record.cancel_requested:
        return record
    return record.model_copy(update={"cancel_requested": reason, "updated_at": now})


def cancelled(defn: SagaDefinition, record: MigrationRecord, reason: str, now: float) -> Decision:
    """Abandon the current step now (its worker is gone or stuck): compensate if still allowed.

    Only for a step whose worker cannot be waited for (the watchdog's deadline passed); its
    compensation must also stop whatever that step may still have running.
    """
    if record.state not in ("running",) or record.committed:
        return Decision(record, pending_commands(record), changed=False)
    entry = current(record)
    steps = record.steps
    if entry is not None:
        steps = _replace_last(
            record,
            entry,
            status="failed",
            finished_at=now,
            duration_ms=_duration_ms(entry, now),
            error=reason,
        )
    stopped = record.model_copy(update={"steps": steps, "error": reason, "updated_at": now})
    return _next_compensation(defn, stopped, now)
