"""`ferry hosts`: every host that joined the bus (the registry) and whether it is alive now
(its agent's and its four workers' heartbeats), plus whatever `ferry.cli.hosts` plugins add
(the lab adds each host's netns, runc root, state dir and segment)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v1.fleet import FleetState, HostReservations
from schemas.v1.hosts import (
    WORKER_ROLES,
    DeadDeclaration,
    HostHeartbeat,
    HostRegistration,
    WorkerHeartbeat,
)
from services import bus, topology
from services.cli import plugins
from services.cli.context import (
    BusContext,
    connected,
    context_or_none,
    current_context,
    operator_placements,
    say,
)
from services.errors import InvalidInput, Unavailable
from services.fleet_state import FleetStore
from services.kvstores import KvHostDirectory
from workflows import reservations

HEALTH_TIMEOUT_S = 2.0


def natural(name: str) -> list[Any]:
    """h2 before h10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


async def healthy_beat(heartbeats: KeyValue, host: str) -> HostHeartbeat | None:
    """The host's latest heartbeat if the host and all four of its workers are alive."""
    try:
        beat = HostHeartbeat.from_bytes((await heartbeats.get(host)).value or b"")
        for role in WORKER_ROLES:
            await heartbeats.get(subjects.worker_key(host, role))
    except Exception:  # a missing key means that part has not beaten lately
        return None
    if len(beat.workers) == len(WORKER_ROLES) and all(w.pid for w in beat.workers):
        return beat
    return None


async def worker_alerts(heartbeats: KeyValue, host: str) -> list[str]:
    """What the host's workers want an operator to see (their heartbeats' `health`)."""
    alerts = []
    for role in WORKER_ROLES:
        try:
            beat = WorkerHeartbeat.from_bytes(
                (await heartbeats.get(subjects.worker_key(host, role))).value or b""
            )
        except Exception:  # no beat lately, or one from a worker that reports no health
            continue
        alerts += [f"{role}: {line}" for line in beat.health]
    return alerts


async def host_rows(nc: NATS) -> list[dict[str, Any]]:
    js = nc.jetstream()
    try:
        directory = KvHostDirectory(
            await bus.bucket(js, subjects.REGISTRY_BUCKET),
            await bus.bucket(js, subjects.HOSTS_BUCKET),
        )
    except BucketNotFoundError:  # a bus no host has joined yet
        return []
    fleet = await _fleet_facts(js)
    rows = []
    for host in sorted(await directory.known_hosts(), key=natural):
        registration = await directory.registered(host)
        beat = await healthy_beat(directory.heartbeats, host)
        address = registration.address if registration else beat.address if beat else ""
        row: dict[str, Any] = {
            "name": host,
            "address": address,
            "health": "ok" if beat else "down",
            "workers": {w.role: w.pid for w in beat.workers} if beat else {},
        }
        if alerts := await worker_alerts(directory.heartbeats, host):
            row["alerts"] = alerts  # only when there are some: the row keeps its old shape
        if registration and registration.declared_dead:  # likewise only when declared
            row["declared_dead"] = registration.declared_dead.model_dump(mode="json")
        if registration and registration.versions:  # an older agent announces none
            row["versions"] = registration.versions.model_dump(mode="json")
        if registration is not None and fleet is not None:
            row.update(fleet.row(registration, beat))
        rows.append(row)
    return rows


class FleetFacts:
    """What the fleet knows of each host: cordons, claims, reservations, moves."""

    def __init__(
        self, state: FleetState, placements: list[Placement], ledgers: dict[str, HostReservations]
    ) -> None:
        self.state = state
        self.placements = placements
        self.claims = reservations.claims(placements, ledgers.values())

    def row(self, registration: HostRegistration, beat: HostHeartbeat | None) -> dict[str, Any]:
        host = registration.host
        claims = self.claims
        used = [c for c in claims if c.host == host and c.kind != "reserved"]
        placed = {c.container for c in used}
        reserved = [
            c
            for c in claims
            if c.host == host and c.kind == "reserved" and c.container not in placed
        ]
        cordon = self.state.cordoned.get(host)
        usage = beat.usage if beat is not None else None
        return {
            "zone": registration.zone,
            "region": registration.region,
            "cloud": registration.cloud,
            "labels": dict(registration.labels),
            "capacity": registration.capacity.model_dump(mode="json"),
            "used": {
                "memory_mib": sum(c.memory_mib for c in used),
                "cpus": round(sum(c.cpus for c in used), 3),
                "containers": sorted(placed),
            },
            "reserved": {
                "memory_mib": sum(c.memory_mib for c in reserved),
                "cpus": round(sum(c.cpus for c in reserved), 3),
                "containers": sorted(c.container for c in reserved),
            },
            "load": None
            if usage is None
            else {"memory_bytes": usage.memory_bytes, "cpu_percent": usage.cpu_percent},
            "cordoned": None if cordon is None else cordon.model_dump(mode="json"),
            "migrations_in": sorted(
                p.name for p in self.placements if p.state == "migrating" and p.destination == host
            ),
            "migrations_out": sorted(
                p.name for p in self.placements if p.state == "migrating" and p.host == host
            ),
        }


async def _fleet_facts(js: JetStreamContext) -> FleetFacts | None:
    """None on a bus without the fleet bucket (bootstrapped by an older release)."""
    try:
        store = FleetStore(await bus.bucket(js, subjects.FLEET_BUCKET))
        placements = await (await operator_placements(js)).all()
    except BucketNotFoundError:
        return None
    state, _ = await store.state()
    hosts = {p.host for p in placements} | {p.destination for p in placements if p.destination}
    for key in await _ledger_keys(store):
        hosts.add(key)
    ledgers = {h: (await store.ledger(h))[0] for h in hosts}
    return FleetFacts(state, placements, ledgers)


async def _ledger_keys(store: FleetStore) -> list[str]:
    prefix = subjects.reservations_key("")
    try:
        keys = await store.kv.keys()
    except Exception:  # no keys at all (nats-py raises) or none readable: none known
        return []
    return [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]


async def _from_bus(context: BusContext) -> tuple[list[dict[str, Any]], Unavailable | None]:
    try:
        async with connected(context, connect_timeout=HEALTH_TIMEOUT_S) as nc:
            return await host_rows(nc), None
    except Unavailable as exc:
        return [], exc


def hosts(args: argparse.Namespace) -> int:
    context = context_or_none(args)
    rows: list[dict[str, Any]] = []
    if context is not None:
        rows, unreachable = asyncio.run(_from_bus(context))
        rows = plugins.host_details(context, rows)
        if unreachable is not None:
            if not rows:
                raise unreachable
            say(f"ferry: warning: {unreachable.reason}; every host shows as down")
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        if context is not None:
            say("no host has joined this bus yet")
        return 0
    print(
        f"{'HOST':<6} {'ADDRESS':<15} {'HEALTH':<7} {'ZONE':<6} {'MEMORY MiB USED+RES/CAP':<24}"
        f" {'CPUS':<11} {'LOAD':<11} {'IN/OUT':<7} {'WIRE':<6} {'CRIU':<8} {'RUNC':<10} STATE DIR"
    )
    for row in rows:
        v = row.get("versions") or {}
        wire = f"{v['wire_min']}..{v['wire']}" if v else "-"
        what = f"{row['name']:<6} {row['address']:<15} {row['health']:<7}"
        print(
            f"{what} {_fleet_columns(row)} {wire:<6} {v.get('criu', '-'):<8}"
            f" {v.get('runc', '-'):<10} {row.get('state_dir', '-')}"
        )
        if cordon := row.get("cordoned"):
            print(f"       ! cordoned by {cordon['by']}: {cordon['reason'] or 'no reason given'}")
        if dead := row.get("declared_dead"):
            print(f"       ! declared dead by an operator: {dead['reason']}")
        for alert in row.get("alerts", []):
            print(f"       ! {alert}")
    return 0


def _fleet_columns(row: dict[str, Any]) -> str:
    if "used" not in row:
        return f"{'-':<6} {'-':<24} {'-':<11} {'-':<11} {'-':<7}"
    cap = row["capacity"]
    used, res = row["used"], row["reserved"]
    memory = f"{used['memory_mib']}+{res['memory_mib']}/{cap.get('memory_mib') or '?'}"
    cpus = f"{used['cpus'] + res['cpus']:g}/{cap.get('cpus') or '?'}"
    load = row.get("load")
    shown = (
        "-" if load is None else f"{load['memory_bytes'] / 2**20:.0f}M {load['cpu_percent']:.0f}%"
    )
    moves = f"{len(row['migrations_in'])}/{len(row['migrations_out'])}"
    return f"{row['zone'] or '-':<6} {memory:<24} {cpus:<11} {shown:<11} {moves:<7}"


def add_subcommands(hosts_parser: argparse.ArgumentParser) -> None:
    """`ferry hosts declare-dead HOST --reason TEXT [--force] [--json]`."""
    sub = hosts_parser.add_subparsers(dest="hosts_command", parser_class=type(hosts_parser))
    dead = sub.add_parser(
        "declare-dead",
        help="record that a host is gone for good: ways back that wait for it end,"
        " `ferry recover` may act",
    )
    dead.add_argument("host", metavar="HOST")
    dead.add_argument("--reason", required=True, help="why: kept in the host's registry entry")
    dead.add_argument(
        "--force",
        action="store_true",
        help="even though its agent still sends heartbeats (only if you know it is gone)",
    )
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(run=declare_dead)


async def _declare_dead(
    context: BusContext, host: str, reason: str, force: bool
) -> HostRegistration:
    async with connected(context) as nc:
        js = nc.jetstream()
        await topology.require_topology(js)
        directory = KvHostDirectory(
            await bus.bucket(js, subjects.REGISTRY_BUCKET),
            await bus.bucket(js, subjects.HOSTS_BUCKET),
        )
        declaration = DeadDeclaration(reason=reason, declared_at=time.time())
        return await directory.declare_dead(host, declaration, force=force)


def declare_dead(args: argparse.Namespace) -> int:
    """Exit 0 once recorded (or already declared), 2 for an unknown or live host or no reason."""
    reason = args.reason.strip()
    if not reason:
        raise InvalidInput("say why the host is dead (it is kept with the declaration)",
                           field="--reason")  # fmt: skip
    registration = asyncio.run(_declare_dead(current_context(args), args.host, reason, args.force))
    declared = registration.declared_dead
    assert declared is not None
    if args.json:
        print(
            json.dumps(
                {"host": registration.host, "declared_dead": declared.model_dump(mode="json")}
            )
        )
    else:
        again = "" if declared.reason == reason else " (already declared; kept the first reason)"
        print(f"{registration.host} declared dead: {declared.reason}{again}")
    return 0


async def check_host(nc: NATS, host: str, field: str = "--host") -> None:
    """Bad input unless `host` joined the bus (it may be down: the command then says so)."""
    js = nc.jetstream()
    try:
        known = await KvHostDirectory(
            await bus.bucket(js, subjects.REGISTRY_BUCKET),
            await bus.bucket(js, subjects.HOSTS_BUCKET),
        ).known_hosts()
    except BucketNotFoundError:
        known = []
    if host not in known:
        listed = ", ".join(sorted(known, key=natural)) or "none"
        raise InvalidInput(f"unknown host {host!r} (known: {listed})", field=field)
