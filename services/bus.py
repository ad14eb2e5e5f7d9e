"""The NATS edge: connections, typed request/reply, commands and events, trace headers.

What the bus must hold (streams, buckets, consumers) is services/topology.py.

Everything that speaks NATS goes through here, so no handler has to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from opentelemetry import propagate, trace
from pydantic import BaseModel, ValidationError

from schemas import subjects
from schemas.v1.base import ErrorReply
from schemas.v1.base import Message as MessageV1
from schemas.v2.base import Message as MessageV2
from schemas.v2.migrations import StepCommand
from services import topology
from services.credentials import load_credentials
from services.errors import (
    FerryError,
    Forbidden,
    InvalidInput,
    RuntimeFailure,
    Unavailable,
    described,
    from_detail,
)

log = logging.getLogger("ferry.bus")


class _QuietTlsEof(logging.Filter):
    """nats-py's protocol answers a server's EOF the way plain TCP wants; over TLS asyncio
    warns that this "has no effect" on every close. Harmless: not worth a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


logging.getLogger("asyncio").addFilter(_QuietTlsEof())
ReplyT = TypeVar("ReplyT", bound=BaseModel)
Message = MessageV1 | MessageV2
RequestT = TypeVar("RequestT", bound=BaseModel)

IN_PROGRESS_EVERY_S = 3.0


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
    auth = client_options(creds, ca)
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
        await close(nc)
        log.warning("nats: %s sent another line before PONG; connecting again", ", ".join(servers))
        return await connect(
            url, name, creds=creds, ca=ca, connect_timeout=connect_timeout,
            give_up_after=give_up_after,
        )  # fmt: skip
    return nc


CLOSE_WAIT_S = 2.0


async def close(nc: NATS) -> None:
    """Close a client and make sure its reconnect loop ended with it.

    nats-py cancels the loop once and waits half a second; on Python 3.11 `asyncio.wait_for`
    can swallow that cancel, and the loop then tries a dead server forever — and the event
    loop's shutdown (asyncio.run, a worker's exit, a test's teardown) waits for it forever.
    Cancelled again until it ends; still running after CLOSE_WAIT_S, it is logged, never
    waited for."""
    await nc.close()
    # nats-py keeps the task private; without it there is nothing more to end.
    task: asyncio.Task[None] | None = getattr(nc, "_reconnection_task", None)
    deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_S
    while task is not None and not task.done():
        if asyncio.get_running_loop().time() > deadline:
            log.warning("nats: the closed client's reconnect loop did not end")
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def client_options(creds: Path | None, ca: Path | None = None) -> dict[str, Any]:
    """nats-py's options for speaking as the identity in `creds` (None: anonymous), over TLS
    trusting `ca` if given."""
    options: dict[str, Any] = {}
    if creds is not None:
        secret = load_credentials(creds)
        options = {
            "user": secret.user,
            "password": secret.password.get_secret_value(),
            # Replies to this identity come to its own inboxes: no one else may read them.
            "inbox_prefix": f"_INBOX.{secret.user}",
        }
    if ca is not None:
        try:
            options["tls"] = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot use CA {ca}: {exc}", field="ca") from exc
    return options


def identity(nc: NATS) -> str:
    """The bus identity this connection speaks as (its NATS user), or anonymous."""
    user = nc.options.get("user")
    return str(user) if user else subjects.ANONYMOUS


def _refused(servers: list[str], creds: Path | None) -> Forbidden:
    who = f"the credentials in {creds}" if creds else "an anonymous client (no credentials)"
    return Forbidden(f"NATS at {', '.join(servers)} refused {who}", field="creds")


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
AskedHandler = Callable[[RequestT, str | None], Awaitable[BaseModel]]


async def serve(
    nc: NATS,
    subject: str,
    request_model: type[RequestT],
    handler: Handler[RequestT],
    *,
    queue: str = "",
    on_error: Callable[[str, FerryError], None] | None = None,
    span: str | None = None,
) -> Any:
    """Answer requests on `subject`: parse, call the handler, reply with its result or error.
    With `span`, the handler runs in a span of that name, a child of the asker's trace."""

    async def ignoring_asker(request: RequestT, reply_to: str | None) -> BaseModel:
        return await handler(request)

    return await serve_asked(
        nc, subject, request_model, ignoring_asker, queue=queue, on_error=on_error, span=span
    )


async def serve_asked(
    nc: NATS,
    subject: str,
    request_model: type[RequestT],
    handler: AskedHandler[RequestT],
    *,
    queue: str = "",
    on_error: Callable[[str, FerryError], None] | None = None,
    span: str | None = None,
) -> Any:
    """As `serve`, the handler also given the request's reply subject: on a bus with
    identities, whose own inbox the answer goes to (services/identities.py)."""

    async def respond(msg: Msg) -> None:
        if span is None:
            await answer(msg)
            return
        asker = propagate.extract(dict(msg.headers or {}))
        with trace.get_tracer("ferry").start_as_current_span(span, context=asker):
            await answer(msg)

    async def answer(msg: Msg) -> None:
        try:
            try:
                parsed = request_model.model_validate_json(msg.data)
            except ValidationError as exc:
                raise validation_error(exc) from exc
            reply = (await handler(parsed, msg.reply or None)).model_dump_json().encode()
        except FerryError as exc:
            if on_error is not None:
                on_error(subject, exc)
            reply = error_reply(exc)
        except ConnectionError as exc:  # a peer went away mid-answer: a retry may help
            failure: FerryError = Unavailable(
                f"a connection failed while answering: {described(exc)}"
            )
            if on_error is not None:
                on_error(subject, failure)
            reply = error_reply(failure)
        except Exception as exc:  # a bug must still answer, or the caller waits in vain
            log.exception("%s crashed", subject)  # the traceback, for whoever reads the log
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
            why = f"could not look up consumer {durable}: {described(exc)}"
        if why != said:
            log.warning("waiting: %s", why)
            said = why
        await asyncio.sleep(topology.TOPOLOGY_RETRY_S)
    return await js.pull_subscribe_bind(durable=durable, stream=subjects.COMMANDS_STREAM)


DUPLICATE_IN_PROCESS = 10158  # JetStream: the same message id is being stored right now


async def publish_command(
    js: JetStreamContext, command: StepCommand, headers: dict[str, str], *, msg_id: str = ""
) -> None:
    """To the work queue of the host and role the command names, under its message id.

    The same command can be queued twice at once (the worker that decided it and its host's
    dispatcher): a clustered stream answers the second "duplicate message id is in process".
    That is done, not failed: the first is being stored, and if storing it fails, the
    dispatcher's next sweep queues it again. Waiting it out here would hold back the events
    the caller publishes next."""
    try:
        await js.publish(
            subjects.command_subject(command.host, command.role),
            command.to_bytes(),
            headers={**headers, "Nats-Msg-Id": msg_id or command.msg_id},
            stream=subjects.COMMANDS_STREAM,
        )
    except APIError as exc:
        if exc.err_code != DUPLICATE_IN_PROCESS:
            raise


async def publish_event(
    js: JetStreamContext, migration_id: str, event: BaseModel, msg_id: str | None = None
) -> None:
    await js.publish(
        subjects.event_subject(migration_id),
        event.model_dump_json().encode(),
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": msg_id} if msg_id else None,
    )
