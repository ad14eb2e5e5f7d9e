"""The CLI reaches the bus through its context: any of the context's servers will do."""

from __future__ import annotations

import socket

from services.cli.context import BusContext, connected


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nobody listens here once the socket is closed


async def test_a_context_whose_first_server_is_down_connects_to_the_next(nats_url: str) -> None:
    context = BusContext(servers=(f"nats://127.0.0.1:{_closed_port()}", nats_url))
    async with connected(context, connect_timeout=2.0) as nc:
        assert nc.is_connected
        assert nc.connected_url is not None
        assert f":{nc.connected_url.port}" in nats_url
