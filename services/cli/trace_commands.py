"""`ferry trace ID` and `ferry trace --failed`: read a move's spans from the bus."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from schemas import subjects
from schemas.v2.migrations import MigrationRecord
from services import bus
from services.cli.context import BusContext, connected, current_context
from services.errors import InvalidInput, NotFound
from services.kvstores import KvMigrationStore

WAIT_FOR_ROOT_S = 5.0
IDLE_S = 0.5
KEY_ATTRIBUTES = (
    "ferry.attempt",
    "ferry.bytes",
    "ferry.rate_bps",
    "ferry.freeze_ms",
    "ferry.frozen_to_open_ms",
    "ferry.forecast_ms",
    "ferry.forecast_ratio",
    "ferry.page_bytes",
    "criu.criu_freezing_us",
    "criu.criu_frozen_us",
    "criu.pages_written",
    "criu.pages_scanned",
    "criu.restore_time_us",
    "criu.pages_restored",
    "ferry.announced",
    "ferry.retryable",
)


async def read_spans(nc: NATS, trace_id: str) -> list[dict[str, Any]]:
    """Every span of the trace in the span stream, as the workers published them."""
    js = nc.jetstream()
    spans: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def collect(msg: Any) -> None:
        spans.append(json.loads(msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subjects.span_subject(trace_id),
        cb=collect,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        await asyncio.wait_for(done.wait(), IDLE_S)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return sorted(spans, key=lambda s: (s["start"], s["name"]))


async def _load(
    context: BusContext, migration_id: str
) -> tuple[MigrationRecord, list[dict[str, Any]]]:
    async with connected(context) as nc:
        store = KvMigrationStore(await bus.bucket(nc.jetstream(), subjects.MIGRATIONS_BUCKET))
        found = await store.get(migration_id)
        if found is None:
            raise NotFound(f"no migration {migration_id!r}", field="ID")
        record = found[0]
        deadline = time.monotonic() + WAIT_FOR_ROOT_S
        while True:
            spans = await read_spans(nc, record.trace_id)
            finished = record.state in ("completed", "rolled_back", "failed")
            if not finished or any(s["parent_id"] is None for s in spans):
                return record, spans
            if time.monotonic() > deadline:
                return record, spans
            await asyncio.sleep(0.2)


def _tree(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Spans in waterfall order: each after its parent, siblings by start time."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in ids else None
        by_parent.setdefault(parent, []).append(s)
    ordered: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s["start"]):
            ordered.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return ordered


def _paint(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if sys.stdout.isatty() else text


def print_waterfall(record: MigrationRecord, spans: list[dict[str, Any]]) -> None:
    print(
        f"migration {record.id}  {record.container} {record.source} -> {record.destination}"
        f"  {record.state}  strategy {record.strategy.chosen} ({record.strategy.reason})"
        f"  trace {record.trace_id}"
    )
    if not spans:
        print("  (no spans yet)")
        return
    origin = min(s["start"] for s in spans)
    print(f"  {'start':>8} {'duration':>9}  {'host':<5} {'status':<6} span")
    ordered = _tree(spans)
    # CRIU's words go under the deepest span that carries them (descendants come first
    # when the waterfall is read backwards).
    owner: dict[str, str] = {}
    for _, s in reversed(ordered):
        for event in s["events"]:
            if event["name"] == "criu.log":
                owner.setdefault("\n".join(event["attributes"].get("lines", [])), s["span_id"])
    for depth, s in ordered:
        start_ms = (s["start"] - origin) / 1e6
        dur_ms = ((s["end"] or s["start"]) - s["start"]) / 1e6
        attrs = s["attributes"]
        keys = " ".join(f"{k.split('.', 1)[1]}={attrs[k]}" for k in KEY_ATTRIBUTES if k in attrs)
        line = (
            f"  {start_ms:>6.0f}ms {dur_ms:>7.0f}ms  {s['host'] or '-':<5} {s['status']:<6}"
            f" {'  ' * depth}{s['name']}  {keys}"
        )
        if s["status"] == "error":
            print(_paint(line, "31;1"))
            message = s.get("status_message") or attrs.get("ferry.error")
            if message:
                print(_paint(f"  {'':>28}{'  ' * depth}error: {message}", "31"))
            for event in s["events"]:
                lines = event["attributes"].get("lines", [])
                if event["name"] == "criu.log" and owner.get("\n".join(lines)) == s["span_id"]:
                    for text in lines:
                        print(_paint(f"  {'':>28}{'  ' * depth}| {text}", "33"))
        else:
            print(line)


async def _failed(context: BusContext) -> list[MigrationRecord]:
    async with connected(context) as nc:
        store = KvMigrationStore(await bus.bucket(nc.jetstream(), subjects.MIGRATIONS_BUCKET))
        records = await store.all()
    failed = [r for r in records if r.state in ("rolled_back", "failed")]
    return sorted(failed, key=lambda r: r.created_at, reverse=True)[:50]


def trace(args: argparse.Namespace) -> int:
    if args.failed:
        records = asyncio.run(_failed(current_context(args)))
        if args.json:
            print(json.dumps([_failure_summary(r) for r in records]))
            return 0
        for r in records:
            f = _failure_summary(r)
            print(
                f"{r.id}  {r.container:<14} {r.source}->{r.destination}  {r.state:<11}"
                f" {f['failed_step'] or '-'}@{f['failed_host'] or '-'}: {f['error']}"
            )
        return 0
    if args.id is None:
        raise InvalidInput("give a migration ID, or --failed", field="ID")
    record, spans = asyncio.run(_load(current_context(args), args.id))
    if args.json:
        print(json.dumps([{k: v for k, v in s.items() if k != "status_message"} for s in spans]))
    else:
        print_waterfall(record, spans)
    return 0


def _failure_summary(record: MigrationRecord) -> dict[str, Any]:
    failed = next((s for s in reversed(record.steps) if s.kind == "forward" and s.error), None)
    return {
        "id": record.id,
        "container": record.container,
        "source": record.source,
        "destination": record.destination,
        "state": record.state,
        "failed_step": failed.name if failed else None,
        "failed_host": failed.host if failed else None,
        "error": record.error,
        "trace_id": record.trace_id,
        "created_at": record.created_at,
    }
