"""Publishing what the saga engine decided: commands to hosts' work queues, events."""

from __future__ import annotations

from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.migrations import Finished, MigrationRecord
from services import bus
from services.tracecontext import headers_for
from workflows.saga import Decision, SagaDefinition


def command_role(definition: SagaDefinition, step: str, kind: str) -> str:
    return definition.action(step, kind).role


async def publish_decision(
    js: JetStreamContext, definition: SagaDefinition, decision: Decision
) -> None:
    """Commands first (deduplicated by id: re-publishing after a crash is harmless), then events."""
    record = decision.record
    headers = headers_for(record.traceparent)
    for command in decision.commands:
        entry = next(
            s for s in reversed(record.steps) if s.name == command.step and s.kind == command.kind
        )
        await bus.publish_command(
            js,
            entry.host,
            command_role(definition, command.step, command.kind),
            command,
            subjects.command_msg_id(record.id, command.kind, command.step, command.attempt),
            headers,
        )
    for event in decision.events:
        # The end is announced once, however often a crash makes us announce it again.
        msg_id = f"{record.id}.finished" if getattr(event, "type", "") == "finished" else None
        await bus.publish_event(js, record.id, event, msg_id)


async def announce_end(js: JetStreamContext, record: MigrationRecord) -> None:
    """Re-announce a finished migration (deduplicated): the first announcement may have been
    lost when the bus went down between the record's last write and the event."""
    finished = Finished(
        migration_id=record.id,
        at=record.updated_at,
        state=record.state,
        freeze_ms=record.freeze_ms,
        bytes_moved=record.bytes_moved,
        error=record.error,
    )
    await bus.publish_event(js, record.id, finished, f"{record.id}.finished")
