"""The runner every worker shares for saga steps: fetch a command from the host's work
queue and pass it through a short pipeline of layers —

  accept     parse it, check it is for this host and role, read the record, check the
             step is current there (a stale one only re-publishes what follows);
  faults     test-only faults armed from the record: duplicate, kill before or after;
  trace      the step's span, in the migration's trace;
  keep-alive in-progress beats while the handler runs;
  guard      backoff, timeout, and the handler's failure as a saga StepError;
  record     the outcome applied to the record by compare-and-set, then published;
  ack        only now.

A crash anywhere before the ack means JetStream delivers the command again; the record
tells whether the step already finished, so nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pydantic import ValidationError

from schemas import subjects
from schemas.v1.migrations import Role
from schemas.v2.migrations import MigrationRecord, StepCommand, read_command
from services import bus, faults, metrics, tracing
from services.faults import FaultPlan
from services.kvstores import KvMigrationStore, KvPlacementStore
from services.runtime import ledger
from services.saga.dead_hosts import dead_host_decision, past_dead_hosts
from services.saga.dispatch import release_placement
from services.saga.layers import (
    annotate,
    guarded,
    kept_alive,
    progress_events,
    slowed,
    step_lease,
    step_span,
)
from services.saga.ownership import committed_unseen
from services.saga.publish import announce_end, publish_decision
from services.saga.steps import StepHandler, StepOutcome, StepRun
from services.saga.transitions import transition
from services.worker import WorkerContext
from workflows.definitions import DEFINITIONS
from workflows.saga import (
    Decision,
    SagaDefinition,
    StepError,
    current,
    is_current,
    pending_commands,
    step_failed,
    step_succeeded,
)

log = logging.getLogger("ferry.saga")

MAX_PARALLEL_STEPS = 4
UNKNOWN_RECORD_RETRY_S = 10.0
# A pull request the server lost (its node restarted, a new consumer leader) is noticed only
# when it expires: kept short, a command queued meanwhile waits at most this long.
FETCH_WAIT_S = 2.0


def definition_of(record: MigrationRecord) -> SagaDefinition:
    return DEFINITIONS[record.chosen]


class SagaRunner:
    """Consumes one host role's command queue and runs the handlers registered for it."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        host: str,
        role: Role,
        handlers: Mapping[str, StepHandler],
        telemetry: tracing.Telemetry,
        faults: FaultPlan,
        subscribed: asyncio.Event | None = None,
    ) -> None:
        self.js = js
        self.subscribed = subscribed or asyncio.Event()
        self.host = host
        self.role = role
        self.handlers = dict(handlers)
        self.telemetry = telemetry
        self.faults = faults
        self.slots = asyncio.Semaphore(MAX_PARALLEL_STEPS)
        self.tasks: set[asyncio.Task[None]] = set()
        self.running: set[tuple[str, str, str, int]] = set()
        self.per_migration: dict[str, asyncio.Lock] = {}
        self.waiting: dict[str, int] = {}

    @classmethod
    def for_worker(cls, ctx: WorkerContext, handlers: Mapping[str, StepHandler]) -> SagaRunner:
        return cls(
            ctx.js,
            host=ctx.config.host,
            role=ctx.role,
            handlers=handlers,
            telemetry=ctx.telemetry,
            faults=ctx.faults,
            subscribed=ctx.consumer_made,
        )

    async def stores(self) -> tuple[KvMigrationStore, KvPlacementStore]:
        js = self.js
        return (
            KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET)),
            KvPlacementStore(await bus.bucket(js, subjects.PLACEMENT_BUCKET), author=self.host),
        )

    async def run(self) -> None:
        sub = await bus.command_subscription(self.js, self.host, self.role)
        metrics.watch_commands(sub, self.host, self.role)
        self.subscribed.set()
        while True:
            await self.slots.acquire()
            try:
                msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
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

    # -- accept ----------------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        migrations, placements = await self.stores()
        accepted = await self._accept(msg, migrations, placements)
        if accepted is None:
            return
        run = StepRun(*accepted)
        key = (run.migration_id, run.command.kind, run.command.step, run.command.attempt)
        if key in self.running:
            # The same command delivered again while the first delivery is at work on it (its
            # acks timed out, e.g. a NATS node died). Never ack it: it is the same message, and
            # an ack here would end it for good even if the first delivery then fails. Left
            # alone, it comes back after its backoff, and the record says what is left to do.
            log.warning(
                "duplicate delivery of %s %s left alone", run.command.step, run.migration_id
            )
            return
        self.running.add(key)
        try:
            # One step of a migration at a time in this worker: a compensation waits for a
            # forward step the watchdog gave up on but that still runs here (a commit whose
            # compare-and-set may still land), so it sees what that step did.
            async with self._one_at_a_time(msg, run.migration_id):
                decision = await self._run(msg, run, migrations, placements)
            if decision is None:
                return  # the record moved on while this step waited: nothing to do
            ledger.saw(decision.record)  # this host's own copy, for a store that gets lost
            await self._record_and_publish(decision, placements)
            await msg.ack()
        finally:
            self.running.discard(key)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, msg: Msg, migration_id: str) -> AsyncIterator[None]:
        lock = self.per_migration.setdefault(migration_id, asyncio.Lock())
        self.waiting[migration_id] = self.waiting.get(migration_id, 0) + 1
        try:
            await kept_alive(msg, lock.acquire())  # waiting counts as having it in hand
            try:
                yield
            finally:
                lock.release()
        finally:
            self.waiting[migration_id] -= 1
            if not self.waiting[migration_id]:
                del self.waiting[migration_id]
                self.per_migration.pop(migration_id, None)

    async def _accept(
        self, msg: Msg, migrations: KvMigrationStore, placements: KvPlacementStore
    ) -> tuple[StepCommand, MigrationRecord] | None:
        """The command and its record if this worker should run it now; otherwise the
        message is dealt with (dropped, or acked after re-publishing what follows)."""
        try:
            command = read_command(msg.data, self.host, self.role)
        except (ValidationError, ValueError) as exc:
            log.error("unreadable command dropped: %s", exc)
            await msg.term()
            return None
        if (command.host, command.role) != (self.host, self.role):
            log.error(
                "command for %s/%s delivered to %s/%s dropped",
                command.host, command.role, self.host, self.role,
            )  # fmt: skip
            await msg.term()
            return None
        found = await migrations.get(command.migration_id)
        if found is None:
            # Unknown, not "none": a store being rebuilt may bring the record back. Asked
            # again later; JetStream gives up after its delivery limit.
            log.error("command for a migration with no record (%s): later", command.migration_id)
            await msg.nak(delay=UNKNOWN_RECORD_RETRY_S)
            return None
        record, _ = found
        if not is_current(record, command):
            # Already done (a redelivery after a crash), or never the record's (a forged or
            # stale command): nothing runs; make sure what follows went out.
            log.info(
                "%s of %s (attempt %d) is not the record's current step: nothing run",
                command.step, record.id, command.attempt,
            )  # fmt: skip
            await publish_decision(
                self.js, Decision(record, pending_commands(record)), host=self.host
            )
            if record.state in ("completed", "rolled_back", "failed"):
                await release_placement(placements, record, self.host)
                await announce_end(self.js, record)
            await msg.ack()
            return None
        entry = current(record)
        if entry is None or (entry.host, entry.role) != (self.host, self.role):
            # The record, not the message, says who runs a step.
            log.error("the record gives %s of %s to another worker", command.step, record.id)
            await msg.term()
            return None
        return command, record

    # -- faults, trace, keep-alive, guard --------------------------------------------------

    async def _run(
        self, msg: Msg, run: StepRun, migrations: KvMigrationStore, placements: KvPlacementStore
    ) -> Decision | None:
        command, plan = run.command, self.faults
        definition = definition_of(run.record)
        latest = await migrations.get(run.migration_id)
        if latest is None:  # unknown, not "none": asked again later, as at accept
            await msg.nak(delay=UNKNOWN_RECORD_RETRY_S)
            return None
        if not is_current(latest[0], command):
            await msg.ack()  # the record moved on while this waited: its new step decides
            return None
        run = StepRun(command, latest[0])
        owned = await committed_unseen(definition, run, migrations, placements)
        if isinstance(owned, Decision):
            return owned
        if isinstance(owned, StepError):
            return await self._advance(migrations, definition, command, owned)
        if past := await dead_host_decision(self.js, migrations, definition, run.record):
            return past  # what it needs was on a host declared dead
        with plan.armed(run.record):
            if plan.fires(run.migration_id, f"duplicate:{command.step}"):
                await bus.publish_command(
                    self.js, command, dict(msg.headers or {}),
                    msg_id=f"{command.msg_id}.duplicate",
                )  # fmt: skip
            if plan.fires(run.migration_id, f"kill:{command.step}:before"):
                faults.die()
            with step_span(run, msg, self.host, self.role) as span:
                timeout = definition.action(command.step, command.kind).timeout_s
                where = f"{self.role} worker on {self.host}"
                handler = slowed(plan, run, self.handlers.get(command.step))
                async with step_lease(self.js, run, self.host, self.role, timeout) as lease:
                    progress = lease.reporting(progress_events(self.js, run, self.host))
                    guard = guarded(handler, run, progress, timeout, where)
                    outcome = await kept_alive(msg, lease.bounded(guard))
                if plan.fires(run.migration_id, f"kill:{command.step}:after"):
                    faults.die()  # the side effect happened; the record never heard of it
                if plan.fires(run.migration_id, f"silent:{command.step}:after"):
                    faults.go_silent()  # ...and will hear of it only after a long cut
                decision = await self._advance(migrations, definition, command, outcome)
                annotate(span, outcome, decision)
        return decision

    # -- record and publish ----------------------------------------------------------------

    async def _advance(
        self,
        migrations: KvMigrationStore,
        definition: SagaDefinition,
        command: StepCommand,
        outcome: StepOutcome | StepError,
    ) -> Decision:
        """Apply the outcome to the latest record (compare-and-set)."""

        def decide(record: MigrationRecord) -> Decision:
            now = time.time()
            if isinstance(outcome, StepOutcome):
                return step_succeeded(
                    definition, record, command, outcome.result, now,
                    bytes_moved=outcome.bytes_moved,
                )  # fmt: skip
            return step_failed(definition, record, command, outcome, now)

        decision = await transition(migrations, command.migration_id, decide)
        assert decision is not None  # decide always decides
        return await past_dead_hosts(self.js, migrations, definition, decision)

    async def _record_and_publish(self, decision: Decision, placements: KvPlacementStore) -> None:
        metrics.saga_decided(decision)  # counts an end once: only the writer sees `changed`
        if decision.finished and decision.changed:
            tracing.emit_root_span(self.telemetry, decision.record)
            await release_placement(placements, decision.record, self.host)
            # The trace is complete in the span stream before anyone hears the end.
            await self.telemetry.flush()
        await publish_decision(self.js, decision, host=self.host)
