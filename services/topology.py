"""The bus's topology: the streams, buckets, object store and durable consumers Ferry needs,
how the operator's bootstrap creates them, and how everyone else waits for them (never
creating: a store that was lost must not come back empty where it would read "nothing")."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from schemas import subjects
from schemas.v1.hosts import WORKER_ROLES
from services.errors import TopologyMissing, Unavailable, described
from services.leases import LEASES_BUCKET_CONFIG

# Buckets: name -> (history, ttl seconds or 0 for none).
BUCKETS: dict[str, tuple[int, float]] = {
    subjects.HOSTS_BUCKET: (1, subjects.HEARTBEAT_TTL_S),
    subjects.REGISTRY_BUCKET: (1, 0),
    subjects.PLACEMENT_BUCKET: (5, 0),
    subjects.IPAM_BUCKET: (1, 0),
    subjects.MIGRATIONS_BUCKET: (10, 0),
    subjects.IMAGES_BUCKET: (5, 0),
    subjects.FLEET_BUCKET: (5, 0),
}

STREAMS = (
    StreamConfig(
        name=subjects.COMMANDS_STREAM,
        subjects=[f"{subjects.PREFIX}.cmd.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=subjects.COMMAND_DEDUP_WINDOW_S,
        max_age=24 * 3600.0,
    ),
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[f"{subjects.PREFIX}.events.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=subjects.EVENTS_MAX_AGE_S,
    ),
    StreamConfig(
        name=subjects.SPANS_STREAM,
        subjects=[f"{subjects.PREFIX}.spans.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=subjects.SPANS_MAX_AGE_S,
    ),
)

# A crashed worker's command comes back after the first backoff; a live worker sends
# in-progress acks while it works, so long steps are not redelivered under its feet.
# FERRY_COMMAND_BACKOFF_S shortens it for chaos runs (a new lab: an existing durable keeps
# the config it was created with).
COMMAND_BACKOFF_S = [
    float(s) for s in os.environ.get("FERRY_COMMAND_BACKOFF_S", "10,20,40,60").split(",")
]
COMMAND_MAX_DELIVER = 5
TOPOLOGY_RETRY_S = 2.0


@dataclass(frozen=True)
class Part:
    """One piece of the topology: what it is, its name, and the stream that holds it."""

    kind: str  # "bucket", "stream" or "object store"
    name: str

    @property
    def stream(self) -> str:
        if self.kind == "bucket":
            return f"KV_{self.name}"
        if self.kind == "object store":
            return f"OBJ_{self.name}"
        return self.name

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def every_part() -> tuple[Part, ...]:
    """Every bucket, stream and store Ferry's processes rely on."""
    return (
        *(Part("bucket", b) for b in (*BUCKETS, LEASES_BUCKET_CONFIG.bucket)),
        *(Part("stream", s.name or "") for s in STREAMS),
        Part("object store", subjects.LAYERS_STORE),
    )


BOOTSTRAP_HINT = "create it with `ferry bootstrap` (in the lab: `ferry lab up`)"


async def missing_parts(
    js: JetStreamContext, wanted: Sequence[Part] | None = None, *, timeout: float = 5.0
) -> list[Part]:
    """The parts JetStream positively says do not exist. No answer is Unavailable: it
    says nothing about what exists."""
    missing = []
    for part in every_part() if wanted is None else wanted:
        try:
            await asyncio.wait_for(js.stream_info(part.stream), timeout)
        except NotFoundError:
            missing.append(part)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(
                f"JetStream did not say whether {part} exists: {described(exc)}"
            ) from exc
    return missing


async def require_topology(js: JetStreamContext) -> None:
    """Refuse to work on a bus whose buckets or streams are missing: a store that was lost
    must not be recreated empty by a worker, where it would read as "nothing anywhere"."""
    missing = await missing_parts(js)
    if missing:
        raise TopologyMissing(
            f"the bus lacks {', '.join(str(p) for p in missing)}; {BOOTSTRAP_HINT}",
            missing=tuple(str(p) for p in missing),
        )


async def wait_for_topology(js: JetStreamContext, logger: logging.Logger) -> None:
    """Until the topology exists: say why we wait (once per distinct reason), never create."""
    said = ""
    while True:
        try:
            await require_topology(js)
            if said:
                logger.info("the bus's topology is there now; going on")
            return
        except Unavailable as exc:  # TopologyMissing too
            if exc.reason != said:
                logger.warning("waiting: %s", exc.reason)
                said = exc.reason
        await asyncio.sleep(TOPOLOGY_RETRY_S)


def command_consumer(host: str, role: str) -> ConsumerConfig:
    """The durable of one host's role on the command work queue, made by the bootstrap:
    hosts may bind to theirs but never create one (a consumer could read others' commands)."""
    return ConsumerConfig(
        durable_name=subjects.command_durable(host, role),
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=COMMAND_MAX_DELIVER,
        backoff=COMMAND_BACKOFF_S,
        filter_subject=subjects.command_subject(host, role),
    )


async def create_topology(
    js: JetStreamContext, *, hosts: Sequence[str] = (), replicas: int = 1
) -> list[str]:
    """Bootstrap: create what is missing, leave what exists as it is; returns what it made.
    `replicas` copies of every stream, bucket and consumer (3 on a 3-node cluster); each of
    `hosts` gets its durable command consumers. Only an operator's `ferry bootstrap` (or
    `ferry lab up`) calls this."""
    created = []
    for part in await missing_parts(js):
        if part.kind == "bucket" and part.name == LEASES_BUCKET_CONFIG.bucket:
            config = dataclasses.replace(LEASES_BUCKET_CONFIG, replicas=replicas)
            await js.create_key_value(config=config)
        elif part.kind == "bucket":
            history, ttl = BUCKETS[part.name]
            config = KeyValueConfig(
                bucket=part.name,
                history=history,
                ttl=ttl or None,
                storage=StorageType.FILE,
                replicas=replicas,
            )
            await js.create_key_value(config=config)
        elif part.kind == "stream":
            stream = next(s for s in STREAMS if s.name == part.name)
            await js.add_stream(config=dataclasses.replace(stream, num_replicas=replicas))
        else:
            # nats-py overwrites config.bucket with the positional name: pass both.
            await js.create_object_store(
                part.name,
                config=ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas),
            )
        created.append(str(part))
    for host in hosts:
        for role in WORKER_ROLES:
            durable = subjects.command_durable(host, role)
            try:
                await js.consumer_info(subjects.COMMANDS_STREAM, durable)
                continue
            except NotFoundError:
                pass
            consumer = dataclasses.replace(command_consumer(host, role), num_replicas=replicas)
            await js.add_consumer(subjects.COMMANDS_STREAM, config=consumer)
            created.append(f"consumer {durable}")
    return created


# JetStream's answers while a cluster has no meta leader yet, or too few servers joined.
NOT_READY_CODES = frozenset({10005, 10008, 10023})  # no peers; temporarily unavailable; no quorum


async def create_topology_when_ready(
    js: JetStreamContext,
    *,
    hosts: Sequence[str] = (),
    replicas: int = 1,
    wait_s: float = 60.0,
    say: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """`create_topology`, waiting (and saying so) while a cluster that just started elects
    its leader: its first API calls time out or answer "no suitable peers"."""
    deadline = asyncio.get_running_loop().time() + wait_s
    created: list[str] = []
    said = ""
    while True:
        try:
            created += await create_topology(js, hosts=hosts, replicas=replicas)
            return created
        except (NatsTimeout, TimeoutError, APIError, Unavailable) as exc:
            # Unavailable: missing_parts got no answer at all, which is also "not ready yet".
            if isinstance(exc, APIError) and exc.err_code not in NOT_READY_CODES:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(
                    f"JetStream not ready after {wait_s:.0f}s: {described(exc)}"
                ) from exc
            why = f"waiting for JetStream to be ready: {described(exc)}"
            if why != said:
                say(why)
                said = why
            await asyncio.sleep(1.0)
