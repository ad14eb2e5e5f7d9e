"""The NATS edge: connections, the bus topology, typed request/reply, trace headers.

Everything that speaks NATS goes through here, so no handler has to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
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
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from opentelemetry import propagate
from pydantic import BaseModel, ValidationError

from schemas import subjects
from schemas.v1.base import ErrorReply
from schemas.v1.base import Message as MessageV1
from schemas.v1.hosts import WORKER_ROLES
from schemas.v2.base import Message as MessageV2
from schemas.v2.migrations import StepCommand
from services.credentials import load_credentials
from services.errors import (
    FerryError,
    Forbidden,
    InvalidInput,
    RuntimeFailure,
    TopologyMissing,
    Unavailable,
    from_detail,
)
from services.leases import LEASES_BUCKET_CONFIG

log = logging.getLogger("ferry.bus")
ReplyT = TypeVar("ReplyT", bound=BaseModel)
Message = MessageV1 | MessageV2
RequestT = TypeVar("RequestT", bound=BaseModel)

# Buckets: name -> (history, ttl seconds or 0 for none).
BUCKETS: dict[str, tuple[int, float]] = {
    subjects.HOSTS_BUCKET: (1, subjects.HEARTBEAT_TTL_S),
    subjects.REGISTRY_BUCKET: (1, 0),
    subjects.PLACEMENT_BUCKET: (5, 0),
    subjects.IPAM_BUCKET: (1, 0),
    subjects.MIGRATIONS_BUCKET: (10, 0),
    subjects.IMAGES_BUCKET: (5, 0),
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
IN_PROGRESS_EVERY_S = 3.0
TOPOLOGY_RETRY_S = 2.0


async def connect(
    url: str | Sequence[str],
    name: str,
    *,
    creds: Path | None = None,
    ca: Path | None = None,
    connect_timeout: float = 5.0,
    give_up_after: float | None = None,
) -> NATS:
    """Connect to one server or any of a cluster's, and keep reconnecting forever (to the
    others too): a worker outlives a restarting server. `creds` is this identity's
    credentials file; `ca` the CA that signed the servers' certificates (TLS);
    `give_up_after` bounds the first connection (a CLI), else it is tried until it works."""
    servers = [url] if isinstance(url, str) else list(url)
    auth: dict[str, Any] = {}
    if creds is not None:
        secret = load_credentials(creds)
        auth = {
            "user": secret.user,
            "password": secret.password.get_secret_value(),
            # Replies to this identity come to its own inboxes: no one else may read them.
            "inbox_prefix": f"_INBOX.{secret.user}",
        }
    if ca is not None:
        try:
            auth["tls"] = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot use CA {ca}: {exc}", field="ca") from exc
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        # One line, no traceback; a permissions violation is worth seeing in the log.
        if "authorization violation" in str(exc).lower():
            refused.set()
        log.warning("nats: %s", exc)

    connecting = asyncio.ensure_future(
        nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=on_error,
            **auth,
        )
    )
    # nats-py retries a refused login forever: the server's answer ends it here.
    said_no = asyncio.ensure_future(refused.wait())
    await asyncio.wait(
        {connecting, said_no}, timeout=give_up_after, return_when=asyncio.FIRST_COMPLETED
    )
    said_no.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if refused.is_set():
            raise _refused(servers, creds)
        raise Unavailable(f"cannot reach NATS at {', '.join(servers)} (tried {give_up_after}s)")
    try:
        nc = connecting.result()
    except (OSError, NatsTimeout, NatsError) as exc:
        raise Unavailable(f"cannot reach NATS at {', '.join(servers)}: {exc}") from exc
    if not nc.is_connected:
        # nats-py returns a client stuck "connecting" (it never sends) when any line beats the
        # PONG to its PING, e.g. the server's first PING, sent 2 s after the client arrived,
        # when checking the CONNECT (bcrypt) took longer on a busy server.
        await nc.close()
        log.warning("nats: %s sent another line before PONG; connecting again", ", ".join(servers))
        return await connect(
            url, name, creds=creds, ca=ca, connect_timeout=connect_timeout,
            give_up_after=give_up_after,
        )  # fmt: skip
    return nc


def identity(nc: NATS) -> str:
    """The bus identity this connection speaks as (its NATS user), or anonymous."""
    user = nc.options.get("user")
    return str(user) if user else subjects.ANONYMOUS


def _refused(servers: list[str], creds: Path | None) -> Forbidden:
    who = f"the credentials in {creds}" if creds else "an anonymous client (no credentials)"
    return Forbidden(f"NATS at {', '.join(servers)} refused {who}", field="creds")


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


def topology() -> tuple[Part, ...]:
    """Every bucket, stream and store Ferry's processes rely on."""
    return (
        *(Part("bucket", b) for b in (*BUCKETS, LEASES_BUCKET_CONFIG.bucket)),
        *(Part("stream", s.name or "") for s in STREAMS),
        Part("object store", subjects.LAYERS_STORE),
    )


BOOTSTRAP_HINT = "create it with `ferry bootstrap` (in the lab: `ferry lab up`)"


async def missing_parts(
    js: JetStreamContext, parts: Sequence[Part] | None = None, *, timeout: float = 5.0
) -> list[Part]:
    """The parts JetStream positively says do not exist. No answer is Unavailable: it
    says nothing about what exists."""
    missing = []
    for part in topology() if parts is None else parts:
        try:
            await asyncio.wait_for(js.stream_info(part.stream), timeout)
        except NotFoundError:
            missing.append(part)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"JetStream did not say whether {part} exists: {exc!r}") from exc
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
        except (NatsTimeout, TimeoutError, APIError) as exc:
            if isinstance(exc, APIError) and exc.err_code not in NOT_READY_CODES:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"JetStream not ready after {wait_s:.0f}s: {exc!r}") from exc
            why = f"waiting for JetStream to be ready: {exc!r}"
            if why != said:
                say(why)
                said = why
            await asyncio.sleep(1.0)


async def bucket(js: JetStreamContext, name: str) -> KeyValue:
    return await js.key_value(name)


async def layers(js: JetStreamContext) -> ObjectStore:
    return await js.object_store(subjects.LAYERS_STORE)


def trace_headers() -> dict[str, str]:
    """W3C trace context of the current span, to travel in NATS headers."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


async def request(
    nc: NATS,
    subject: str,
    message: Message,
    reply_model: type[ReplyT],
    *,
    timeout: float,
    what: str,
) -> ReplyT:
    """Send a request and return the typed reply; remote errors come back typed."""
    try:
        msg = await nc.request(
            subject, message.to_bytes(), timeout=timeout, headers=trace_headers()
        )
    except NoRespondersError as exc:
        raise Unavailable(f"{what}: nobody is serving {subject} (is the host up?)") from exc
    except NatsTimeout as exc:
        raise Unavailable(f"{what}: no answer on {subject} within {timeout:.0f}s") from exc
    return parse_reply(msg.data, reply_model, what=what)


def parse_reply(data: bytes, reply_model: type[ReplyT], *, what: str) -> ReplyT:
    try:
        return reply_model.model_validate_json(data)
    except ValidationError:
        pass
    try:
        detail = ErrorReply.model_validate_json(data).error
    except ValidationError as exc:
        raise RuntimeFailure(f"{what}: unreadable reply {data[:200]!r}") from exc
    raise from_detail(detail)


def error_reply(error: FerryError) -> bytes:
    return ErrorReply(error=error.detail()).model_dump_json().encode()


def validation_error(exc: ValidationError) -> InvalidInput:
    """The first problem pydantic found, as field + reason."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    return InvalidInput(first["msg"], field=field)


Handler = Callable[[RequestT], Awaitable[BaseModel]]


async def serve(
    nc: NATS,
    subject: str,
    request_model: type[RequestT],
    handler: Handler[RequestT],
    *,
    queue: str = "",
    on_error: Callable[[str, FerryError], None] | None = None,
) -> Any:
    """Answer requests on `subject`: parse, call the handler, reply with its result or error."""

    async def respond(msg: Msg) -> None:
        try:
            try:
                parsed = request_model.model_validate_json(msg.data)
            except ValidationError as exc:
                raise validation_error(exc) from exc
            reply = (await handler(parsed)).model_dump_json().encode()
        except FerryError as exc:
            if on_error is not None:
                on_error(subject, exc)
            reply = error_reply(exc)
        except ConnectionError as exc:  # a peer went away mid-answer: a retry may help
            failure: FerryError = Unavailable(f"a connection failed while answering: {exc!r}")
            if on_error is not None:
                on_error(subject, failure)
            reply = error_reply(failure)
        except Exception as exc:  # a bug must still answer, or the caller waits in vain
            failure = RuntimeFailure(f"internal error: {type(exc).__name__}: {exc}")
            if on_error is not None:
                on_error(subject, failure)
            reply = error_reply(failure)
        if msg.reply:
            await msg.respond(reply)

    return await nc.subscribe(subject, queue=queue, cb=respond)


async def command_subscription(js: JetStreamContext, host: str, role: str) -> Any:
    """Bind to the durable pull consumer of one host's role, waiting (and saying why) until
    the bootstrap has made it: a host never creates its own."""
    durable = subjects.command_durable(host, role)
    said = ""
    while True:
        try:
            await js.consumer_info(subjects.COMMANDS_STREAM, durable)
            break
        except NotFoundError:
            why = (
                f"no durable consumer {durable} on {subjects.COMMANDS_STREAM};"
                f" create it with `ferry bootstrap --host {host}`"
            )
        except (NatsError, TimeoutError) as exc:
            why = f"could not look up consumer {durable}: {exc!r}"
        if why != said:
            log.warning("waiting: %s", why)
            said = why
        await asyncio.sleep(TOPOLOGY_RETRY_S)
    return await js.pull_subscribe_bind(durable=durable, stream=subjects.COMMANDS_STREAM)


DUPLICATE_IN_PROCESS = 10158  # JetStream: the same message id is being stored right now
DUPLICATE_IN_PROCESS_ATTEMPTS = 8


async def publish_command(
    js: JetStreamContext, command: StepCommand, headers: dict[str, str], *, msg_id: str = ""
) -> None:
    """To the work queue of the host and role the command names, under its message id.

    The same command can be queued twice at once (the worker that decided it and its host's
    dispatcher): a clustered stream then answers the second "duplicate message id is in
    process" until the first lands — asked again, it says "duplicate" (or takes ours, if
    the first failed)."""
    for attempt in range(1, DUPLICATE_IN_PROCESS_ATTEMPTS + 1):
        try:
            await js.publish(
                subjects.command_subject(command.host, command.role),
                command.to_bytes(),
                headers={**headers, "Nats-Msg-Id": msg_id or command.msg_id},
                stream=subjects.COMMANDS_STREAM,
            )
            return
        except APIError as exc:
            if exc.err_code != DUPLICATE_IN_PROCESS or attempt == DUPLICATE_IN_PROCESS_ATTEMPTS:
                raise
        await asyncio.sleep(0.05 * attempt)


async def publish_event(
    js: JetStreamContext, migration_id: str, event: BaseModel, msg_id: str | None = None
) -> None:
    await js.publish(
        subjects.event_subject(migration_id),
        event.model_dump_json().encode(),
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": msg_id} if msg_id else None,
    )
