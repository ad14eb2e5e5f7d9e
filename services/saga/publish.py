"""Publishing what the saga engine decided: commands to hosts' work queues, then events."""

from __future__ import annotations

from nats.js import JetStreamContext

from schemas.v2.migrations import MigrationRecord
from services import bus
from services.tracecontext import headers_for
from workflows.saga import Decision, finished_event


async def publish_decision(js: JetStreamContext, decision: Decision, *, host: str | None) -> None:
    """Commands first (each names its host, role and message id: re-publishing after a
    crash is dropped as a duplicate), then events.

    A host publishes only its own commands (`host`): the bus refuses the others, and the
    host that runs them queues them itself from the record (services/saga/dispatch.py).
    The operator (host None) may publish every host's."""
    record = decision.record
    headers = headers_for(record.traceparent)
    for command in decision.commands:
        if host is None or command.host == host:
            await bus.publish_command(js, command, headers)
    for event in decision.events:
        # The end is announced once, however often a crash makes us announce it again.
        msg_id = f"{record.id}.finished" if getattr(event, "type", "") == "finished" else None
        await bus.publish_event(js, record.id, event, msg_id)


async def announce_end(js: JetStreamContext, record: MigrationRecord) -> None:
    """Re-announce a finished migration (deduplicated): the first announcement may have been
    lost when the bus went down between the record's last write and the event."""
    await bus.publish_event(js, record.id, finished_event(record), f"{record.id}.finished")
