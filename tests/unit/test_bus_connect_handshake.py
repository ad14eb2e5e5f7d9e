"""bus.connect never hands out a client that nats-py left half-connected.

nats-server PINGs a new client about 2 s after it connects; when checking the CONNECT takes
longer (bcrypt passwords on a busy server), that PING arrives before the PONG to the
client's own PING, and nats-py returns a client stuck "connecting" that never sends.
"""

from __future__ import annotations

import asyncio

from services import bus

INFO = b'INFO {"server_id":"t","version":"2.10.0","proto":1,"max_payload":1048576}\r\n'


async def test_a_ping_before_the_pong_gets_a_second_connection_that_works() -> None:
    attempts = 0

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.write(INFO)
        await writer.drain()
        await reader.readline()  # CONNECT
        await reader.readline()  # PING
        writer.write(b"PING\r\nPONG\r\n" if attempts == 1 else b"PONG\r\n")
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"PING"):
                writer.write(b"PONG\r\n")
                await writer.drain()

    listener = await asyncio.start_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    nc = await bus.connect(f"nats://127.0.0.1:{port}", "test", give_up_after=10)
    try:
        assert attempts == 2
        assert nc.is_connected
        await asyncio.wait_for(nc.flush(), 5)  # it really sends: PING, PONG
    finally:
        await nc.close()
        listener.close()
