"""The agent stops (and says why) when the bus refuses it for good, and only then."""

from __future__ import annotations

import asyncio
import functools

import pytest

from services.agent import _heartbeat_ended, _refusal
from services.errors import Forbidden, InvalidInput, Unavailable


async def ended_with(exc: BaseException) -> tuple[bool, BaseException | None]:
    async def beat() -> None:
        raise exc

    stopping = asyncio.Event()
    task = asyncio.create_task(beat())
    task.add_done_callback(functools.partial(_heartbeat_ended, stopping=stopping))
    with pytest.raises(type(exc)):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    return stopping.is_set(), _refusal(task)


@pytest.mark.parametrize("exc", [Forbidden("refused"), InvalidInput("creds 0644", field="creds")])
async def test_a_refusal_retrying_cannot_fix_stops_the_agent(exc: Exception) -> None:
    assert await ended_with(exc) == (True, exc)


@pytest.mark.parametrize("exc", [Unavailable("no answer"), RuntimeError("a bug")])
async def test_anything_else_leaves_the_agent_supervising(exc: Exception) -> None:
    assert await ended_with(exc) == (False, None)
