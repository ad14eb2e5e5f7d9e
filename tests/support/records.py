"""Every Placement, HostRegistration and MigrationRecord the middle-tier tests need, in one
place, so a change to the record schema is made here and nowhere else.

Also what tests compare records by (`summary`): only the fields whose meaning is settled,
never `facts`, which are changing.
"""

from __future__ import annotations

import time
from typing import Any

from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v1.hosts import HostHeartbeat, HostRegistration
from schemas.v1.migrations import StepRecord
from schemas.v2.migrations import MigrationRecord
from workflows.definitions import DEFINITIONS
from workflows.placement_chain import OPERATOR_AUTHOR

LAYER = "a" * 64
HOUR_S = 3600.0
TRACE_ID = "0" * 31 + "1"


def placement(
    name: str = "web",
    host: str = "h1",
    *,
    state: str = "running",
    migration_id: str | None = None,
    ip: str = "10.77.0.10",
) -> Placement:
    return Placement.model_validate(
        {
            "name": name,
            "host": host,
            "ip": ip,
            "mac": "02:00:0a:4d:00:0a",
            "layers": [LAYER],
            "args": ["/bin/memapp", "7000", "4"],
            "state": state,
            "migration_id": migration_id,
        }
    )


def host_registration(
    host: str, *, features: tuple[str, ...] = (), missing: dict[str, str] | None = None
) -> HostRegistration:
    return HostRegistration(
        host=host,
        address=address_of(host),
        registered_at=time.time(),
        features=features,
        missing=missing or {},
    )


def address_of(host: str) -> str:
    """A stable, distinct address per host name (h1 -> 10.77.1.1, h2 -> 10.77.1.2, ...)."""
    return f"10.77.1.{sum(host.encode()) % 250 + 1}"


def heartbeat(host: str) -> HostHeartbeat:
    return HostHeartbeat(host=host, address=address_of(host), agent_pid=1, sent_at=time.time())


def step(
    name: str,
    host: str,
    *,
    role: str,
    kind: str = "forward",
    status: str = "running",
    attempts: int = 1,
    started_at: float | None = None,
) -> StepRecord:
    return StepRecord.model_validate(
        {
            "name": name,
            "kind": kind,
            "role": role,
            "host": host,
            "status": status,
            "attempts": attempts,
            "started_at": started_at,
            "finished_at": None if status == "running" else started_at,
        }
    )


def migration_record(
    migration_id: str = "0123456789abcdef",
    *,
    container: str = "web",
    source: str = "h1",
    destination: str = "h2",
    strategy: str = "stop-and-copy",
    state: str = "running",
    steps: tuple[StepRecord, ...] = (),
    committed: bool = False,
    cancel_requested: str | None = None,
    created_at: float | None = None,
    updated_at: float | None = None,
    deadline: float | None = None,
) -> MigrationRecord:
    now = time.time()
    created = now if created_at is None else created_at
    return MigrationRecord.model_validate(
        {
            "id": migration_id,
            "container": container,
            "source": source,
            "destination": destination,
            "state": state,
            "strategy": {"chosen": strategy, "reason": "requested"},
            "trace_id": TRACE_ID,
            "traceparent": f"00-{TRACE_ID}-{'0' * 15}1-01",  # as intake reserves it
            "created_at": created,
            "updated_at": created if updated_at is None else updated_at,
            "deadline": created + HOUR_S if deadline is None else deadline,
            "committed": committed,
            "cancel_requested": cancel_requested,
            "steps": steps,
        }
    )


def running_at(
    step_name: str,
    *,
    since: float,
    attempts: int = 1,
    migration_id: str = "0123456789abcdef",
    source: str = "h1",
    destination: str = "h2",
    strategy: str = "stop-and-copy",
    deadline: float | None = None,
) -> MigrationRecord:
    """A running migration whose forward steps before `step_name` are done and which has been
    running `step_name` since `since` (its `attempts`-th attempt)."""
    definition = DEFINITIONS[strategy]
    steps = []
    for s in definition.steps:
        host = source if s.side == "source" else destination
        if s.name == step_name:
            steps.append(step(s.name, host, role=s.role, attempts=attempts, started_at=since))
            break
        steps.append(step(s.name, host, role=s.role, status="done", started_at=since))
    else:
        raise ValueError(f"{strategy} has no step {step_name!r}")
    names = [s.name for s in definition.steps]
    committed = names.index(step_name) > names.index(definition.commit_after)
    return migration_record(
        migration_id,
        source=source,
        destination=destination,
        strategy=strategy,
        steps=tuple(steps),
        committed=committed,
        created_at=since,
        updated_at=since,
        deadline=deadline,
    )


def summary(record: MigrationRecord) -> dict[str, Any]:
    """What tests assert on: settled fields only (never `facts`). The stores may hand back a
    later version of the record than the one written here; these fields mean the same."""
    return {
        "id": record.id,
        "container": record.container,
        "source": record.source,
        "destination": record.destination,
        "state": record.state,
        "strategy": record.strategy.chosen,
        "committed": record.committed,
        "cancel_requested": record.cancel_requested,
        "steps": [(s.name, s.kind, s.status, s.attempts, s.host) for s in record.steps],
    }


def stored(found: tuple[MigrationRecord, int] | None) -> tuple[dict[str, Any], int] | None:
    """A store's answer (record, revision) with the record as its summary."""
    return None if found is None else (summary(found[0]), found[1])


# Writing straight to the buckets, the way hosts' agents and workers would have.


async def put_host(
    js: JetStreamContext,
    host: str,
    *,
    alive: bool = True,
    features: tuple[str, ...] = (),
    missing: dict[str, str] | None = None,
) -> None:
    """Register `host` (KV ferry-registry) and, if `alive`, its agent's heartbeat (ferry-hosts)."""
    registry = await js.key_value(subjects.REGISTRY_BUCKET)
    registration = host_registration(host, features=features, missing=missing)
    await registry.put(host, registration.to_bytes())
    if alive:
        await put_heartbeat(js, host)


async def put_heartbeat(js: JetStreamContext, host: str) -> None:
    heartbeats = await js.key_value(subjects.HOSTS_BUCKET)
    await heartbeats.put(host, heartbeat(host).to_bytes())


async def put_placement(js: JetStreamContext, record: Placement) -> int:
    """Written as the operator would (under its name; the operator may write anything)."""
    kv = await js.key_value(subjects.PLACEMENT_BUCKET)
    return int(
        await kv.put(subjects.placement_key(OPERATOR_AUTHOR, record.name), record.to_bytes())
    )


async def put_migration(js: JetStreamContext, record: MigrationRecord) -> int:
    kv = await js.key_value(subjects.MIGRATIONS_BUCKET)
    return int(await kv.put(record.id, record.to_bytes()))
