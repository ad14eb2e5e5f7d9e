"""The layers a step command passes through in the runner, each small and on its own:
progress events, the keep-alive that tells JetStream the command is still being worked on,
the step's lease that tells every watchdog the step is alive (with its progress), the guard
that turns a handler's failure into a saga StepError, and the step's span.

None of them acks, records or publishes a decision: that is the runner's last layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, StatusCode

from schemas.v1.leases import LeaseHolder, StepLease, step_lease_key
from schemas.v1.leases import StepProgress as LeaseProgress
from schemas.v1.migrations import StepProgress
from services import bus, tracing
from services.errors import FerryError, described
from services.faults import FaultPlan
from services.leases import Held, LeaseLost, Leases
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun
from workflows.definitions import DEFINITIONS
from workflows.saga import Decision, StepError

log = logging.getLogger("ferry.saga")

T = TypeVar("T")


def rate_and_eta(
    done: int | None, total: int | None, elapsed_s: float
) -> tuple[float | None, float | None]:
    """Average rate since the step began, and the time left at that rate."""
    if not done or elapsed_s <= 0:
        return None, None
    rate = done / elapsed_s
    eta = max(total - done, 0) / rate if total else None
    return round(rate), (round(eta, 1) if eta is not None else None)


def progress_events(js: JetStreamContext, run: StepRun, host: str) -> Progress:
    """A handler's progress, published as events of its migration (never failing the step)."""
    began = time.monotonic()
    command = run.command

    async def progress(text: str, done: int | None = None, total: int | None = None) -> None:
        rate, eta = rate_and_eta(done, total, time.monotonic() - began)
        event = StepProgress(
            migration_id=command.migration_id,
            at=time.time(),
            step=command.step,
            host=host,
            message=text,
            phase=command.step,
            bytes_done=done,
            bytes_total=total,
            rate_bps=rate,
            eta_s=eta,
        )
        with contextlib.suppress(Exception):
            await bus.publish_event(js, command.migration_id, event)

    return progress


async def kept_alive(msg: Msg, work: Awaitable[T]) -> T:
    """Run `work` while telling JetStream, every so often, that the command is in hand."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(bus.IN_PROGRESS_EVERY_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    beating = asyncio.create_task(beat())
    try:
        return await work
    finally:
        beating.cancel()


SLOW_BEAT_S = 1.0


def slowed(plan: FaultPlan, run: StepRun, handler: StepHandler | None) -> StepHandler | None:
    """The handler, first made slow by the test fault `slow:STEP` (once per migration): a
    worker that is alive and reporting, only slower than a clock-judging watchdog allows."""
    if handler is None or not plan.fires(run.migration_id, f"slow:{run.command.step}"):
        return handler
    seconds = float(os.environ.get("FERRY_FAULT_SLOW_S", "15"))
    inner = handler

    async def slow(run: StepRun, progress: Progress) -> StepOutcome:
        began = time.monotonic()
        while (waited := time.monotonic() - began) < seconds:
            await progress(f"slowed by a test fault ({waited:.0f}/{seconds:.0f} s)", None, None)
            await asyncio.sleep(min(SLOW_BEAT_S, seconds - waited))
        return await inner(run, progress)

    return slow


# After the handler's own deadline: time to record its outcome before the lease lapses.
RECORD_MARGIN_S = 30.0


def retry_wait_s(run: StepRun) -> float:
    """How long to wait before this attempt: until the command's not_before, but never
    longer than its retry policy's delay (not_before is another host's clock)."""
    command = run.command
    policy = DEFINITIONS[run.record.chosen].action(command.step, command.kind).retry
    return max(0.0, min(command.not_before - time.time(), policy.delay_before(command.attempt)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LeasedStep:
    """A step attempt whose lease this worker holds: progress goes into it, and the work is
    cancelled if the lease is lost (a watchdog gave the attempt up, or it could not be
    renewed for a whole TTL)."""

    held: Held[StepLease]

    def reporting(self, progress: Progress) -> Progress:
        async def report(text: str, done: int | None = None, total: int | None = None) -> None:
            now = LeaseProgress(message=text[:200], bytes_done=done, bytes_total=total)
            self.held.update(self.held.payload.model_copy(update={"progress": now}))
            await progress(text, done, total)

        return report

    async def bounded(self, work: Awaitable[StepOutcome | StepError]) -> StepOutcome | StepError:
        try:
            return await self.held.guard(work)
        except LeaseLost as exc:
            return StepError(exc.reason, retryable=True)


@contextlib.asynccontextmanager
async def step_lease(
    js: JetStreamContext, run: StepRun, host: str, role: str, timeout_s: float
) -> AsyncIterator[LeasedStep]:
    """Hold this attempt's lease while the step runs: acquired before the retry wait,
    renewed by compare-and-set, released once the outcome is known. Renewal stops at the
    step's own deadline plus a margin, so a handler that ignores cancellation (a hung CRIU)
    still lets its lease expire. Refused (Conflict, TopologyMissing) if another live holder
    has it, if it expired (a watchdog acts on that), or if there is no leases bucket: the
    command is then not acked and comes back later."""
    command = run.command
    key = step_lease_key(command.migration_id, command.kind, command.step, command.attempt)
    me = LeaseHolder(host=host, role=role, pid=os.getpid())
    payload = StepLease(
        migration_id=command.migration_id,
        step=command.step,
        kind=command.kind,
        attempt=command.attempt,
        holder=me,
    )

    def gone(found: StepLease) -> bool:
        # This worker's earlier incarnation (one per host and role) that died holding it.
        before = found.holder
        same = (before.host, before.role) == (host, role) and not found.abandoned
        return same and (before.pid == me.pid or not _alive(before.pid))

    leases = await Leases.open(js, StepLease)
    renew_for = retry_wait_s(run) + timeout_s + RECORD_MARGIN_S
    async with leases.hold(key, payload, take_over=gone, renew_for_s=renew_for) as held:
        yield LeasedStep(held)


async def guarded(
    handler: StepHandler | None, run: StepRun, progress: Progress, timeout_s: float, where: str
) -> StepOutcome | StepError:
    """The handler's outcome, or why it failed and whether a retry can help. Waits out the
    retry backoff first; a handler past its timeout is a retryable failure."""
    command = run.command
    if handler is None:
        return StepError(f"{where} has no handler for {command.step}", retryable=False)
    try:
        wait = retry_wait_s(run)
        if wait > 0:
            with tracing.tracer().start_as_current_span(
                "retry backoff", attributes={"ferry.wait_s": round(wait, 3)}
            ):
                await asyncio.sleep(wait)
        log.info(
            "%s %s of %s (attempt %d)",
            command.kind,
            command.step,
            command.migration_id,
            command.attempt,
        )
        return await asyncio.wait_for(handler(run, progress), timeout_s)
    except FerryError as exc:
        log.warning("%s failed: %s", command.step, exc.reason)
        span = trace.get_current_span()
        span.set_attribute("error.type", type(exc).__name__)
        tail = getattr(exc, "log_tail", "")
        if tail:
            span.add_event("criu.log", {"lines": tail.splitlines()[-20:]})
        return StepError(exc.reason, exc.retryable)
    except TimeoutError:
        # The step's own deadline, or a bus request inside it: the traceback says which.
        log.warning("%s timed out", command.step, exc_info=True)
        return StepError(f"{command.step} timed out", retryable=True)
    except ConnectionError as exc:
        # A peer reset or refused the connection (its worker restarting): asking again helps.
        log.warning("%s: connection to a peer failed: %s", command.step, described(exc))
        return StepError(
            f"{command.step}: a peer's connection failed: {described(exc)}", retryable=True
        )
    except Exception as exc:
        log.exception("%s crashed", command.step)
        return StepError(f"internal error in {command.step}: {type(exc).__name__}: {exc}", False)


@contextlib.contextmanager
def step_span(run: StepRun, msg: Msg, host: str, role: str) -> Iterator[Span]:
    """The step's span, a child of the migration's trace carried in the message headers."""
    command, record = run.command, run.record
    label = "compensate" if command.kind == "compensation" else "step"
    with tracing.tracer().start_as_current_span(
        f"{label} {command.step}",
        context=propagate.extract(dict(msg.headers or {})),
        attributes={
            "ferry.migration_id": command.migration_id,
            "ferry.container": record.container,
            "ferry.source": record.source,
            "ferry.destination": record.destination,
            "ferry.host": host,
            "ferry.role": role,
            "ferry.step": command.step,
            "ferry.step_kind": command.kind,
            "ferry.attempt": command.attempt,
            "ferry.strategy": record.chosen,
        },
    ) as span:
        yield span


def annotate(span: Span, outcome: StepOutcome | StepError, decision: Decision) -> None:
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
    if outcome.result is not None:
        for key, value in outcome.result.model_dump(exclude_none=True).items():
            if isinstance(value, str | int | float | bool):
                span.set_attribute(f"ferry.{key}", value)
            elif isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
                span.set_attribute(f"ferry.{key}", list(value))
