"""`ferry migrate` and `ferry status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy
from pydantic import TypeAdapter, ValidationError

from schemas import subjects
from schemas.v1.base import ErrorReply
from schemas.v1.migrations import (
    CancelAccepted,
    DryRunReport,
    Event,
    MigrationAccepted,
)
from schemas.v2.migrations import MigrationRecord
from services import bus
from services.cli.context import BusContext, NoContext, connected, current_context, say
from services.cli.errors import one_line
from services.errors import FerryError, NotFound, RuntimeFailure, Unavailable, from_detail
from services.kvstores import KvMigrationStore
from workflows.definitions import DEFINITIONS

INTAKE_TIMEOUT_S = 15.0
RECORD_POLL_S = 3.0
EVENTS = TypeAdapter(Event)


class Rejected(Exception):
    """Intake refused the request; carries the error exactly as intake said it."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


async def submit(nc: NATS, payload: dict[str, Any], subject: str = "") -> bytes:
    """Send a request to intake; return its reply, or raise Rejected with intake's error.
    It goes out on this identity's own request subject (the record says who asked)."""
    subject = subject or subjects.migration_request(bus.identity(nc))
    try:
        msg = await nc.request(
            subject, json.dumps(payload).encode(), timeout=INTAKE_TIMEOUT_S,
            headers=bus.trace_headers(),
        )  # fmt: skip
    except NoRespondersError as exc:
        raise Unavailable("no host is taking migration requests (is the lab up?)") from exc
    except NatsTimeout as exc:
        raise Unavailable(
            f"no answer to the migration request within {INTAKE_TIMEOUT_S:.0f}s"
        ) from exc
    try:
        raise Rejected(ErrorReply.model_validate_json(msg.data))
    except ValidationError:
        return bytes(msg.data)


class ProgressView:
    """Prints the migration as it happens, one line per event, on stderr."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def show(self, event: Any) -> None:
        t = f"[{time.monotonic() - self.started:6.2f}s]"
        kind = event.type
        if kind == "accepted":
            say(
                f"{t} {event.container}: {event.source} -> {event.destination}"
                f" by {event.strategy.chosen} ({event.strategy.reason})"
            )
        elif kind == "step_started":
            label = "undo " if event.kind == "compensation" else ""
            retry = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            say(f"{t} {event.host:<4} {label}{event.step}{retry} ...")
        elif kind == "step_progress":
            say(f"{t} {event.host:<4}   {event.message}{_progress_figures(event)}")
        elif kind == "step_finished":
            outcome = event.status if not event.error else f"{event.status}: {event.error}"
            later = " — will retry" if event.will_retry else ""
            say(f"{t} {event.host:<4} {event.step} {outcome} ({event.duration_ms} ms){later}")
        elif kind == "finished":
            freeze = f", frozen {event.freeze_ms} ms" if event.freeze_ms is not None else ""
            moved = f", {event.bytes_moved / 2**20:.1f} MiB moved" if event.bytes_moved else ""
            say(f"{t} {event.state}{freeze}{moved}" + (f" — {event.error}" if event.error else ""))


def _progress_figures(event: Any) -> str:
    """ " [phase] 12.0/64.0 MiB 85.3 MiB/s ETA 0.6 s" — whatever the event carries."""
    parts = []
    if event.phase:
        parts.append(f"[{event.phase}]")
    if event.bytes_done is not None and event.bytes_total:
        parts.append(f"{event.bytes_done / 2**20:.1f}/{event.bytes_total / 2**20:.1f} MiB")
    if event.rate_bps:
        parts.append(f"{event.rate_bps / 2**20:.1f} MiB/s")
    if event.eta_s is not None:
        parts.append(f"ETA {event.eta_s:.1f} s")
    return ("  " + " ".join(parts)) if parts else ""


async def follow(nc: NATS, migration_id: str, deadline_s: float) -> None:
    """Show events from the first one on, until the migration finishes."""
    js = nc.jetstream()
    done = asyncio.Event()
    view = ProgressView()

    async def on_event(msg: Any) -> None:
        try:
            event = EVENTS.validate_json(msg.data)
        except ValidationError:
            return
        view.show(event)
        if event.type == "finished":
            done.set()

    sub = await js.subscribe(
        subjects.event_subject(migration_id),
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    store = KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET))
    give_up = time.monotonic() + deadline_s
    try:
        while not done.is_set():
            # Events are the fast path; the record is the truth if one went missing
            # (the bus restarting between the record's last write and its event).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), RECORD_POLL_S)
            if done.is_set():
                break
            with contextlib.suppress(Exception):
                found = await store.get(migration_id)
                if found and found[0].state in ("completed", "rolled_back", "failed"):
                    say(f"{found[0].state} (read from the record)")
                    break
            if time.monotonic() > give_up:
                raise RuntimeFailure(
                    f"migration {migration_id} has not finished after {deadline_s:.0f}s;"
                    f" follow it with `ferry status {migration_id}`"
                )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _migrate(args: argparse.Namespace) -> MigrationRecord:
    context = current_context(args)
    payload = {
        "schema_version": 1,
        "container": args.name,
        "strategy": args.strategy,
        "compress": args.compress,
        "block_deltas": not args.whole_files,
    }
    if args.to is not None:  # absent: the fleet's scheduler chooses
        payload["destination"] = args.to
    if args.downtime_budget is not None:  # given, it is a limit (schemas/v1/migrations.py)
        payload["downtime_budget_ms"] = args.downtime_budget
    if args.bandwidth_limit is not None:
        payload["bandwidth_limit_mib_s"] = args.bandwidth_limit
    if args.inject_fault:
        payload["inject_fault"] = args.inject_fault
    if args.dry_run:
        payload["dry_run"] = True
    async with connected(context) as nc:
        reply = await submit(nc, payload)
        if args.dry_run:
            raise DryRunDone(DryRunReport.model_validate_json(reply))
        try:
            migration_id = MigrationAccepted.model_validate_json(reply).id
        except ValidationError as exc:
            raise RuntimeFailure(f"unreadable answer from intake: {reply[:200]!r}") from exc
        store = KvMigrationStore(await bus.bucket(nc.jetstream(), subjects.MIGRATIONS_BUCKET))
        found = await store.get(migration_id)
        say(f"migration {migration_id} accepted" + (_where(found[0]) if found else ""))
        if found:
            after_commit = DEFINITIONS[found[0].chosen].after_commit_s
            budget = found[0].deadline - time.time() + after_commit + 30
        else:
            budget = 600
        await follow(nc, migration_id, max(budget, 30))
        found = await store.get(migration_id)
    if found is None:
        raise RuntimeFailure(f"migration {migration_id} has no record")
    return found[0]


def _where(record: MigrationRecord) -> str:
    """The destination, and why the scheduler chose it when nobody named it."""
    choice = record.placement
    if choice is None or choice.named_by_operator:
        return f": to {record.destination}"
    return (
        f": to {record.destination}, chosen by the fleet's scheduler ({'; '.join(choice.reasons)})"
    )


class DryRunDone(Exception):
    """The dry run's report (not an error: it ends the command)."""

    def __init__(self, report: DryRunReport) -> None:
        super().__init__("dry run")
        self.report = report


def migrate(args: argparse.Namespace) -> int:
    try:
        record = asyncio.run(_migrate(args))
    except DryRunDone as done:
        report = done.report
        if args.json:
            print(report.model_dump_json(exclude={"schema_version"}))
        for check in report.checks:
            mark = "ok  " if check.ok else "FAIL"
            say(f"{mark} {check.host:<4} {check.check}: {check.detail}")
        say("the move would work" if report.ok else "the move would fail: see FAIL above")
        return 0 if report.ok else 1
    except Rejected as rejected:
        error = from_detail(rejected.reply.error)
        if args.json:
            detail = rejected.reply.error
            print(json.dumps({"error": {"field": detail.field, "reason": detail.reason}}))
        raise error from None
    if args.json:
        print(json.dumps(record.public()))
    else:
        print(f"{record.id} {record.state}")
    return 0 if record.state == "completed" else 1


async def _status(context: BusContext, migration_id: str | None) -> list[MigrationRecord]:
    async with connected(context) as nc:
        store = KvMigrationStore(await bus.bucket(nc.jetstream(), subjects.MIGRATIONS_BUCKET))
        if migration_id is None:
            return await store.all()
        found = await store.get(migration_id)
    if found is None:
        raise NotFound(f"no migration {migration_id!r}", field="ID")
    return [found[0]]


def status(args: argparse.Namespace) -> int:
    try:
        records = asyncio.run(_status(current_context(args), args.id))
    except FerryError as exc:
        if args.id is None and isinstance(exc, NoContext):  # nothing to list, as for no lab
            say(one_line(exc))
            records = []
        else:
            raise
    if args.json:
        print(json.dumps(records[0].public() if args.id else [r.public() for r in records]))
        return 0
    for r in records:
        freeze = f"{r.freeze_ms} ms" if r.freeze_ms is not None else "-"
        print(
            f"{r.id}  {r.container:<16} {r.source}->{r.destination}  {r.state:<12} freeze {freeze}"
        )
        if args.id:
            for s in r.steps:
                label = "undo " if s.kind == "compensation" else ""
                print(
                    f"    {label}{s.name:<20} {s.host:<4} {s.status:<11}"
                    f" x{s.attempts} {s.duration_ms or 0:>6} ms  {s.error or ''}",
                    file=sys.stdout,
                )
    return 0


async def _cancel(args: argparse.Namespace) -> MigrationRecord:
    async with connected(current_context(args)) as nc:
        reply = await submit(
            nc,
            {"schema_version": 1, "id": args.id, "reason": args.reason},
            subjects.migration_cancel(bus.identity(nc)),
        )
        accepted = CancelAccepted.model_validate_json(reply)
        say(f"migration {accepted.id}: cancelling at the next step boundary")
        store = KvMigrationStore(await bus.bucket(nc.jetstream(), subjects.MIGRATIONS_BUCKET))
        await follow(nc, accepted.id, 600)
        found = await store.get(accepted.id)
    if found is None:
        raise RuntimeFailure(f"migration {args.id} has no record")
    return found[0]


def cancel(args: argparse.Namespace) -> int:
    """Exit 0 once rolled back, 1 if it ended otherwise, 2 if refused (unknown, committed, over)."""
    try:
        record = asyncio.run(_cancel(args))
    except Rejected as rejected:
        if args.json:
            detail = rejected.reply.error
            print(json.dumps({"error": {"field": detail.field, "reason": detail.reason}}))
        raise from_detail(rejected.reply.error) from None
    if args.json:
        print(json.dumps(record.public()))
    else:
        print(f"{record.id} {record.state}")
    return 0 if record.state == "rolled_back" else 1
