"""The runner every worker shares for saga steps: fetch a command from the host's work
queue, check it is still current, run the handler with in-progress heartbeats, advance the
record by compare-and-set, publish what comes next, and only then ack.

A crash anywhere before the ack means JetStream delivers the command again; the record
tells whether the step already finished, so nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, StatusCode
from pydantic import ValidationError

from schemas import subjects
from schemas.v1.migrations import MigrationRecord, StepCommand, StepProgress
from services import bus, faults, tracing
from services.errors import Conflict, FerryError
from services.kvstores import KvMigrationStore, KvPlacementStore
from services.saga_publish import announce_end, publish_decision
from services.steps import StepHandler, StepOutcome
from services.worker import WorkerContext
from workflows.definitions import DEFINITIONS
from workflows.saga import (
    Decision,
    SagaDefinition,
    StepError,
    is_current,
    pending_commands,
    step_failed,
    step_succeeded,
)

log = logging.getLogger("ferry.saga")

MAX_PARALLEL_STEPS = 4
CAS_ATTEMPTS = 20


def definition_of(record: MigrationRecord) -> SagaDefinition:
    return DEFINITIONS[record.strategy.chosen]


def rate_and_eta(
    done: int | None, total: int | None, elapsed_s: float
) -> tuple[float | None, float | None]:
    """Average rate since the step began, and the time left at that rate."""
    if not done or elapsed_s <= 0:
        return None, None
    rate = done / elapsed_s
    eta = max(total - done, 0) / rate if total else None
    return round(rate), (round(eta, 1) if eta is not None else None)


class SagaRunner:
    """Consumes one host role's command queue and runs the handlers registered for it."""

    def __init__(self, ctx: WorkerContext, handlers: dict[str, StepHandler]) -> None:
        self.ctx = ctx
        self.handlers = handlers
        self.slots = asyncio.Semaphore(MAX_PARALLEL_STEPS)
        self.tasks: set[asyncio.Task[None]] = set()
        self.running: set[tuple[str, str, str, int]] = set()

    async def stores(self) -> tuple[KvMigrationStore, KvPlacementStore]:
        js = self.ctx.js
        return (
            KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET)),
            KvPlacementStore(await bus.bucket(js, subjects.PLACEMENT_BUCKET)),
        )

    async def run(self) -> None:
        sub = await bus.command_subscription(self.ctx.js, self.ctx.config.host, self.ctx.role)
        while True:
            await self.slots.acquire()
            try:
                msgs = await sub.fetch(1, timeout=5)
            except (NatsTimeout, TimeoutError):
                self.slots.release()
                continue
            except Exception as exc:  # the bus is restarting: wait and fetch again
                self.slots.release()
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(1)
                continue
            task = asyncio.create_task(self._handle_then_release(msgs[0]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle_then_release(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            log.exception("command not handled; JetStream will deliver it again")
        finally:
            self.slots.release()

    async def handle(self, msg: Msg) -> None:
        try:
            command = StepCommand.from_bytes(msg.data)
        except ValidationError as exc:
            log.error("unreadable command dropped: %s", exc)
            await msg.term()
            return
        migrations, placements = await self.stores()
        found = await migrations.get(command.migration_id)
        if found is None:
            log.error("command for unknown migration %s dropped", command.migration_id)
            await msg.term()
            return
        record, _ = found
        definition = definition_of(record)
        if not is_current(record, command):
            # Already done (a redelivery after a crash): make sure what follows went out.
            await publish_decision(
                self.ctx.js, definition, Decision(record, pending_commands(record))
            )
            if record.state in ("completed", "rolled_back", "failed"):
                await announce_end(self.ctx.js, record)
            await msg.ack()
            return
        key = (command.migration_id, command.kind, command.step, command.attempt)
        if key in self.running:
            # The same command delivered twice: the first delivery is at work on it.
            log.warning("duplicate delivery of %s %s ignored", command.step, command.migration_id)
            await msg.ack()
            return
        self.running.add(key)
        try:
            await self._handle_current(msg, command, record, migrations, placements)
        finally:
            self.running.discard(key)

    async def _handle_current(
        self,
        msg: Msg,
        command: StepCommand,
        record: MigrationRecord,
        migrations: KvMigrationStore,
        placements: KvPlacementStore,
    ) -> None:
        definition = definition_of(record)
        state_dir = self.ctx.config.state_dir
        if faults.fires(command, f"duplicate:{command.step}", state_dir):
            await bus.publish_command(
                self.ctx.js, self.ctx.config.host, self.ctx.role, command,
                subjects.command_msg_id(
                    command.migration_id, command.kind, command.step, command.attempt
                ) + ".duplicate",
                dict(msg.headers or {}),
            )  # fmt: skip
        if faults.fires(command, f"kill:{command.step}:before", state_dir):
            faults.die()
        handler = self.handlers.get(command.step)
        parent = propagate.extract(dict(msg.headers or {}))
        label = "compensate" if command.kind == "compensation" else "step"
        with tracing.tracer().start_as_current_span(
            f"{label} {command.step}",
            context=parent,
            attributes={
                "ferry.migration_id": command.migration_id,
                "ferry.container": command.container,
                "ferry.source": command.source,
                "ferry.destination": command.destination,
                "ferry.host": self.ctx.config.host,
                "ferry.role": self.ctx.role,
                "ferry.step": command.step,
                "ferry.step_kind": command.kind,
                "ferry.attempt": command.attempt,
                "ferry.strategy": record.strategy.chosen,
            },
        ) as span:
            if handler is None:
                outcome_or_error: StepOutcome | StepError = StepError(
                    f"{self.ctx.role} worker on {self.ctx.config.host}"
                    f" has no handler for {command.step}",
                    retryable=False,
                )
            else:
                outcome_or_error = await self._run_handler(msg, command, handler, definition)
            if faults.fires(command, f"kill:{command.step}:after", state_dir):
                faults.die()  # the side effect happened; the record never heard of it
            decision = await self._advance(migrations, command, outcome_or_error)
            _annotate(span, outcome_or_error, decision)
        if decision.finished and decision.changed:
            tracing.emit_root_span(self.ctx.telemetry, decision.record)
            await self._release_placement(placements, decision.record)
            # The trace is complete in the span stream before anyone hears the end.
            await self.ctx.telemetry.flush()
        await publish_decision(self.ctx.js, definition, decision)
        await msg.ack()

    async def _run_handler(
        self, msg: Msg, command: StepCommand, handler: StepHandler, definition: SagaDefinition
    ) -> StepOutcome | StepError:
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            wait = command.not_before - time.time()
            if wait > 0:
                with tracing.tracer().start_as_current_span(
                    "retry backoff", attributes={"ferry.wait_s": round(wait, 3)}
                ):
                    await asyncio.sleep(wait)
            timeout = definition.action(command.step, command.kind).timeout_s

            began = time.monotonic()

            async def progress(
                text: str, done: int | None = None, total: int | None = None
            ) -> None:
                rate, eta = rate_and_eta(done, total, time.monotonic() - began)
                event = StepProgress(
                    migration_id=command.migration_id,
                    at=time.time(),
                    step=command.step,
                    host=self.ctx.config.host,
                    message=text,
                    phase=command.step,
                    bytes_done=done,
                    bytes_total=total,
                    rate_bps=rate,
                    eta_s=eta,
                )
                with contextlib.suppress(Exception):
                    await bus.publish_event(self.ctx.js, command.migration_id, event)

            log.info(
                "%s %s of %s (attempt %d)",
                command.kind,
                command.step,
                command.migration_id,
                command.attempt,
            )
            return await asyncio.wait_for(handler(command, progress), timeout)
        except FerryError as exc:
            log.warning("%s failed: %s", command.step, exc.reason)
            span = trace.get_current_span()
            span.set_attribute("error.type", type(exc).__name__)
            tail = getattr(exc, "log_tail", "")
            if tail:
                span.add_event("criu.log", {"lines": tail.splitlines()[-20:]})
            return StepError(exc.reason, exc.retryable)
        except TimeoutError:
            return StepError(f"{command.step} timed out", retryable=True)
        except Exception as exc:
            log.exception("%s crashed", command.step)
            return StepError(
                f"internal error in {command.step}: {type(exc).__name__}: {exc}", False
            )
        finally:
            keepalive.cancel()

    @staticmethod
    async def _keep_alive(msg: Msg) -> None:
        while True:
            await asyncio.sleep(bus.IN_PROGRESS_EVERY_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _advance(
        self,
        migrations: KvMigrationStore,
        command: StepCommand,
        outcome: StepOutcome | StepError,
    ) -> Decision:
        """Apply the outcome to the latest record; retry the compare-and-set on a race."""
        for _ in range(CAS_ATTEMPTS):
            found = await migrations.get(command.migration_id)
            assert found is not None
            record, revision = found
            definition = definition_of(record)
            now = time.time()
            if isinstance(outcome, StepOutcome):
                decision = step_succeeded(
                    definition, record, command, outcome.facts, now, bytes_moved=outcome.bytes_moved
                )
            else:
                decision = step_failed(definition, record, command, outcome, now)
            if not decision.changed:
                return decision
            try:
                await migrations.update(decision.record, revision)
            except Conflict:
                continue
            return decision
        raise Conflict(f"migration {command.migration_id}: record kept changing under us")

    async def _release_placement(
        self, placements: KvPlacementStore, record: MigrationRecord
    ) -> None:
        """A finished saga unlocks its container, unless it failed before the commit: then
        an operator must look, and no new move may start meanwhile."""
        if record.state == "failed" and not record.committed:
            return
        for _ in range(CAS_ATTEMPTS):
            found = await placements.get(record.container)
            if found is None:
                return
            placement, revision = found
            if placement.migration_id != record.id:
                return
            try:
                await placements.update(
                    placement.model_copy(update={"state": "running", "migration_id": None}),
                    revision,
                )
                return
            except Conflict:
                continue


def _annotate(span: Span, outcome: StepOutcome | StepError, decision: Decision) -> None:
    """What SREs look for on a step's span: how it ended, what it moved, what CRIU said."""
    if isinstance(outcome, StepError):
        span.set_status(StatusCode.ERROR, outcome.reason)
        span.set_attribute("ferry.error", outcome.reason)
        span.set_attribute("ferry.retryable", outcome.retryable)
        will_retry = (
            any(c.attempt > 1 for c in decision.commands) and decision.record.state == "running"
        )
        span.set_attribute("ferry.will_retry", will_retry)
        return
    span.set_status(StatusCode.OK)
    if outcome.bytes_moved:
        span.set_attribute("ferry.bytes", outcome.bytes_moved)
    for key, value in outcome.facts.items():
        if isinstance(value, str | int | float | bool):
            span.set_attribute(f"ferry.{key}", value)
