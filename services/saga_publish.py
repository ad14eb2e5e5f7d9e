"""Publishing what the saga engine decided: commands to hosts' work queues, events."""

from __future__ import annotations

from nats.js import JetStreamContext

from schemas import subjects
from services import bus
from services.tracecontext import headers_for
from workflows.saga import Decision, SagaDefinition


def command_role(definition: SagaDefinition, step: str, kind: str) -> str:
    if kind == "forward":
        return definition.step(step).role
    return definition.compensation(step)[1].role


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
        await bus.publish_event(js, record.id, event)
