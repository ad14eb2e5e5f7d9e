"""`ferry reconcile [--apply] [--json]`: after a lost store, rebuild the placements and end
the interrupted migrations from every registered host's own record (its ledger) and what
its runc runs. Without --apply it only shows what it would write.

The judgement is workflows/reconcile.py's; this module asks the hosts, reads what the bus
still has, and writes: placements by create (never over one that exists), the address
claims that go with them, and for each migration the loss caught its record re-created
from the newest copy a host kept, ended by the saga (compensated, or rolled forward).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v2.ledger import LedgerReport, ReadLedger
from services import bus, topology
from services.cli.context import connected, current_context, operator_placements, say
from services.cli.host_commands import natural
from services.errors import Conflict, FerryError, Unavailable
from services.kvstores import KvHostDirectory, KvMigrationStore
from services.saga.publish import publish_decision
from workflows import reconcile

LEDGER_TIMEOUT_S = 10.0


async def _ledger_of(nc: NATS, host: str) -> LedgerReport | FerryError:
    try:
        return await bus.request(
            nc,
            subjects.host_request(host, subjects.HOST_LEDGER),
            ReadLedger(),
            LedgerReport,
            timeout=LEDGER_TIMEOUT_S,
            what=f"{host}'s ledger",
        )
    except FerryError as exc:
        return exc


async def gather_plan(nc: NATS) -> reconcile.Plan:
    """Every registered host's ledger (a silent one blocks writing), and what the bus has."""
    js = nc.jetstream()
    await topology.require_topology(js)
    directory = KvHostDirectory(
        await bus.bucket(js, subjects.REGISTRY_BUCKET), await bus.bucket(js, subjects.HOSTS_BUCKET)
    )
    hosts = sorted(await directory.known_hosts(), key=natural)
    if not hosts:
        raise Unavailable(
            "no host is registered on this bus yet: wait for the hosts' agents to join"
            " (`ferry hosts`), then reconcile"
        )
    answers = await asyncio.gather(*(_ledger_of(nc, h) for h in hosts))
    reports = [a for a in answers if isinstance(a, LedgerReport)]
    silent = {h: a.reason for h, a in zip(hosts, answers, strict=True) if isinstance(a, FerryError)}
    placements = await operator_placements(js)
    migrations = KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET))
    on_bus = {p.name: p for p in await placements.all()}
    records = {r.id: r for r in await migrations.all()}  # the truth, where a ledger's copy lags
    return reconcile.plan(reports, silent, on_bus, records, time.time())


async def _claim_address(ipam: KeyValue, ip: str, name: str) -> str | None:
    """Claim `ip` for `name` as create did; a claim by another name is reported."""
    key = subjects.ip_key(ip)
    try:
        await ipam.create(key, name.encode())
        return None
    except KeyWrongLastSequenceError:
        owner = (await ipam.get(key)).value or b""
        if owner == name.encode():
            return None
        return f"address {ip} is claimed by {owner.decode()!r}"


async def apply_plan(nc: NATS, plan: reconcile.Plan) -> dict[str, list[str]]:
    """Write what the plan says. Every write is a create: what appeared meanwhile wins and
    is reported."""
    blocked = plan.blocked
    if blocked:
        raise Unavailable(blocked)
    js = nc.jetstream()
    placements = await operator_placements(js)
    migrations = KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET))
    ipam = await bus.bucket(js, subjects.IPAM_BUCKET)
    written: list[str] = []
    refused: list[str] = []
    placed: set[str] = set()
    for planned in plan.placements:
        placement = planned.placement
        if planned.action == "exists":
            placed.add(placement.name)
            continue
        if planned.action != "create":
            continue
        try:
            await placements.claim(placement)
        except Conflict as exc:
            refused.append(f"placement {placement.name}: {exc.reason}")
            continue
        placed.add(placement.name)
        written.append(f"placement {placement.name} on {placement.host}")
        problem = await _claim_address(ipam, placement.ip, placement.name)
        if problem:
            refused.append(f"{placement.name}: {problem}")
    for planned_migration in plan.migrations:
        decision = planned_migration.decision
        if decision is None:
            continue
        record = decision.record
        if record.container not in placed:
            refused.append(f"migration {record.id}: its container has no placement to go on")
            continue
        try:
            await migrations.create(record)
        except Conflict as exc:
            refused.append(f"migration {record.id}: {exc.reason}")
            continue
        await publish_decision(js, decision, host=None)  # the operator's: every host's
        steps = ", ".join(c.step for c in decision.commands) or "nothing"
        written.append(f"migration {record.id} ({planned_migration.action}): next {steps}")
    return {"written": written, "refused": refused}


def _print_plan(plan: reconcile.Plan) -> None:
    print(f"hosts answered: {', '.join(plan.answered) or 'none'}")
    for host, why in sorted(plan.silent.items()):
        print(f"host {host} did not answer: {why}")
    print("placements:")
    for p in plan.placements:
        where = f"{p.placement.host} {p.placement.ip}"
        locked = f" (locked by {p.placement.migration_id})" if p.placement.migration_id else ""
        print(f"  {p.action:<8} {p.placement.name:<16} {where}{locked}: {p.reason}")
    if not plan.placements:
        print("  none")
    print("migrations:")
    for m in plan.migrations:
        r = m.record
        nxt = ", ".join(c.step for c in m.decision.commands) if m.decision else "-"
        print(f"  {m.action:<12} {r.id} {r.container} {r.source}->{r.destination}: {m.reason};"
              f" next: {nxt}")  # fmt: skip
    if not plan.migrations:
        print("  none")
    for c in plan.conflicts:
        print(f"conflict: {c.name}: {c.reason} (nothing written for it)")


Applied = dict[str, list[str]]


async def _reconcile(args: argparse.Namespace) -> tuple[reconcile.Plan, Applied | None]:
    async with connected(current_context(args)) as nc:
        plan = await gather_plan(nc)
        applied = await apply_plan(nc, plan) if args.apply and not plan.blocked else None
    return plan, applied


def reconcile_command(args: argparse.Namespace) -> int:
    plan, applied = asyncio.run(_reconcile(args))
    if args.json:
        document: dict[str, Any] = plan.as_json()
        document["applied"] = applied
        print(json.dumps(document))
    else:
        _print_plan(plan)
        if applied is None:
            blocked = plan.blocked
            say(blocked if blocked else "nothing written: run again with --apply to write it")
        else:
            for line in applied["written"]:
                print(f"wrote {line}")
            for line in applied["refused"]:
                print(f"not written: {line}")
    if args.apply and plan.blocked:
        raise Unavailable(plan.blocked)
    # A conflict leaves a container without a placement: an operator must look.
    refused = applied is not None and applied["refused"]
    return 1 if refused or plan.conflicts else 0
