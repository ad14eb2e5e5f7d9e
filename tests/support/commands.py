"""The step commands on Ferry's work queue, read without consuming them (by subject)."""

from __future__ import annotations

import json
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas import subjects


async def published_commands(js: JetStreamContext, host: str, role: str) -> list[dict[str, Any]]:
    """Every command queued for `role` on `host`, oldest first, as the JSON it was sent as."""
    subject = subjects.command_subject(host, role)
    found: list[dict[str, Any]] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(subjects.COMMANDS_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return found
        found.append(json.loads(msg.data or b"null"))
        seq = int(msg.seq or seq) + 1


async def command_count(js: JetStreamContext) -> int:
    """How many commands the work queue holds, for every host and role."""
    info = await js.stream_info(subjects.COMMANDS_STREAM)
    return int(info.state.messages)


def step_of(command: dict[str, Any]) -> tuple[str, str, str, int]:
    """The settled part of a command: (migration_id, step, kind, attempt)."""
    return (command["migration_id"], command["step"], command["kind"], command["attempt"])
