"""bus.close ends the client's reconnect loop even when a cancel of it was swallowed.

On Python 3.11 `asyncio.wait_for` can swallow a cancel; nats-py's reconnect loop then keeps
trying a dead server, and the event loop's shutdown waits for it forever (seen as a test
teardown that hung a CI run).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services import bus


class ClientWhoseLoopSwallowsOneCancel:
    """A client whose close() cancels its reconnect loop once, and the loop eats it."""

    def __init__(self) -> None:
        self.swallowed = 0
        self._reconnection_task = asyncio.create_task(self._attempt_reconnect())

    async def _attempt_reconnect(self) -> None:
        while True:
            try:
                await asyncio.sleep(0.5)  # "trying the next server"
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1

    async def close(self) -> None:
        self._reconnection_task.cancel()
        await asyncio.sleep(0)


async def test_a_swallowed_cancel_is_repeated_until_the_loop_ends() -> None:
    client = ClientWhoseLoopSwallowsOneCancel()
    await asyncio.sleep(0)
    await asyncio.wait_for(bus.close(cast(Any, client)), 1.0)
    assert client.swallowed == 1
    assert client._reconnection_task.done()
